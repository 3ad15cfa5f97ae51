"""From a Hugging Face config to what llama.cpp reads: architecture metadata, and which tensors it needs.

The family comes from its description (quant.arch: `describe`), which also names llama.cpp's architecture for it;
tensor names and layouts are quant.ggml.tensors'. Per family, what llama.cpp needs beyond a Llama:
- qwen3 / qwen3moe: q/k norms; experts' count, per-token count and width (llama.cpp always renormalises the top-k
  weights and has no dense layers in qwen3moe: other configs are refused);
- gemma3: four norms per block, the sliding-window pattern per layer and both rope bases, the final logit
  soft-cap; llama.cpp scales attention by head_dim**-0.5 (the 62-layer 27B: (hidden/heads)**-0.5), so another
  query_pre_attn_scalar is refused, as is attention soft-capping (llama.cpp asserts it is unset);
- phi3: the fused qkv and gate_up as they are, partial rotary dims, longrope's factor tensors;
- mistral3 (Ministral 3): yarn with its log multiplier and the llama-4 query temperature;
- gpt-oss: sinks, biases, the sliding pattern, yarn; llama.cpp hard-codes the clamped SwiGLU's alpha 1.702 and
  limit 7.0 and needs an untied head.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import gguf
import torch

from quant.arch import SLIDING, Architecture, describe
from quant.errors import UserError
from quant.ggml.tensors import Target, TensorMap

_MODEL_ARCH = {gguf.MODEL_ARCH_NAMES[a]: a for a in gguf.MODEL_ARCH}
_ROPE = {"linear": gguf.RopeScalingType.LINEAR, "yarn": gguf.RopeScalingType.YARN}
_NEEDED = (("num_hidden_layers", "block_count"), ("hidden_size", "embedding_length"),
           ("intermediate_size", "feed_forward_length"), ("num_attention_heads", "attention.head_count"),
           ("vocab_size", "vocab_size"), ("max_position_embeddings", "context_length"),
           ("rms_norm_eps", "layer_norm_rms_epsilon"))


def _check_keys(cfg: dict) -> None:
    text = cfg.get("text_config") if isinstance(cfg.get("text_config"), dict) else cfg
    for key, what in _NEEDED:
        if text.get(key) is None:
            raise UserError(f"config.json: '{key}' is missing; it is needed for the GGUF {what}")


def _refusal(d: Architecture, cfg) -> str | None:
    """Why llama.cpp cannot reproduce this model, or None."""
    name = d.family.name
    if name in ("qwen3", "qwen3_moe", "qwen2") and SLIDING in d.layer_types:
        return "sliding-window layers (llama.cpp runs every layer of this architecture with full attention)"
    if name == "gemma3":
        if d.attn_softcap:
            return f"attn_logit_softcapping = {d.attn_softcap} (llama.cpp's gemma3 has none)"
        if getattr(cfg, "use_bidirectional_attention", False):
            return "use_bidirectional_attention"
        expected = (d.hidden // d.n_head) if d.n_layer == 62 else d.head_dim
        if cfg.query_pre_attn_scalar != expected:
            return (f"query_pre_attn_scalar = {cfg.query_pre_attn_scalar} (llama.cpp scales attention by "
                    f"{expected}**-0.5 for this shape)")
    if name == "qwen3_moe" and not all(d.moe_layers):
        return "dense MLP layers (mlp_only_layers / decoder_sparse_step): llama.cpp's qwen3moe has experts everywhere"
    if d.family.router is not None and not d.family.router.always_renormalize and d.family.router.renormalize \
            and not d.renormalize:
        return f"{d.family.router.renormalize} = False (llama.cpp renormalises the top-k expert weights)"
    if name == "gpt_oss":
        if (cfg.swiglu_alpha, cfg.swiglu_limit) != (1.702, 7.0):
            return f"swiglu_alpha/limit {cfg.swiglu_alpha}/{cfg.swiglu_limit} (llama.cpp hard-codes 1.702/7.0)"
        if d.tied:
            return "tied embeddings (llama.cpp's gpt-oss reads its own output.weight)"
    return None


@dataclass
class Arch:
    """A checkpoint's shape as llama.cpp sees it, and the HF -> GGUF tensor mapping."""

    desc: Architecture
    arch: str
    n_ctx: int
    rms_eps: float
    name: str = "model"
    tensors: TensorMap = field(init=False, repr=False)

    def __post_init__(self):
        self.tensors = TensorMap(self.desc, _MODEL_ARCH[self.arch])

    @classmethod
    def from_config(cls, cfg: dict, name: str | None = None) -> "Arch":
        _check_keys(cfg)
        d = describe(cfg)
        if d.family.gguf is None:
            raise UserError(f"config.json: {d.hf_class} has no llama.cpp architecture")
        why = _refusal(d, d.config)
        if why:
            raise UserError(f"config.json: a {d.family.title} model with {why} cannot be exported to GGUF")
        scaling = rope_scaling(d.rope())
        if scaling.get("rope_type") not in (None, "linear", "llama3", "yarn", "longrope"):
            raise UserError(f"config.json: rope scaling {scaling['rope_type']!r} has no GGUF equivalent here "
                            "(supported: none, linear, llama3, yarn, longrope)")
        return cls(desc=d, arch=d.family.gguf, n_ctx=d.config.max_position_embeddings,
                   rms_eps=float(d.config.rms_norm_eps), name=name or cfg.get("_name_or_path") or "model")

    # the shape as the writer and the mix read it
    hf_arch = property(lambda self: self.desc.hf_class)
    n_layer = property(lambda self: self.desc.n_layer)
    n_embd = property(lambda self: self.desc.hidden)
    n_ff = property(lambda self: self.desc.intermediate)
    n_head = property(lambda self: self.desc.n_head)
    n_head_kv = property(lambda self: self.desc.n_kv_head)
    head_dim = property(lambda self: self.desc.head_dim)
    n_vocab = property(lambda self: self.desc.vocab)
    tied = property(lambda self: self.desc.tied)
    n_expert = property(lambda self: self.desc.n_experts)

    @property
    def rope_theta(self) -> float:
        return float(self.desc.rope()["rope_theta"])

    @property
    def rope_scaling(self) -> dict:
        return rope_scaling(self.desc.rope())

    @property
    def large(self) -> bool:
        """llama.cpp's LLM_TYPE_70B (which gets more bits for attn_v): 80 layers with grouped KV heads."""
        return self.n_layer == 80 and self.n_head_kv != self.n_head

    def targets(self, hf_name: str) -> list[Target]:
        return self.tensors.targets(hf_name)

    def gguf_name(self, hf_name: str) -> str | None:
        """The (first) GGUF name of an HF tensor; None for tensors GGUF does not store (rotary caches, a tied head)."""
        found = self.targets(hf_name)
        return found[0].name if found else None

    def expected(self) -> list[str]:
        return self.tensors.expected()

    def extra_tensors(self) -> list[tuple[str, torch.Tensor]]:
        """Tensors llama.cpp needs that the checkpoint does not hold: Llama-3 rope frequency factors, longrope's."""
        kind = self.rope_scaling.get("rope_type")
        if kind == "llama3":
            return [("rope_freqs.weight", llama3_rope_factors(self.rope_theta, self.head_dim, self.rope_scaling))]
        if kind == "longrope":
            return [(f"rope_factors_{k}.weight", torch.tensor(self.rope_scaling[f"{k}_factor"], dtype=torch.float32))
                    for k in ("long", "short")]
        return []

    def metadata(self, w: gguf.GGUFWriter) -> None:
        d = self.desc
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
        w.add_rope_dimension_count(d.rotary_dim)
        if self.head_dim != self.n_embd // self.n_head:
            w.add_key_length(self.head_dim)
            w.add_value_length(self.head_dim)
        _rope_metadata(w, self.rope_scaling, self.n_ctx)
        if d.n_experts:
            w.add_expert_count(d.n_experts)
            w.add_expert_used_count(d.top_k)
            if self.arch != "llama":
                w.add_expert_feed_forward_length(d.expert_intermediate)
        if d.sliding_window is not None or self.arch == "phi3":
            w.add_sliding_window(d.sliding_window or 0)
        if self.arch in ("gemma3", "gpt-oss"):
            w.add_sliding_window_pattern([t == SLIDING for t in d.layer_types])
        if self.arch == "gemma3":
            w.add_rope_freq_base_swa(float(d.rope(SLIDING)["rope_theta"]))
            if d.final_softcap:
                w.add_final_logit_softcapping(float(d.final_softcap))
        if d.family.attention.query_position_scale == "llama4":
            rope = d.rope()
            w.add_rope_scaling_yarn_log_mul(float(rope.get("mscale_all_dim") or 0.0))
            w.add_attn_temperature_scale(float(rope["llama_4_scaling_beta"]))


