"""Put the fast path into a peft-wrapped model, per module instance, in place, as its family's description says
(quant.arch): Llama, Mistral, Qwen2, Qwen3, Gemma 3, Phi-3/4, Ministral 3, and the attention of Qwen3-MoE and
Mixtral.

What changes, each behind its own `train.*` switch (KernelOptions):
  fused_lora       q/k/v (or a fused qkv), o, and the MLP's projections through `lora.project` / `mlp.lora_mlp`
                   (peft's modules stay in the model, untouched, for saving and merging; only the forward computes
                   differently)
  triton_kernels   RMSNorm (Gemma's (1 + w) norms too, and q/k norms), rotary and SwiGLU through `pointwise`
  fused_attention  attention through `attention.attention`: cuDNN for plain rows, flash varlen for packed rows
  tiled_mlp        the SwiGLU MLP in 16k-token tiles from 32k tokens per micro-batch (`mlp` docstring)
  offload          checkpointed layer inputs in pinned host memory from 32k tokens (`offload` docstring)
What each family adds: q/k RMSNorm per head before the rotary embedding (Qwen3, Gemma 3), a fused qkv split into
q | k | v and a fused gate_up split into gate | up (Phi-3), a partial rotary embedding (Phi-4-mini), the query
scaled by position after the rotary embedding (Ministral 3), GeGLU (Gemma 3: torch arithmetic between the fused
projections), and sliding-window layers: the fused attention kernels take no window, so a layer whose window is
shorter than the sequence uses transformers' attention with the model's sliding mask. The decoder layer itself,
the embeddings (Gemma's scaling), the LM head and the loss are transformers' and ours as before. A forward with a
KV cache (generation) takes the original code. Anything the fast path cannot take (another architecture, int8
bases, DoRA, several adapters, attention sinks, experts) keeps the original module and is named in the report.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import torch
from torch import nn

from finetune.kernels.attention import attention, flash_supported, is_right_padding, segments
from finetune.kernels.backend import triton_importable as _triton_importable
from finetune.kernels.lora import Projection, project, projection_of
from finetune.kernels.mlp import lora_mlp
from finetune.kernels.offload import LayerCheckpoint
from finetune.kernels.pointwise import geglu, partial_rotary, rms_norm, rms_norm_offset, swiglu
from quant.arch import Architecture, describe
from quant.arch.parts import GELU_TANH, SILU
from quant.errors import UserError

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


@dataclass(eq=False)
class _Norm:
    """An RMSNorm as the description says it computes: weight, eps, offset (Gemma: 1.0)."""

    module: nn.Module
    offset: float

    @property
    def eps(self) -> float:
        m = self.module
        return m.variance_epsilon if hasattr(m, "variance_epsilon") else m.eps

    def __call__(self, x: torch.Tensor, kernels: bool) -> torch.Tensor:
        if self.offset:
            return rms_norm_offset(x, self.module.weight, self.eps, self.offset, kernels)
        return rms_norm(x, self.module.weight, self.eps, kernels)


def _norm_of(module: nn.Module | None, offset: float) -> _Norm | None:
    ok = module is not None and type(module).__name__.endswith("RMSNorm") and hasattr(module, "weight") and \
        (hasattr(module, "variance_epsilon") or hasattr(module, "eps"))
    return _Norm(module, offset) if ok else None


@dataclass(eq=False)
class _AttentionPlan:
    """One layer's attention as the fast path computes it."""

    projs: list[Projection] | None  # q, k, v (or the fused qkv) with LoRA; None: the modules themselves
    o: list[Projection] | None
    modules: list[nn.Module]  # q, k, v (or qkv), as called without fused LoRA
    o_module: nn.Module
    split: list[int] | None  # the fused qkv's output widths q | k | v
    q_norm: _Norm | None
    k_norm: _Norm | None
    window: int | None  # sliding-window layers: keys this far back at most
    position_scale: tuple[float, int] | None  # (beta, original context) of the llama-4 query scaling


def _hf_attention(module, q, k, v, attention_mask, kwargs):
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    impl = module.config._attn_implementation
    eager = getattr(__import__(type(module).__module__, fromlist=["_"]), "eager_attention_forward", None)
    iface = ALL_ATTENTION_FUNCTIONS.get_interface(impl, eager) if impl != "eager" else eager
    out, _ = iface(module, q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attention_mask,
                   dropout=0.0 if not module.training else module.attention_dropout, scaling=module.scaling, **kwargs)
    return out  # [B, T, H, D]


