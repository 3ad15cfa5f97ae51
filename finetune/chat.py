"""`finetune chat` (interactive) and `finetune generate` (prompts from the command line or a file).

Both take RUN_OR_MODEL (finetune.inference.load_for_generation: an adapter merged into dense weights at load, a
GGUF output in llama.cpp where installed), render prompts as training did (finetune.generation), stream the
reply's tokens to the terminal with transformers' TextStreamer and print tokens/s after each reply.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import TextIO

from finetune.generation import GenConfig, chat_prompt_ids, generate, raw_prompt_ids
from finetune.inference import Loaded, input_paths, load_for_generation, resolve_device
from quant.errors import UserError
from quant.files import check_output, write_output

CHAT_COMMANDS = "/reset clears the conversation, /quit (or end of input) leaves"


def describe(m: Loaded) -> str:
    if m.is_adapter:
        return (f"{m.name}: adapter merged at load into its {m.source.base.format} base {m.source.base.model} as "
                f"trained (compute {str(m.dtype).replace('torch.', '')}, {m.device})")
    if m.runner != "transformers":
        return f"{m.name}: {m.kind} model in {m.runner} ({m.device})"
    return f"{m.name}: {m.kind} model (compute {str(m.dtype).replace('torch.', '')}, {m.device})"


def _streamer(tokenizer, out: TextIO):
    from transformers import TextStreamer

    class _To(TextStreamer):  # TextStreamer prints to stdout; a caller may want another stream
        def on_finalized_text(self, text: str, stream_end: bool = False):
            out.write(text + ("\n" if stream_end else ""))
            out.flush()

    return _To(tokenizer, skip_prompt=True, skip_special_tokens=True)


def _stats(gen) -> str:
    return f"[{gen.new_tokens} tokens in {gen.seconds:.1f} s, {gen.tokens_per_s:.1f} tokens/s]"


def chat(model: str, cfg: GenConfig, system: str | None = None, device: str | None = None,
         dtype: str | None = None, stdin: TextIO | None = None, stdout: TextIO | None = None,
         stderr: TextIO | None = None) -> int:
    """Talk to RUN_OR_MODEL turn by turn; the whole conversation is the prompt of each reply.
    Returns the number of replies."""
    stdin, stdout, stderr = stdin or sys.stdin, stdout or sys.stdout, stderr or sys.stderr
    m = load_for_generation(model, resolve_device(device), dtype)
    print(f"chat with {describe(m)}; {CHAT_COMMANDS}", file=stderr)
    history = [{"role": "system", "content": system}] if system else []
    streamer = _streamer(m.tokenizer, stdout)
    replies = 0
    while True:
        stdout.write("you> ")
        stdout.flush()
        line = stdin.readline()
        if not line:
            stdout.write("\n")
            break
        text = line.strip()
        if text == "/quit":
            break
        if text == "/reset":
            history = history[:1] if system else []
            print("(conversation cleared)", file=stderr)
            continue
        if not text:
            continue
        history.append({"role": "user", "content": text})
        stdout.write("assistant> ")
        gen = generate(m.model, m.tokenizer, chat_prompt_ids(m.tokenizer, history), cfg, streamer)
        history.append({"role": "assistant", "content": gen.text.strip()})
        print(_stats(gen), file=stderr)
        replies += 1
    return replies


def read_prompts(path: str) -> list[dict]:
    """Prompts of a file: .jsonl/.json rows with `prompt` (text) or `messages` (a trailing assistant turn, the
    reference answer, is dropped), or any other text file with one prompt per non-empty line.
    Each prompt is {"text": ...} or {"messages": [...]}."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"--prompts {path}: no such file")
    if p.suffix not in (".jsonl", ".json"):
        return [{"text": line.strip()} for line in p.read_text().splitlines() if line.strip()]
    prompts = []
    for n, line in enumerate(p.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"{path}:{n}: not valid JSON ({e.msg})") from None
        if isinstance(row, dict) and isinstance(row.get("messages"), list) and row["messages"]:
            messages = [t for t in row["messages"] if isinstance(t, dict)]
            if messages and messages[-1].get("role") == "assistant":
                messages = messages[:-1]
            if messages:
                prompts.append({"messages": messages})
                continue
        elif isinstance(row, dict) and isinstance(row.get("prompt"), str):
            prompts.append({"text": row["prompt"]})
            continue
        raise UserError(f"{path}:{n}: expected an object with 'prompt' (text) or 'messages' (chat turns)")
    if not prompts:
        raise UserError(f"--prompts {path}: no prompts in the file")
    return prompts


def generate_prompts(model: str, prompts: list[dict], cfg: GenConfig, raw: bool = False, out: str | None = None,
                     device: str | None = None, dtype: str | None = None, stdout: TextIO | None = None,
                     stderr: TextIO | None = None, overwrite: bool = False,
                     read: tuple[str | None, str] = (None, "")) -> list[dict]:
    """Complete each prompt ({"text"} or {"messages"}); text prompts get the chat template unless `raw`.
    Returns (and with `out` writes as JSONL) {prompt, completion, new_tokens, tokens_per_s} per prompt. `out`
    follows the output rule (quant.files.claim_output: an existing file only with `overwrite`, never an input;
    `read` names the prompts file as one), checked before the model loads."""
    stdout, stderr = stdout or sys.stdout, stderr or sys.stderr
    if not prompts:
        raise UserError("no prompt: pass --prompt TEXT or --prompts FILE")
    inputs = [*input_paths(model), read] if out else []
    if out:
        check_output(out, overwrite, inputs=inputs, file=True)
    m = load_for_generation(model, resolve_device(device), dtype)
    print(f"generating with {describe(m)}", file=stderr)
    streamer = _streamer(m.tokenizer, stdout)
    records = []
    for i, prompt in enumerate(prompts, 1):
        if "messages" in prompt:
            ids, shown = chat_prompt_ids(m.tokenizer, prompt["messages"]), prompt["messages"][-1].get("content")
        elif raw:
            ids, shown = raw_prompt_ids(m.tokenizer, prompt["text"]), prompt["text"]
        else:
            ids, shown = chat_prompt_ids(m.tokenizer, [{"role": "user", "content": prompt["text"]}]), prompt["text"]
        print(f"--- prompt {i}/{len(prompts)}: {shown}", file=stderr)
        gen = generate(m.model, m.tokenizer, ids, cfg, streamer)
        print(_stats(gen), file=stderr)
        records.append({"prompt": prompt.get("text", prompt.get("messages")), "completion": gen.text,
                        "new_tokens": gen.new_tokens, "tokens_per_s": round(gen.tokens_per_s, 2)})
    if out:
        write_output(out, "".join(json.dumps(r) + "\n" for r in records), overwrite, inputs=inputs)
    return records
