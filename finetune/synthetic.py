"""Offline stand-ins for tests and benchmarks: a byte-level ChatML tokenizer and random models of published shapes.

Machines without hub access (CI, the lent GPU box) still need a tokenizer and a model directory of the right
shape; speed and memory do not depend on the weights' values.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
import transformers
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

from quant.awq.model import quantize_model_awq, save_awq
from quant.awq.solver import AWQConfig
from quant.gptq.model import quantize_model, save_quantized
from quant.gptq.solver import GPTQConfig

CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# Published architectures (config.json values that matter for compute and memory).
SHAPES = {
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=259, tie_word_embeddings=False),
    "llama-3.2-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                         num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True, rope_theta=500000.0),
    "llama-3.1-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                         num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False, rope_theta=500000.0),
    "qwen2.5-7b": dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                       num_key_value_heads=4, vocab_size=152064, tie_word_embeddings=False, rope_theta=1000000.0,
                       attention_bias=True),
    "llama-70b": dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
                      num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False, rope_theta=500000.0),
    # a mixture of experts: 128 experts of width 768 in every layer, 8 per token (3.3B of 30.5B weights active)
    "qwen3-30b-a3b": dict(hidden_size=2048, intermediate_size=6144, moe_intermediate_size=768, num_experts=128,
                          num_experts_per_tok=8, norm_topk_prob=True, num_hidden_layers=48, num_attention_heads=32,
                          num_key_value_heads=4, head_dim=128, vocab_size=151936, tie_word_embeddings=False,
                          rope_theta=1000000.0),
}
CONFIG_CLASSES = {"qwen2.5-7b": "Qwen2Config", "qwen3-30b-a3b": "Qwen3MoeConfig"}  # the others: LlamaConfig


def byte_tokenizer():
    """Byte-level BPE with no merges: every byte is a token, so any text round-trips; 259 tokens, ChatML."""
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok)
    fast.add_special_tokens({"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>",
                             "additional_special_tokens": ["<|im_start|>"]})
    fast.chat_template = CHATML
    return fast


def model_config(shape: str, **overrides):
    values = {**SHAPES[shape], "max_position_embeddings": 131072 if shape != "tiny" else 512, **overrides}
    cls = CONFIG_CLASSES.get(shape, "LlamaConfig")
    if cls == "Qwen2Config":
        values.pop("attention_bias", None)  # Qwen2's q/k/v always have biases
    return getattr(transformers, cls)(**values)


def random_model(shape: str, dtype=torch.float32, device="cpu", seed: int = 0, **overrides):
    """A randomly initialised causal LM of `shape`, built directly on `device` (no CPU copy of an 8B model)."""
    torch.manual_seed(seed)
    config = model_config(shape, **overrides)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model


def save_random_model(shape: str, path: str | Path, dtype=torch.bfloat16, device="cpu", seed: int = 0,
                      **overrides) -> Path:
    """Write a random model of `shape` and the byte tokenizer as an HF directory (a base for benchmarks)."""
    model = random_model(shape, dtype=dtype, device=device, seed=seed, **overrides)
    path = save_model_dir(model, path)
    del model
    return path


def save_model_dir(model, path: str | Path) -> Path:
    """`model` and the byte tokenizer as an HF directory."""
    path = Path(path)
    model.save_pretrained(path)
    byte_tokenizer().save_pretrained(path)
    return path


def save_rtn_gptq(model, path: str | Path, group_size: int = 128) -> Path:
    """Quantize `model` in place to 4-bit GPTQ by round-to-nearest and write the checkpoint (with the byte
    tokenizer). For random weights calibration would change nothing a benchmark measures."""
    cfg = GPTQConfig(bits=4, group_size=group_size, method="rtn").validate()
    quantize_model(model, None, cfg, device=next(model.parameters()).device, progress=False)
    return save_quantized(model, path, tokenizer=byte_tokenizer())


def save_rtn_awq(model, path: str | Path, group_size: int = 128) -> Path:
    """Like save_rtn_gptq, in AWQ's gemm format: asymmetric 4-bit with zero points, no scale search."""
    cfg = AWQConfig(group_size=group_size, method="rtn").validate()
    quantize_model_awq(model, None, cfg, device=next(model.parameters()).device, progress=False)
    return save_awq(model, path, tokenizer=byte_tokenizer())


def synthetic_text(path: str | Path, rows: int, chars: int, seed: int = 0) -> Path:
    """A jsonl file of `rows` {"text": ...} rows of about `chars` characters of random words, for benchmarks."""
    rng = random.Random(seed)
    words = ["alpha", "beta", "gamma", "delta", "quant", "layer", "token", "merge", "adapter", "weight"]
    path = Path(path)
    with open(path, "w") as f:
        for _ in range(rows):
            f.write(json.dumps({"text": " ".join(rng.choice(words) for _ in range(chars // 6))}) + "\n")
    return path
