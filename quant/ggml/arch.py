"""From a Hugging Face config to what llama.cpp reads: architecture metadata, tensor names, tensor layout.

Llama and Mistral checkpoints become llama.cpp's `llama` architecture, Qwen2 its `qwen2`. llama.cpp applies
rotary embeddings to Llama-arch q/k as interleaved pairs (its "normal" rope), HF as two halves, so
convert_hf_to_gguf.py permutes the rows of q_proj/k_proj per head; transformers' GGUF loader undoes that.
Qwen2 uses the NEOX (halves) rope in llama.cpp too, so its tensors are written as they are.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

import gguf
import torch

from quant.errors import UserError

ARCHITECTURES = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2"}
_MODEL_ARCH = {"llama": gguf.MODEL_ARCH.LLAMA, "qwen2": gguf.MODEL_ARCH.QWEN2}
_SKIP = re.compile(r"(rotary_emb\.inv_freq|\.masked_bias|\.attn\.bias)$")


def _get(cfg: dict, key: str, what: str):
    if cfg.get(key) is None:
        raise UserError(f"config.json: '{key}' is missing; it is needed for the GGUF {what}")
    return cfg[key]


def _rope(cfg: dict) -> tuple[float, dict]:
    """(theta, scaling dict or {}) from either config layout (transformers >= 5 `rope_parameters`, or
    `rope_theta` + `rope_scaling`)."""
    params = dict(cfg.get("rope_parameters") or {})
    scaling = dict(cfg.get("rope_scaling") or {})
    theta = cfg.get("rope_theta") or params.get("rope_theta") or 10000.0
    merged = {**params, **scaling}
    kind = merged.get("rope_type") or merged.get("type") or "default"
    return float(theta), ({} if kind == "default" else {**merged, "rope_type": kind})


@dataclass
class Arch:
    """A checkpoint's shape as llama.cpp sees it, and the HF -> GGUF tensor mapping."""

    hf_arch: str
    arch: str
    n_layer: int
    n_embd: int
    n_ff: int
    n_head: int
    n_head_kv: int
    head_dim: int
    n_vocab: int
    n_ctx: int
    rms_eps: float
    rope_theta: float
    rope_scaling: dict = field(default_factory=dict)
    tied: bool = False
    name: str = "model"
    _names: gguf.TensorNameMap | None = field(default=None, init=False, repr=False)

    @classmethod
    def from_config(cls, cfg: dict, name: str | None = None) -> "Arch":
        archs = cfg.get("architectures") or []
        hf_arch = next((a for a in archs if a in ARCHITECTURES), None)
        if hf_arch is None:
            raise UserError(f"config.json: architectures {archs or '(none)'} cannot be exported to GGUF yet; "
                            f"supported: {', '.join(ARCHITECTURES)}")
        n_head = _get(cfg, "num_attention_heads", "attention.head_count")
        n_embd = _get(cfg, "hidden_size", "embedding_length")
        theta, scaling = _rope(cfg)
        if scaling.get("rope_type") not in (None, "linear", "llama3", "yarn"):
            raise UserError(f"config.json: rope scaling {scaling['rope_type']!r} has no GGUF equivalent here "
                            "(supported: none, linear, llama3, yarn)")
        arch = cls(hf_arch=hf_arch, arch=ARCHITECTURES[hf_arch], n_layer=_get(cfg, "num_hidden_layers", "block_count"),
                   n_embd=n_embd, n_ff=_get(cfg, "intermediate_size", "feed_forward_length"), n_head=n_head,
                   n_head_kv=cfg.get("num_key_value_heads") or n_head,
                   head_dim=cfg.get("head_dim") or n_embd // n_head, n_vocab=_get(cfg, "vocab_size", "vocab_size"),
                   n_ctx=_get(cfg, "max_position_embeddings", "context_length"),
                   rms_eps=float(_get(cfg, "rms_norm_eps", "layer_norm_rms_epsilon")), rope_theta=theta,
                   rope_scaling=scaling, tied=bool(cfg.get("tie_word_embeddings", False)),
                   name=name or cfg.get("_name_or_path") or "model")
        arch._names = gguf.get_tensor_name_map(_MODEL_ARCH[arch.arch], arch.n_layer)
        return arch

    @property
    def permutes_qk(self) -> bool:
        return self.arch == "llama"

    @property
    def large(self) -> bool:
        """llama.cpp's LLM_TYPE_70B (which gets more bits for attn_v): 80 layers with grouped KV heads."""
        return self.n_layer == 80 and self.n_head_kv != self.n_head

    def gguf_name(self, hf_name: str) -> str | None:
        """The GGUF name of an HF tensor; None for tensors GGUF does not store (rotary caches, a tied head)."""
        if _SKIP.search(hf_name) or (self.tied and hf_name == "lm_head.weight"):
            return None
        name = self._names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if name is None or "attn_rot_embd" in name:
            raise UserError(f"tensor {hf_name!r} has no place in a GGUF {self.arch} model")
        return name

    def expected(self) -> list[str]:
        """Every tensor llama.cpp needs (biases are optional and not listed)."""
        per_layer = ("attn_norm", "attn_q", "attn_k", "attn_v", "attn_output", "ffn_norm", "ffn_gate", "ffn_up",
                     "ffn_down")
        names = ["token_embd.weight", "output_norm.weight"] + ([] if self.tied else ["output.weight"])
        return names + [f"blk.{i}.{t}.weight" for i in range(self.n_layer) for t in per_layer]

    def prepare(self, gguf_name: str, t: torch.Tensor) -> torch.Tensor:
        """The tensor as llama.cpp expects it: Llama-arch q/k rows permuted from halves to pairs per head."""
        if self.permutes_qk and (".attn_q." in gguf_name or ".attn_k." in gguf_name):
            heads = self.n_head if ".attn_q." in gguf_name else self.n_head_kv
            return t.reshape(heads, 2, t.shape[0] // heads // 2, *t.shape[1:]).swapaxes(1, 2).reshape(t.shape)
        return t

    def extra_tensors(self) -> list[tuple[str, torch.Tensor]]:
        """Tensors llama.cpp needs that the checkpoint does not hold: Llama-3 rope frequency factors."""
        if self.rope_scaling.get("rope_type") != "llama3":
            return []
        return [("rope_freqs.weight", llama3_rope_factors(self.rope_theta, self.head_dim, self.rope_scaling))]

    def metadata(self, w: gguf.GGUFWriter) -> None:
        w.add_name(self.name)
        w.add_context_length(self.n_ctx)
        w.add_embedding_length(self.n_embd)
        w.add_block_count(self.n_layer)
        w.add_feed_forward_length(self.n_ff)
        w.add_head_count(self.n_head)
        w.add_head_count_kv(self.n_head_kv)
        w.add_layer_norm_rms_eps(self.rms_eps)
        w.add_rope_freq_base(self.rope_theta)
        w.add_vocab_size(self.n_vocab)
        w.add_rope_dimension_count(self.head_dim)
        if self.head_dim != self.n_embd // self.n_head:
            w.add_key_length(self.head_dim)
            w.add_value_length(self.head_dim)
        kind = self.rope_scaling.get("rope_type")
        if kind in ("linear", "yarn"):
            w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR if kind == "linear" else gguf.RopeScalingType.YARN)
            w.add_rope_scaling_factor(float(self.rope_scaling["factor"]))
        if kind == "yarn" and self.rope_scaling.get("original_max_position_embeddings"):
            w.add_rope_scaling_orig_ctx_len(int(self.rope_scaling["original_max_position_embeddings"]))


def llama3_rope_factors(theta: float, head_dim: int, scaling: dict) -> torch.Tensor:
    """Per-frequency divisors of Llama-3.x rope scaling (transformers' `_compute_llama3_parameters`), which
    llama.cpp reads from `rope_freqs.weight`."""
    factor = float(scaling["factor"])
    low, high = float(scaling.get("low_freq_factor", 1.0)), float(scaling.get("high_freq_factor", 4.0))
    old_ctx = float(scaling.get("original_max_position_embeddings", 8192))
    factors = []
    for i in range(0, head_dim, 2):
        wavelen = 2 * math.pi * theta ** (i / head_dim)
        if wavelen < old_ctx / high:
            factors.append(1.0)
        elif wavelen > old_ctx / low:
            factors.append(factor)
        else:
            smooth = (old_ctx / wavelen - low) / (high - low)
            factors.append(1 / ((1 - smooth) / factor + smooth))
    return torch.tensor(factors, dtype=torch.float32)
