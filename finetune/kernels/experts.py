"""A MoE layer's experts with LoRA as grouped matrix products: tokens sorted by expert, one launch per product.

The per-expert loop (quant.moe.experts) makes 3 base and up to 4 LoRA products per expert that received tokens,
each a small launch on a GPU (Qwen3-30B-A3B: 128 experts, 48 layers). Here the (token, expert) pairs are sorted by
expert once per layer, every active expert's weights are dequantized together (the NF4 storage in two
bitsandbytes ops for the whole set), and each product runs as ONE grouped GEMM over the sorted rows: row segment
s is multiplied by expert s's matrix (`gmm`: Y_s = X_s W_sᵀ; `gmm_t`: Y_s = X_s W_s). The LoRA weight gradients
are per-segment reductions (`outer`: G_s = Y_sᵀ X_s). On CUDA with Triton these are the kernels of
finetune.kernels.experts_triton; elsewhere (and as their reference) the same functions in torch, one segment at
a time.

`GroupedLinear` is the autograd function of one fused projection: Y = X Wᵀ + b + s·(X Aᵀ) Bᵀ with W frozen and
dequantized again in backward (never kept), gradients for X, A and B. gate and up are one projection (their
weights joined in the fused order, so the gate_up adapter's rows line up), down another.
"""

from __future__ import annotations

import torch

from finetune.kernels.backend import use_triton
from quant.moe.experts import Adapter, MoEExperts
from quant.moe.layout import DOWN, GATE, GATE_UP, UP, join_pair, split_pair


def use_grouped(x: torch.Tensor) -> bool:
    """Whether the grouped kernels run for `x` (CUDA with Triton, or the Triton interpreter)."""
    return use_triton(x)


# ------------------------------------------------------------------------------------------ grouped products


def _segments(offsets: torch.Tensor) -> list[tuple[int, int]]:
    bounds = offsets.tolist()
    return list(zip(bounds[:-1], bounds[1:]))


def gmm(x: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor, transpose: bool = True) -> torch.Tensor:
    """Rows offsets[s]:offsets[s+1] of x [M, K] times w[s]ᵀ (w [S, N, K]) or, with transpose False, times w[s]
    (w [S, K, N]): [M, N] in x's dtype."""
    if use_triton(x):
        from finetune.kernels.experts_triton import grouped_mm

        return grouped_mm(x, w, offsets, transpose)
    n_out = w.shape[1] if transpose else w.shape[2]
    y = x.new_empty(x.shape[0], n_out)
    for s, (a, b) in enumerate(_segments(offsets)):
        y[a:b] = x[a:b] @ (w[s].T if transpose else w[s]).to(x.dtype)
    return y


def outer(y: torch.Tensor, x: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """Per segment s: y[a:b]ᵀ x[a:b] -> [S, Ny, Nx] in fp32 (the weight gradients of the segments' matrices)."""
    if use_triton(x):
        from finetune.kernels.experts_triton import grouped_outer

        return grouped_outer(y, x, offsets)
    return torch.stack([y[a:b].float().T @ x[a:b].float() for a, b in _segments(offsets)])


class GroupedLinear(torch.autograd.Function):
    """Y = X Wᵀ + b + scale·(X Aᵀ) Bᵀ per expert segment (see the module docstring).

    `weight()` returns the active experts' frozen W [S, N, K] in X's dtype, made on each call; `bias` [S, N] or
    None; A [S, r, K], B [S, N, r] (the active experts' adapter rows, gradients flow back to the full adapter) or
    None."""

    @staticmethod
    def forward(ctx, x, offsets, weight, bias, A, B, scale):
        y = gmm(x, weight(), offsets)
        if bias is not None:
            sizes = offsets[1:] - offsets[:-1]
            y += torch.repeat_interleave(bias.to(y.dtype), sizes, dim=0)
        p = None
        if A is not None:
            p = gmm(x, A.to(x.dtype), offsets)
            y += gmm(p, B.to(x.dtype), offsets) * scale
        ctx.weight, ctx.scale = weight, scale
        ctx.save_for_backward(x, offsets, A, B, p)
        return y

    @staticmethod
    def backward(ctx, dy):
        x, offsets, A, B, p = ctx.saved_tensors
        dy = dy.contiguous()
        dx = gmm(dy, ctx.weight(), offsets, transpose=False) if ctx.needs_input_grad[0] else None
        dA = dB = None
        if A is not None:
            dp = gmm(dy, B.to(dy.dtype), offsets, transpose=False) * ctx.scale  # [M, r]
            if dx is not None:
                dx += gmm(dp, A.to(dy.dtype), offsets, transpose=False)
            dA = outer(dp, x, offsets).to(A.dtype)  # [S, r, K]
            dB = (outer(dy, p, offsets) * ctx.scale).to(B.dtype)  # [S, N, r]
        return dx, None, None, None, dA, dB, None


# ------------------------------------------------------------------------------------------ the layer


def grouped_experts(experts: MoEExperts, hidden: torch.Tensor, top_k_index: torch.Tensor,
                    top_k_weights: torch.Tensor, adapters: dict[str, Adapter] | None = None) -> torch.Tensor:
    """What MoEExperts.forward computes (with `adapters`), through grouped products."""
    E, k = experts.num_experts, top_k_index.shape[-1]
    with torch.no_grad():
        flat = top_k_index.reshape(-1)
        order = torch.argsort(flat, stable=True)
        order = order[flat[order] < E]  # an index E marks "no expert" (transformers' expert-parallel masking)
        counts = torch.bincount(flat[order], minlength=E)
        active = counts.nonzero().flatten()
        offsets = torch.zeros(len(active) + 1, dtype=torch.long, device=hidden.device)
        offsets[1:] = torch.cumsum(counts[active], 0)
    tokens, pos = order // k, order % k
    chosen = active.tolist()
    spec, dtype = experts.spec, hidden.dtype
    x = hidden[tokens]

    def pick(adapter: Adapter | None):
        if adapter is None:
            return None, None, 1.0
        A, B, scale = adapter
        return A[active], B[active], scale

    def gate_up_weight():
        return join_pair(experts.weights(GATE, chosen, dtype), experts.weights(UP, chosen, dtype), 1,
                         spec.interleaved)

    gate_up_bias = None
    if spec.bias:
        gate_up_bias = join_pair(experts.bias(GATE, dtype), experts.bias(UP, dtype), 1, spec.interleaved)[active]
    adapters = adapters or {}
    h = GroupedLinear.apply(x, offsets, gate_up_weight, gate_up_bias, *pick(adapters.get(GATE_UP)))
    gate, up = split_pair(h, -1, spec.interleaved)
    h = experts.activate(gate, up)
    down_bias = experts.bias(DOWN, dtype)[active] if spec.bias else None
    y = GroupedLinear.apply(h.contiguous(), offsets, lambda: experts.weights(DOWN, chosen, dtype), down_bias,
                            *pick(adapters.get(DOWN)))
    y = y * top_k_weights[tokens, pos, None]
    out = torch.zeros_like(hidden)
    out.index_add_(0, tokens, y.to(out.dtype))
    return out