def _qkv(module, plan: _AttentionPlan, x):
    if plan.projs is not None:
        outs = project(plan.projs, x)
    else:
        outs = [m(x) for m in plan.modules]
    return outs[0].split(plan.split, dim=-1) if plan.split else outs


def _llama4_query_scale(position_ids: torch.Tensor, beta: float, original: int) -> torch.Tensor:
    """Ministral 3's per-position query scale, [B, T, 1, 1] for token-major q (transformers'
    get_llama_4_attn_scale)."""
    return (1 + beta * torch.log(1 + torch.floor(position_ids / original)))[:, :, None, None]


def _attention_forward(module, opts: KernelOptions, plan: _AttentionPlan, hidden_states, position_embeddings=None,
                       attention_mask=None, **kwargs):
    # transformers <= 5.17 names the KV cache past_key_values, later releases cache
    cache = kwargs.get("past_key_values", kwargs.get("cache"))
    if cache is not None or position_embeddings is None or hidden_states.shape[1] <= DECODE_ROWS:
        return type(module).forward(module, hidden_states, position_embeddings=position_embeddings,
                                    attention_mask=attention_mask, **kwargs)
    kwargs = {k: v for k, v in kwargs.items() if k not in ("past_key_values", "cache", "use_cache")}
    B, T, _ = hidden_states.shape
    D = module.head_dim
    q, k, v = _qkv(module, plan, hidden_states)
    q, k, v = q.view(B, T, -1, D), k.view(B, T, -1, D), v.view(B, T, -1, D)
    if plan.q_norm is not None:
        q, k = plan.q_norm(q, opts.triton), plan.k_norm(k, opts.triton)
    cos, sin = position_embeddings
    q, k = partial_rotary(q, cos, sin, opts.triton), partial_rotary(k, cos, sin, opts.triton)
    position_ids = kwargs.get("position_ids")
    if plan.position_scale is not None:
        q = q * _llama4_query_scale(position_ids, *plan.position_scale).to(q.dtype)
    windowed = plan.window is not None and T > plan.window  # the fused kernels take no window
    use_flash = (opts.fused_attention and not windowed and flash_supported(q)
                 and (module.attention_dropout == 0 or not module.training)
                 and (segments(position_ids, B, T, q.device).packed or is_right_padding(attention_mask)))
    if use_flash:
        out = attention(q, k, v, module.scaling, position_ids)
    else:
        if plan.window is not None:
            kwargs["sliding_window"] = plan.window
        out = _hf_attention(module, q, k, v, attention_mask, kwargs)
    out = out.reshape(B, T, -1)
    out = project(plan.o, out)[0] if plan.o is not None else plan.o_module(out)
    return out, None


def _mlp_forward(module, opts: KernelOptions, projs, x):
    """The SwiGLU MLP with separate gate/up/down (Llama and most families)."""
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


def _gated_mlp_forward(module, opts: KernelOptions, parts, projs, activation: str, x):
    """A gated MLP the fused SwiGLU function does not take: a fused gate_up (halves: gate, up), or GeGLU. The
    projections still go through `project` (fused LoRA); the activation is `pointwise`'s."""
    if x.numel() // x.shape[-1] <= DECODE_ROWS:
        return type(module).forward(module, x)
    *inputs, down = projs if projs is not None else [getattr(module, n) for n in parts]
    outs = project(inputs, x) if projs is not None else [m(x) for m in inputs]
    g, u = outs[0].chunk(2, dim=-1) if len(outs) == 1 else outs
    h = swiglu(g, u, opts.triton) if activation == SILU else geglu(g, u)
    return project([down], h)[0] if projs is not None else down(h)


def _norm_forward(norm: _Norm, kernels: bool, x):
    return norm(x, kernels)


def _projections(modules, report: InstallReport, where: str) -> list[Projection] | None:
    projs = []
    for m in modules:
        p, why = projection_of(m)
        if p is None:
            report.skipped.append((where, why))
            return None
        projs.append(p)
    return projs


