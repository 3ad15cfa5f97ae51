"""Put the fast path into a peft-wrapped Llama-family model (Llama, Mistral, Qwen2): per module instance, in place.

What changes, each behind its own `train.*` switch (KernelOptions):
  fused_lora       q/k/v, o, and the gate/up/down MLP through `lora.project` / `mlp.lora_mlp` (peft's modules
                   stay in the model, untouched, for saving and merging; only the forward computes differently)
  triton_kernels   RMSNorm, rotary and SwiGLU through `pointwise` (Triton forward + backward)
  fused_attention  attention through `attention.attention`: cuDNN for plain rows, flash varlen for packed rows
  tiled_mlp        the MLP in 16k-token tiles from 32k tokens per micro-batch (`mlp` docstring)
  offload          checkpointed layer inputs in pinned host memory from 32k tokens (`offload` docstring)
The decoder layer itself, the embeddings, the LM head and the loss are transformers' and ours as before. A
forward with a KV cache (generation) takes the original code. Anything the fast path cannot take (another
architecture, int8 bases, DoRA, several adapters) keeps the original module and is named in the report.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import torch
from torch import nn

from finetune.kernels.backend import triton_importable as _triton_importable
from finetune.kernels.attention import attention, flash_supported, is_right_padding, segments
from finetune.kernels.lora import Projection, project, projection_of
from finetune.kernels.mlp import lora_mlp
from finetune.kernels.offload import LayerCheckpoint
from finetune.kernels.pointwise import rms_norm, rotary, swiglu

LONG_TOKENS = 32768  # micro-batches of at least this many tokens count as long context (tiling, offload)
MLP_TILE = 16384
DECODE_ROWS = 16  # at most this many tokens (decoding): the original modules (bitsandbytes' 4-bit GEMV kernels)


@dataclass
class KernelOptions:
    fused_lora: bool = True
    triton: bool = True
    fused_attention: bool = True
    mlp_tile: int | None = MLP_TILE  # tokens per MLP tile, None: never tile
    mlp_tile_above: int = LONG_TOKENS  # tile only micro-batches with more tokens than this
    offload_min_tokens: int | None = LONG_TOKENS  # None: never offload, 0: always

    @property
    def anything(self) -> bool:
        return self.fused_lora or self.triton or self.fused_attention or self.offload_min_tokens is not None

    @classmethod
    def from_train(cls, cfg, distributed: bool = False) -> "KernelOptions":
        """From a TrainConfig; 'auto' offload is off across processes (its reentrant backward and DDP's hooks)."""
        offload = cfg.offload_checkpoints
        tiled = cfg.tiled_mlp
        return cls(
            fused_lora=cfg.fused_lora,
            triton=cfg.triton_kernels,
            fused_attention=cfg.fused_attention,
            mlp_tile=None if tiled is False else MLP_TILE,
            mlp_tile_above=0 if tiled is True else LONG_TOKENS,
            offload_min_tokens=(0 if offload is True else None if offload is False or distributed else LONG_TOKENS),
        )


@dataclass
class InstallReport:
    layers: int = 0
    fused: dict = field(default_factory=dict)  # what -> number of layers
    pointwise: str = "transformers"  # who computes RMSNorm / rotary / SwiGLU
    attention: str = "transformers"
    skipped: list = field(default_factory=list)  # (where, why)

    def summary(self) -> str:
        if not self.layers:
            return "off" + (f" ({self.skipped[0][1]})" if self.skipped else "")
        parts = [f"{k} x{v}" for k, v in self.fused.items()]
        parts += [f"RMSNorm/rotary/SwiGLU: {self.pointwise}", f"attention: {self.attention}"]
        text = f"{self.layers} decoder layers: " + ", ".join(parts)
        if self.skipped:
            where, why = self.skipped[0]
            more = ", ..." if len(self.skipped) > 1 else ""
            text += f"; kept as they were: {len(self.skipped)} ({where}: {why}{more})"
        return text

    def count(self, what: str) -> None:
        self.fused[what] = self.fused.get(what, 0) + 1


def _attention_ok(attn: nn.Module) -> str | None:
    for name in ("q_proj", "k_proj", "v_proj", "o_proj", "head_dim", "scaling"):
        if not hasattr(attn, name):
            return f"attention has no {name}"
    if hasattr(attn, "q_norm") or hasattr(attn, "k_norm"):
        return "attention normalises q/k"
    if getattr(attn, "sliding_window", None) is not None:
        return "sliding-window attention"
    if not getattr(attn, "is_causal", True):
        return "non-causal attention"
    return None


def _mlp_ok(mlp: nn.Module) -> str | None:
    for name in ("gate_proj", "up_proj", "down_proj", "act_fn"):
        if not hasattr(mlp, name):
            return f"MLP has no {name}"
    if type(mlp.act_fn).__name__ not in ("SiLU", "SiLUActivation"):
        return f"MLP activation {type(mlp.act_fn).__name__}, not SiLU"
    return None


def _norm_ok(norm: nn.Module) -> bool:
    return type(norm).__name__.endswith("RMSNorm") and hasattr(norm, "variance_epsilon") and hasattr(norm, "weight")


def _projections(modules, report: InstallReport, where: str) -> list[Projection] | None:
    projs = []
    for m in modules:
        p, why = projection_of(m)
        if p is None:
            report.skipped.append((where, why))
            return None
        projs.append(p)
    return projs


def _hf_attention(module, q, k, v, attention_mask, kwargs):
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    impl = module.config._attn_implementation
    eager = getattr(__import__(type(module).__module__, fromlist=["_"]), "eager_attention_forward", None)
    iface = ALL_ATTENTION_FUNCTIONS.get_interface(impl, eager) if impl != "eager" else eager
    out, _ = iface(module, q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attention_mask,
                   dropout=0.0 if not module.training else module.attention_dropout, scaling=module.scaling, **kwargs)
    return out  # [B, T, H, D]


def _attention_forward(module, opts: KernelOptions, qkv, o, hidden_states, position_embeddings=None,
                       attention_mask=None, **kwargs):
    # transformers <= 5.17 names the KV cache past_key_values, later releases cache
    cache = kwargs.get("past_key_values", kwargs.get("cache"))
    if cache is not None or position_embeddings is None or hidden_states.shape[1] <= DECODE_ROWS:
        return type(module).forward(module, hidden_states, position_embeddings=position_embeddings,
                                    attention_mask=attention_mask, **kwargs)
    kwargs = {k: v for k, v in kwargs.items() if k not in ("past_key_values", "cache")}
    B, T, _ = hidden_states.shape
    D = module.head_dim
    if qkv is not None:
        q, k, v = project(qkv, hidden_states)
    else:
        q, k, v = module.q_proj(hidden_states), module.k_proj(hidden_states), module.v_proj(hidden_states)
    q, k, v = q.view(B, T, -1, D), k.view(B, T, -1, D), v.view(B, T, -1, D)
    cos, sin = position_embeddings
    q, k = rotary(q, cos, sin, opts.triton), rotary(k, cos, sin, opts.triton)
    position_ids = kwargs.get("position_ids")
    use_flash = (opts.fused_attention and flash_supported(q)
                 and (module.attention_dropout == 0 or not module.training)
                 and (segments(position_ids, B, T, q.device).packed or is_right_padding(attention_mask)))
    if use_flash:
        out = attention(q, k, v, module.scaling, position_ids)
    else:
        out = _hf_attention(module, q, k, v, attention_mask, kwargs)
    out = out.reshape(B, T, -1)
    out = project(o, out)[0] if o is not None else module.o_proj(out)
    return out, None


def _mlp_forward(module, opts: KernelOptions, projs, x):
    kernels = opts.triton
    tokens = x.numel() // x.shape[-1]
    if tokens <= DECODE_ROWS:
        return type(module).forward(module, x)
    tile = opts.mlp_tile if opts.mlp_tile and tokens > opts.mlp_tile_above else None
    if projs is not None and (tile is None or all(p.dropout is None for p in projs)):
        return lora_mlp(*projs, x, tile, kernels)  # dropout only untiled (finetune/kernels/mlp.py)
    if projs is not None:
        g, u = project(projs[:2], x)
        return project(projs[2:], swiglu(g, u, kernels))[0]
    return module.down_proj(swiglu(module.gate_proj(x), module.up_proj(x), kernels))


def _norm_forward(module, kernels: bool, x):
    return rms_norm(x, module.weight, module.variance_epsilon, kernels)


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if all(hasattr(m, a) for a in
                                              ("self_attn", "mlp", "input_layernorm", "post_attention_layernorm"))]


