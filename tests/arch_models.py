"""Tiny random models of every supported family, built from transformers' own config classes (2 layers, hidden 64,
4 heads of 16, 2 KV heads), with the byte tokenizer's 259-token vocabulary.

`randomize` draws weights larger than the default init (matrices N(0, 0.08), norms 1 + N(0, 0.3) or, for Gemma's
(1 + w) norms, N(0, 0.3), biases and sinks N(0, 0.5)): with the default init the logits hardly depend on the
layers, and a missed norm offset or a swapped gate/up would hide.
"""

from __future__ import annotations

from pathlib import Path

import torch

from finetune.synthetic import byte_tokenizer

COMMON = dict(vocab_size=259, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=False, rms_norm_eps=1e-5,
              pad_token_id=257, bos_token_id=None, eos_token_id=256)

YARN = {"beta_fast": 32.0, "beta_slow": 1.0}
FAMILIES = {  # name -> (transformers config class, its arguments beyond COMMON)
    "llama": ("LlamaConfig", {}),
    "mistral": ("MistralConfig", {"sliding_window": None}),
    "qwen2": ("Qwen2Config", {"tie_word_embeddings": True, "rope_parameters": {"rope_theta": 1e6}}),
    "qwen3": ("Qwen3Config", {"head_dim": 16}),
    # query_pre_attn_scalar = head_dim: llama.cpp scales by head_dim**-0.5 (but for the 62-layer 27B)
    "gemma3": ("Gemma3TextConfig", {"head_dim": 16, "query_pre_attn_scalar": 16, "sliding_window": 8,
                                    "layer_types": ["sliding_attention", "full_attention"],
                                    "final_logit_softcapping": 30.0, "tie_word_embeddings": True}),
    "phi3": ("Phi3Config", {"original_max_position_embeddings": 256}),
    "phi4mini": ("Phi3Config", {"original_max_position_embeddings": 256, "partial_rotary_factor": 0.75,
                                "tie_word_embeddings": True}),
    # original_max_position_embeddings 16: positions past it exercise the llama-4 query scaling and yarn
    "ministral3": ("Ministral3Config", {"head_dim": 16, "rope_parameters": {
        "rope_type": "yarn", "rope_theta": 1e6, "factor": 16.0, "original_max_position_embeddings": 16,
        "mscale_all_dim": 1.0, "mscale": 1.0, "llama_4_scaling_beta": 0.1, **YARN}}),
    "qwen3_moe": ("Qwen3MoeConfig", {"head_dim": 16, "moe_intermediate_size": 32, "num_experts": 4,
                                     "num_experts_per_tok": 2, "norm_topk_prob": True}),
    "mixtral": ("MixtralConfig", {"num_local_experts": 4, "num_experts_per_tok": 2}),
    "gpt_oss": ("GptOssConfig", {"head_dim": 16, "num_local_experts": 4, "num_experts_per_tok": 2, "sliding_window": 8,
                                 "rope_parameters": {"rope_type": "yarn", "rope_theta": 150000.0, "factor": 32.0,
                                                     "truncate": False, "original_max_position_embeddings": 8,
                                                     **YARN}}),
}
DENSE = ("llama", "mistral", "qwen2", "qwen3", "gemma3", "phi3", "phi4mini", "ministral3")
MOE = ("qwen3_moe", "mixtral", "gpt_oss")


def tiny_config(family: str, **overrides):
    import transformers

    cls, extra = FAMILIES[family]
    return getattr(transformers, cls)(**{**COMMON, **extra, **overrides})


@torch.no_grad()
def randomize(model, seed: int = 1) -> None:
    """Weights that make every part of a block matter (module docstring)."""
    g = torch.Generator().manual_seed(seed)
    offset = 0.0 if "Gemma" in type(model).__name__ else 1.0
    for name, p in model.named_parameters():
        r = torch.randn(p.shape, generator=g)
        if p.dim() >= 2:
            p.copy_(r * (0.5 if "embed" in name else 0.08))
        elif "norm" in name:
            p.copy_(offset + 0.3 * r)
        else:
            p.copy_(0.5 * r)


def tiny_model(family: str, seed: int = 0, large_weights: bool = True, **overrides):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(family, **overrides), dtype=torch.float32).eval()
    if large_weights:
        randomize(model, seed + 1)
    return model


def save_tiny(family: str, path: Path, seed: int = 0, large_weights: bool = True, **overrides) -> Path:
    """A tiny model of `family` and the byte tokenizer as an HF directory."""
    model = tiny_model(family, seed, large_weights, **overrides)
    model.save_pretrained(path)
    byte_tokenizer().save_pretrained(path)
    return Path(path)


# text family -> (the multimodal config class, its arguments beyond text_config and vision_config)
MULTIMODAL = {"gemma3": ("Gemma3Config", {"mm_tokens_per_image": 4}), "ministral3": ("Mistral3Config", {})}
VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=28,
              patch_size=14)


def save_multimodal(family: str, path: Path, seed: int = 0):
    """A tiny multimodal model (Gemma3ForConditionalGeneration, Mistral3ForConditionalGeneration) whose text part is
    the tiny `family` model, saved with the byte tokenizer; returns the model (eval mode)."""
    import transformers

    cls, extra = MULTIMODAL[family]
    text = {k: v for k, v in tiny_config(family).to_dict().items() if k != "architectures"}
    vision = {**VISION, "head_dim": 16} if family == "ministral3" else VISION
    torch.manual_seed(seed)
    config = getattr(transformers, cls)(text_config=text, vision_config=vision, **extra)
    model = transformers.AutoModelForImageTextToText.from_config(config).eval()
    randomize(model, seed + 1)
    model.save_pretrained(path)
    byte_tokenizer().save_pretrained(path)
    return model