def _attention_plan(arch: Architecture, i: int, attn: nn.Module, opts, report, where) -> _AttentionPlan | str:
    """The layer's attention plan, or why the fast path leaves it to transformers."""
    spec = arch.family.attention
    if spec.sinks:
        return "attention sinks"
    if not getattr(attn, "is_causal", True):
        return "non-causal attention"
    if arch.attn_softcap:
        return "attention logit soft-capping"
    names = [spec.qkv] if spec.qkv else [spec.q, spec.k, spec.v]
    modules = [getattr(attn, n, None) for n in names + [spec.o]]
    if any(m is None for m in modules) or not hasattr(attn, "scaling"):
        return f"attention has no {', '.join(n for n, m in zip(names + [spec.o], modules) if m is None)}"
    offset = arch.family.norms.offset
    q_norm = _norm_of(getattr(attn, spec.q_norm or "", None), offset) if spec.q_norm else None
    k_norm = _norm_of(getattr(attn, spec.k_norm or "", None), offset) if spec.k_norm else None
    if spec.q_norm and (q_norm is None or k_norm is None):
        return "q/k norms are not RMSNorm"
    projs = o = None
    if opts.fused_lora:
        projs = _projections(modules[:-1], report, where)
        o = _projections(modules[-1:], report, where)
        for name, got in (("qkv", projs), ("o", o)):
            if got is not None:
                report.count(f"fused LoRA {name}")
    hd, kv = arch.head_dim, arch.n_kv_head
    rope = arch.rope(arch.layer_type(i))
    scale = (float(rope["llama_4_scaling_beta"]), int(rope["original_max_position_embeddings"])) \
        if spec.query_position_scale == "llama4" else None
    return _AttentionPlan(projs, o, modules[:-1], modules[-1],
                          [arch.n_head * hd, kv * hd, kv * hd] if spec.qkv else None, q_norm, k_norm, arch.window(i),
                          scale)


def _install_mlp(arch: Architecture, i: int, mlp: nn.Module, opts, report, where) -> str | None:
    spec = arch.family.mlp
    if spec is None or arch.moe_layers[i]:
        return "the MLP is a mixture of experts"
    parts = spec.projections
    if any(getattr(mlp, n, None) is None for n in parts):
        return f"MLP has no {', '.join(n for n in parts if getattr(mlp, n, None) is None)}"
    if spec.activation not in (SILU, GELU_TANH):
        return f"MLP activation {spec.activation}"
    projs = _projections([getattr(mlp, n) for n in parts], report, where) if opts.fused_lora else None
    if projs is not None:
        report.count("fused LoRA mlp")
    if spec.gate_up is None and spec.activation == SILU:
        mlp.forward = functools.partial(_mlp_forward, mlp, opts, projs)
    else:
        mlp.forward = functools.partial(_gated_mlp_forward, mlp, opts, parts, projs, spec.activation)
    return None


def _architecture(model: nn.Module) -> Architecture | str:
    config = getattr(model, "config", None)
    if config is None:
        return f"{type(model).__name__} has no config"
    try:
        return describe(config)
    except UserError as e:
        return str(e)


def _base(model: nn.Module) -> nn.Module:
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def install(model: nn.Module, opts: KernelOptions) -> InstallReport:
    """Patch every supported decoder layer of `model` (after peft's get_peft_model) for `opts`."""
    report = InstallReport()
    if not opts.anything:
        return report
    arch = _architecture(model)
    if isinstance(arch, str):
        report.skipped.append(("model", arch))
        return report
    base = _base(model)
    norms = arch.family.norms
    for i, layer in enumerate(base.get_submodule(arch.blocks)):
        where = f"layer {i}"
        block_norms = [_norm_of(getattr(layer, n, None), norms.offset) for n in norms.names]
        if any(n is None for n in block_norms):
            report.skipped.append((where, "norms are not RMSNorm"))
            continue
        plan = _attention_plan(arch, i, layer.self_attn, opts, report, where)
        if isinstance(plan, str):
            report.skipped.append((where, plan))
            continue
        layer.self_attn.forward = functools.partial(_attention_forward, layer.self_attn, opts, plan)
        why = _install_mlp(arch, i, layer.get_submodule(arch.family.mlp.path if arch.family.mlp else "mlp"), opts,
                           report, where)
        if why:
            report.skipped.append((f"{where} MLP", why))
        for norm in block_norms:
            norm.module.forward = functools.partial(_norm_forward, norm, opts.triton)
        if getattr(layer, "gradient_checkpointing", False):
            layer._gradient_checkpointing_func = LayerCheckpoint(opts.offload_min_tokens)
            if opts.offload_min_tokens is not None:
                report.count("offloadable checkpoint")
        report.layers += 1
    final = _norm_of(getattr(base.get_submodule(arch.decoder), norms.final, None), norms.offset)
    if report.layers and final is not None:
        final.module.forward = functools.partial(_norm_forward, final, opts.triton)
    if report.layers:
        if opts.triton:
            report.pointwise = "Triton kernels" if _triton_importable() else "torch (no Triton here)"
        if opts.fused_attention:
            report.attention = "cuDNN / flash varlen for packed rows (CUDA, bf16/fp16; else transformers')"
    return report
