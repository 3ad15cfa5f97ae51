"""LoRA on a frozen (4-bit, GPTQ or plain) linear layer as one autograd function for a group of projections.

peft computes each adapted layer as base(x) (dequantize + GEMM, then a defensive copy), dropout, lora_A, lora_B,
a scale and an add: six full passes over the layer's output per forward, more in backward, and the input is read
again by every projection. `project(projs, x)` does the group (q/k/v, or gate/up, sharing x) in GEMMs only:

    forward    xa = x @ [A_1; ...; A_n]^T                     one skinny GEMM for the whole group
               y_j = x @ W_j^T (+ b_j);  y_j += s_j xa_j B_j^T  the LoRA term added in the GEMM epilogue
    backward   dxa_j = s_j dy_j B_j;  dB_j = s_j dy_j^T xa_j;  dA = dxa^T x
               dx = sum_j dy_j W_j + dxa [A_1; ...; A_n]       accumulated in place (beta = 1)

Saved for backward: x and the [tokens, n * r] xa; W_j is dequantized again in backward into the same reused
buffer as in forward (one layer's weight in bf16, never kept). How a base layer's weight is read as a dense tensor
is its format's answer (quant.formats.registry.frozen_weight). LoRA dropout is honoured: a projection with
dropout gets its own dropped input (made outside by `torch.native_dropout`, so autograd differentiates the
dropout) and its own skinny GEMM; what backward keeps of it is the dropout's bool mask, which autograd keeps for
the dropout anyway, and the dropped input is remade from x and that mask (peft keeps a full copy of the dropped
input per projection: on CPU in fp32, seven copies of the layer input per decoder layer). Numerics equal peft
under autocast up to rounding order (the sum is rounded once instead of three times).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import nn

from quant.formats.base import FrozenWeight
from quant.formats.registry import frozen_weight


@dataclass(eq=False)
class Projection:
    """One adapted linear layer: its frozen base and the single active LoRA adapter on it."""

    base: nn.Module
    frozen: FrozenWeight  # the base's weight as a dense tensor (quant.formats.registry.frozen_weight)
    A: nn.Parameter  # [r, in]
    B: nn.Parameter  # [out, r]
    scale: float
    dropout: nn.Module | None  # None: identity
    layer: nn.Module | None = None  # the peft LoRA layer, whose `disable_adapters` flag is read on every call

    @property
    def kind(self) -> str:
        """How the base's weight is read: 'dense', 'bnb4', 'packed' (the FrozenWeight's kind)."""
        return self.frozen.kind

    @property
    def enabled(self) -> bool:
        """False inside peft's `disable_adapter()` (the reference pass of preference training): then the layer
        computes what peft computes, its base alone."""
        return not getattr(self.layer, "disable_adapters", False)

    @property
    def out_features(self) -> int:
        return self.B.shape[0]

    @property
    def bias(self) -> torch.Tensor | None:
        return getattr(self.base, "bias", None)

    def weight(self, dtype: torch.dtype, slot: int = 0) -> torch.Tensor:
        """The frozen weight [out, in] in `dtype` (a view of a reused buffer for 4-bit bases on CUDA)."""
        return self.frozen(dtype, slot)


def projection_of(module: nn.Module) -> tuple[Projection | None, str]:
    """The Projection for a peft LoRA layer, or None and why the fused path cannot take it."""
    lora_a = getattr(module, "lora_A", None)
    if lora_a is None or not hasattr(module, "base_layer"):
        return None, f"{type(module).__name__} carries no LoRA adapter"
    if getattr(module, "disable_adapters", False) or getattr(module, "merged", False):
        return None, "adapters are disabled or merged"
    active = list(getattr(module, "active_adapters", []))
    if len(active) != 1 or active[0] not in lora_a:
        return None, f"{len(active)} active adapters (the fused path takes one)"
    name = active[0]
    if name in getattr(module, "lora_variant", {}) or getattr(module, "use_dora", {}).get(name, False):
        return None, "a LoRA variant (DoRA, ...) is active"
    frozen = frozen_weight(module.base_layer)
    if frozen is None:
        return None, f"base layer {type(module.base_layer).__name__} is not supported by the fused path"
    dropout = module.lora_dropout[name]
    p = getattr(dropout, "p", 0.0)
    return Projection(module.base_layer, frozen, lora_a[name].weight, module.lora_B[name].weight,
                      float(module.scaling[name]), dropout if p > 0 else None, module), "on"


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    device = x.device.type
    if torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return x.dtype


def no_autocast(t: torch.Tensor):
    """Inside the fused functions every operand is cast explicitly; autocast would only get in the way (it
    refuses out= arguments)."""
    return torch.autocast(t.device.type, enabled=False)


def lora_plus_base(p: Projection, x2d, W, xa, B, out=None) -> torch.Tensor:
    """x2d @ W^T (+ bias) + s xa B^T. The skinny LoRA product writes the output first (a memory-bound pass
    that has to happen once anyway); the compute-bound base GEMM then adds into it (beta = 1, in its epilogue)
    instead of a separate read-modify-write pass over the output after it."""
    sB = B * p.scale if p.scale != 1 else B
    bias = p.bias
    if bias is None:
        y = torch.mm(xa, sB.t(), out=out)
    else:
        y = torch.addmm(bias.to(x2d.dtype), xa, sB.t(), out=out)
    return y.addmm_(x2d, W.t())


class _Projections(torch.autograd.Function):
    @staticmethod
    def forward(ctx, projs, x2d, *tensors):
        with no_autocast(x2d):
            return _Projections._forward(ctx, projs, x2d, *tensors)

    @staticmethod
    def backward(ctx, *dys):
        # saved_tensors may be read once only (non-reentrant checkpointing refuses a second unpack)
        with torch.autocast(ctx.device_type, enabled=False):
            return _Projections._backward(ctx, *dys)

    @staticmethod
    def _forward(ctx, projs, x2d, *tensors):
        n = len(projs)
        As, Bs, xds, keeps = tensors[:n], tensors[n:2 * n], tensors[2 * n:3 * n], tensors[3 * n:]
        dtype = x2d.dtype
        shared = [j for j in range(n) if xds[j] is None]
        xas = [None] * n
        if shared:
            xa = x2d @ torch.cat([As[j] for j in shared]).to(dtype).t()
            start = 0
            for j in shared:
                r = As[j].shape[0]
                xas[j] = xa[:, start:start + r]
                start += r
        for j in range(n):
            if xds[j] is not None:
                xas[j] = xds[j] @ As[j].to(dtype).t()
        outs = [lora_plus_base(p, x2d, p.weight(dtype), xas[j], Bs[j].to(dtype)) for j, p in enumerate(projs)]
        ctx.projs, ctx.device_type = projs, x2d.device.type
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(x2d, *As, *Bs, *keeps, *xas)
        return tuple(outs)

    @staticmethod
    def _backward(ctx, *dys):
        projs = ctx.projs
        n = len(projs)
        saved = ctx.saved_tensors
        x2d, As, Bs, keeps, xas = saved[0], saved[1:1 + n], saved[1 + n:1 + 2 * n], saved[1 + 2 * n:1 + 3 * n], \
            saved[1 + 3 * n:]
        need = ctx.needs_input_grad
        need_x = need[1]
        dtype = x2d.dtype
        dx = None
        dA, dB, dxd, dxa = [None] * n, [None] * n, [None] * n, [None] * n
        for j, p in enumerate(projs):
            dy = dys[j]
            if dy is None:
                continue
            dxa[j] = (dy @ Bs[j].to(dtype)).mul_(p.scale)
            if need[2 + n + j]:
                dB[j] = (dy.t() @ xas[j]).mul_(p.scale).to(Bs[j].dtype)
        for j, p in enumerate(projs):
            if keeps[j] is not None and dxa[j] is not None:
                if need[2 + j]:
                    dA[j] = (dxa[j].t() @ dropped(x2d, keeps[j], p.dropout.p)).to(As[j].dtype)
                if need[2 + 2 * n + j]:
                    dxd[j] = dxa[j] @ As[j].to(dtype)
        shared = [j for j in range(n) if keeps[j] is None and dxa[j] is not None]
        if shared:
            g = torch.cat([dxa[j] for j in shared], dim=1) if len(shared) > 1 else dxa[shared[0]]
            if any(need[2 + j] for j in shared):
                full = g.t() @ x2d
                start = 0
                for j in shared:
                    r = As[j].shape[0]
                    dA[j] = full[start:start + r].to(As[j].dtype)
                    start += r
            if need_x:  # the skinny product first: the base GEMMs then add into it in their epilogue
                dx = g @ torch.cat([As[j] for j in shared]).to(dtype)
        if need_x:
            for j, p in enumerate(projs):
                if dys[j] is not None:
                    W = p.weight(dtype)
                    dx = dys[j] @ W if dx is None else dx.addmm_(dys[j], W)
        return (None, dx, *dA, *dB, *dxd, *([None] * n))


def dropped(x: torch.Tensor, keep: torch.Tensor, p: float) -> torch.Tensor:
    """What `torch.native_dropout(x, p, True)` returned with this mask, made again (its arithmetic exactly)."""
    return x.mul(keep.to(x.dtype)).mul_(1.0 / (1.0 - p))


def project(projs: Sequence[Projection], x: torch.Tensor) -> list[torch.Tensor]:
    """[x @ W_j^T + b_j + s_j dropout_j(x) A_j^T B_j^T for each projection j], with x [..., in]."""
    if not all(p.enabled for p in projs):  # adapters switched off: peft's base_layer(x), no dropout drawn
        return [project([p], x)[0] if p.enabled else p.base(x) for p in projs]
    dtype = compute_dtype(x)
    x = x.to(dtype)
    lead = x.shape[:-1]
    x2d = x.reshape(-1, x.shape[-1])
    xds, keeps = [], []
    for p in projs:
        if p.dropout is not None and p.dropout.training:
            xd, keep = torch.native_dropout(x2d, p.dropout.p, True)
        else:
            xd = keep = None
        xds.append(xd)
        keeps.append(keep)
    tensors = [p.A for p in projs] + [p.B for p in projs] + xds + keeps
    outs = _Projections.apply(tuple(projs), x2d, *tensors)
    return [y.view(*lead, y.shape[-1]) for y in outs]
