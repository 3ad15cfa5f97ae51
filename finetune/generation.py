"""Prompts rendered as in training, and generation (greedy or sampled; streamed, or batched for evaluation).

A conversation is rendered with the tokenizer's chat template plus the generation prompt, exactly the prompt
tokens training put before every answer (finetune.data's renderer: the tokenizer's template, or the plain
'### Instruction:' layout for tokenizers without one). Raw text (completion-format runs) goes in as is.

A model is a transformers model (its `generate`) or a `LlamaCppModel` (a GGUF file in llama.cpp); both are fed
the same prompt token ids and stream through the same TextStreamer.
"""

from __future__ import annotations

import importlib.util
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from finetune.data.template import render
from finetune.data.tokenize import make_renderer
from quant.errors import UserError


@dataclass
class GenConfig:
    max_new_tokens: int = 256
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    seed: int | None = None

    def kwargs(self) -> dict:
        if self.temperature <= 0:
            return {"do_sample": False}
        return {"do_sample": True, "temperature": self.temperature, "top_p": self.top_p}


@dataclass
class Generation:
    text: str
    new_tokens: int
    seconds: float

    @property
    def tokens_per_s(self) -> float:
        return self.new_tokens / max(self.seconds, 1e-9)


def chat_prompt_ids(tokenizer, messages: list[dict]) -> list[int]:
    """Token ids of `messages` followed by the assistant's generation prompt, rendered as training renders."""
    renderer = make_renderer(tokenizer, "chat")
    text = render(tokenizer, messages, True, renderer.template)  # bounded: a template is data (finetune.data.template)
    leading = renderer.leading_ids if renderer.template else []
    return leading + tokenizer(text, add_special_tokens=False)["input_ids"]


def raw_prompt_ids(tokenizer, text: str) -> list[int]:
    """Plain text as completion-format training tokenizes a prompt: the tokenizer's leading ids (BOS) + text."""
    return make_renderer(tokenizer, "completion").leading_ids + tokenizer(text, add_special_tokens=False)["input_ids"]


def llama_cpp_available() -> bool:
    return importlib.util.find_spec("llama_cpp") is not None


class LlamaCppModel:
    """A GGUF file run by llama.cpp (llama-cpp-python) for generation: prompts come in as token ids rendered by
    our tokenizer (the file's own), greedy is temperature 0, sampling is temperature + top-p alone (llama.cpp's
    top-k and min-p off, as transformers' defaults here). The KV cache keeps the longest common prefix between
    calls, so a chat turn only evaluates what is new."""

    generation_config = None

    def __init__(self, path: Path, threads: int | None = None):
        from llama_cpp import Llama

        self.path = Path(path)
        threads = threads or torch.get_num_threads()
        # n_ctx 0: the context the model was trained with (its GGUF metadata), which llama.cpp would warn to exceed.
        self.llm = Llama(model_path=str(self.path), n_ctx=0, n_threads=threads, n_threads_batch=threads,
                         verbose=False)

    def complete(self, ids: list[int], cfg: GenConfig, stops: list[int], streamer=None) -> list[int]:
        if len(ids) + cfg.max_new_tokens > self.llm.n_ctx():
            raise UserError(f"the prompt ({len(ids)} tokens) and --max-new-tokens {cfg.max_new_tokens} exceed "
                            f"llama.cpp's context of {self.llm.n_ctx()} tokens; /reset the conversation or lower "
                            "--max-new-tokens")
        if cfg.seed is not None:
            self.llm.set_seed(cfg.seed)
        greedy = cfg.temperature <= 0
        sampling = {"temp": 0.0, "top_p": 1.0} if greedy else {"temp": cfg.temperature, "top_p": cfg.top_p}
        if streamer is not None:
            streamer.put(torch.tensor([ids]))  # the prompt, which TextStreamer(skip_prompt=True) skips
        new: list[int] = []
        for token in self.llm.generate(ids, top_k=0, min_p=0.0, repeat_penalty=1.0, reset=True, **sampling):
            new.append(token)
            if streamer is not None:
                streamer.put(torch.tensor([token]))
            if token in stops or len(new) >= cfg.max_new_tokens:
                break
        if streamer is not None:
            streamer.end()
        return new


def stop_ids(model, tokenizer) -> list[int]:
    """EOS of the tokenizer and of the model's generation config (chat models often end turns on their own)."""
    ids = {tokenizer.eos_token_id}
    gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids.update(gen_eos if isinstance(gen_eos, list) else [gen_eos])
    return sorted(i for i in ids if i is not None)


def _device(model) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def generate(model, tokenizer, ids: list[int], cfg: GenConfig, streamer=None) -> Generation:
    """One completion of the prompt `ids`; `streamer` (transformers TextStreamer) prints tokens as they come."""
    stops = stop_ids(model, tokenizer)
    started = time.perf_counter()
    if isinstance(model, LlamaCppModel):
        new = torch.tensor(model.complete(ids, cfg, stops, streamer), dtype=torch.long)
    else:
        if cfg.seed is not None:
            torch.manual_seed(cfg.seed)
        input_ids = torch.tensor([ids], device=_device(model))
        out = model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                             max_new_tokens=cfg.max_new_tokens, pad_token_id=tokenizer.pad_token_id,
                             eos_token_id=stops, streamer=streamer, use_cache=True, **cfg.kwargs())
        new = out[0, len(ids):]
    seconds = time.perf_counter() - started
    return Generation(tokenizer.decode(new, skip_special_tokens=True), _count_new(new, stops), seconds)


def _count_new(tokens: torch.Tensor, stops: list[int]) -> int:
    """Generated tokens up to and including the first stop token (the rest is padding in a batch)."""
    hits = [i for i, t in enumerate(tokens.tolist()) if t in stops]
    return hits[0] + 1 if hits else len(tokens)


@torch.no_grad()
def generate_batch(model, tokenizer, prompts: list[list[int]], cfg: GenConfig, batch_size: int = 8,
                   progress=None) -> list[Generation]:
    """Completions of many prompts, `batch_size` at a time, left-padded (so every prompt ends where generation
    starts). `seconds` of each is its batch's time shared out per generated token."""
    if cfg.seed is not None:
        torch.manual_seed(cfg.seed)
    device, pad = _device(model), tokenizer.pad_token_id
    stops = stop_ids(model, tokenizer)
    results: list[Generation] = []
    for lo in range(0, len(prompts), batch_size):
        chunk = prompts[lo:lo + batch_size]
        width = max(len(p) for p in chunk)
        input_ids = torch.tensor([[pad] * (width - len(p)) + p for p in chunk], device=device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in chunk], device=device)
        started = time.perf_counter()
        out = model.generate(input_ids=input_ids, attention_mask=mask, max_new_tokens=cfg.max_new_tokens,
                             pad_token_id=pad, eos_token_id=stops, use_cache=True, **cfg.kwargs())
        seconds = time.perf_counter() - started
        new = out[:, width:]
        counts = [_count_new(row, stops) for row in new]
        for row, n in zip(new, counts):
            text = tokenizer.decode(row[:n], skip_special_tokens=True)
            results.append(Generation(text, n, seconds * n / max(sum(counts), 1)))
        if progress is not None:
            progress(len(chunk))
    return results