def rope_scaling(params: dict) -> dict:
    """The rope parameters' scaling part ({} for plain rope), its kind under 'rope_type'."""
    kind = params.get("rope_type") or params.get("type") or "default"
    return {} if kind == "default" else {**params, "rope_type": kind}


def _rope_metadata(w: gguf.GGUFWriter, scaling: dict, n_ctx: int) -> None:
    kind = scaling.get("rope_type")
    orig = scaling.get("original_max_position_embeddings")
    if kind in _ROPE:
        w.add_rope_scaling_type(_ROPE[kind])
        w.add_rope_scaling_factor(float(scaling["factor"]))
    if kind == "yarn":
        if orig:
            w.add_rope_scaling_orig_ctx_len(int(orig))
        for key, add in (("beta_fast", w.add_rope_scaling_yarn_beta_fast), ("beta_slow", w.add_rope_scaling_yarn_beta_slow)):
            if scaling.get(key) is not None:
                add(float(scaling[key]))
    if kind == "longrope":
        # transformers' longrope: cos/sin scaled by sqrt(1 + ln(s) / ln(orig)), s = context / orig (unless given)
        s = n_ctx / orig
        factor = scaling.get("attention_factor") or (1.0 if s <= 1 else math.sqrt(1 + math.log(s) / math.log(orig)))
        w.add_rope_scaling_attn_factors(float(factor))
        w.add_rope_scaling_orig_ctx_len(int(orig))


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