def install(model: nn.Module, opts: KernelOptions) -> InstallReport:
    """Patch every supported decoder layer of `model` (after peft's get_peft_model) for `opts`."""
    report = InstallReport()
    if not opts.anything:
        return report
    layers = decoder_layers(model)
    if not layers:
        report.skipped.append(("model", f"no Llama-style decoder layers in {type(model).__name__}"))
        return report
    for i, layer in enumerate(layers):
        where = f"layer {i}"
        why = _attention_ok(layer.self_attn) or _mlp_ok(layer.mlp)
        if why or not (_norm_ok(layer.input_layernorm) and _norm_ok(layer.post_attention_layernorm)):
            report.skipped.append((where, why or "norms are not RMSNorm"))
            continue
        attn, mlp = layer.self_attn, layer.mlp
        qkv = o = mlp_projs = None
        if opts.fused_lora:
            qkv = _projections([attn.q_proj, attn.k_proj, attn.v_proj], report, where)
            o = _projections([attn.o_proj], report, where)
            mlp_projs = _projections([mlp.gate_proj, mlp.up_proj, mlp.down_proj], report, where)
            for name, got in (("qkv", qkv), ("o", o), ("mlp", mlp_projs)):
                if got is not None:
                    report.count(f"fused LoRA {name}")
        attn.forward = functools.partial(_attention_forward, attn, opts, qkv, o)
        mlp.forward = functools.partial(_mlp_forward, mlp, opts, mlp_projs)
        for norm in (layer.input_layernorm, layer.post_attention_layernorm):
            norm.forward = functools.partial(_norm_forward, norm, opts.triton)
        if getattr(layer, "gradient_checkpointing", False):
            layer._gradient_checkpointing_func = LayerCheckpoint(opts.offload_min_tokens)
            if opts.offload_min_tokens is not None:
                report.count("offloadable checkpoint")
        report.layers += 1
    for m in model.modules():  # the final norm
        if _norm_ok(m) and not isinstance(m.__dict__.get("forward"), functools.partial):
            m.forward = functools.partial(_norm_forward, m, opts.triton)
    if report.layers:
        if opts.triton:
            report.pointwise = "Triton kernels" if _triton_importable() else "torch (no Triton here)"
        if opts.fused_attention:
            report.attention = "cuDNN / flash varlen for packed rows (CUDA, bf16/fp16; else transformers')"
    return report
