"""Triton kernels of the grouped expert products (finetune.kernels.experts): one launch per product for all
experts of a layer.

`grouped_mm`: the rows of X are sorted by expert into segments; the launch grid is (row tiles, column tiles) where
every row tile lies inside one segment (a segment of n rows gets ceil(n / BLOCK_M) tiles, the last one masked), so
each program multiplies its rows by one expert's matrix, read through strides as Wᵀ or W. `grouped_outer`: one
program per (segment, output tile) accumulates Y_sᵀ X_s over the segment's rows (the weight gradients).
Accumulation is fp32; inputs in the caller's dtype (bf16/fp16 on GPUs; fp32 runs as TF32 in tl.dot).

Only finetune.kernels.experts imports this module, and only when Triton is importable.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK_M, BLOCK_N, BLOCK_K = 64, 64, 32


@triton.jit
def _grouped_mm(X, W, Y, TILE_SEG, TILE_ROW, OFFSETS, N, K, stride_xm, stride_xk, stride_ws, stride_wn, stride_wk,
                stride_ym, stride_yn, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    t = tl.program_id(0)
    seg = tl.load(TILE_SEG + t)
    row0 = tl.load(TILE_ROW + t)
    row_end = tl.load(OFFSETS + seg + 1)
    rm = row0 + tl.arange(0, BM)
    rn = tl.program_id(1) * BN + tl.arange(0, BN)
    rk = tl.arange(0, BK)
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    w_base = W + seg.to(tl.int64) * stride_ws
    for k0 in range(0, K, BK):
        kk = k0 + rk
        x = tl.load(X + rm[:, None].to(tl.int64) * stride_xm + kk[None, :] * stride_xk,
                    mask=(rm[:, None] < row_end) & (kk[None, :] < K), other=0.0)
        w = tl.load(w_base + rn[None, :] * stride_wn + kk[:, None] * stride_wk,
                    mask=(rn[None, :] < N) & (kk[:, None] < K), other=0.0)
        acc += tl.dot(x, w.to(x.dtype))
    tl.store(Y + rm[:, None].to(tl.int64) * stride_ym + rn[None, :] * stride_yn, acc.to(Y.dtype.element_ty),
             mask=(rm[:, None] < row_end) & (rn[None, :] < N))


@triton.jit
def _grouped_outer(A, B, G, OFFSETS, NA, NB, stride_am, stride_an, stride_bm, stride_bn, stride_gs, stride_ga,
                   stride_gb, BA: tl.constexpr, BB: tl.constexpr, BM: tl.constexpr):
    seg = tl.program_id(0)
    ra = tl.program_id(1) * BA + tl.arange(0, BA)
    rb = tl.program_id(2) * BB + tl.arange(0, BB)
    start = tl.load(OFFSETS + seg)
    end = tl.load(OFFSETS + seg + 1)
    acc = tl.zeros((BA, BB), dtype=tl.float32)
    for m0 in range(start, end, BM):
        rm = m0 + tl.arange(0, BM)
        a = tl.load(A + rm[None, :].to(tl.int64) * stride_am + ra[:, None] * stride_an,
                    mask=(rm[None, :] < end) & (ra[:, None] < NA), other=0.0)  # [BA, BM]
        b = tl.load(B + rm[:, None].to(tl.int64) * stride_bm + rb[None, :] * stride_bn,
                    mask=(rm[:, None] < end) & (rb[None, :] < NB), other=0.0)  # [BM, BB]
        acc += tl.dot(a, b.to(a.dtype))
    tl.store(G + seg.to(tl.int64) * stride_gs + ra[:, None] * stride_ga + rb[None, :] * stride_gb, acc,
             mask=(ra[:, None] < NA) & (rb[None, :] < NB))


def _tiles(offsets: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(segment, first row) of every row tile: ceil(n / block) tiles per segment of n rows."""
    sizes = offsets[1:] - offsets[:-1]
    per = (sizes + block - 1) // block
    seg = torch.repeat_interleave(torch.arange(len(sizes), device=offsets.device), per)
    first = torch.cumsum(per, 0) - per  # index of each segment's first tile
    within = torch.arange(len(seg), device=offsets.device) - first[seg]
    return seg.to(torch.int32), (offsets[:-1][seg] + within * block).to(torch.int32)


def grouped_mm(x: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor, transpose: bool = True) -> torch.Tensor:
    """See finetune.kernels.experts.gmm."""
    M, K = x.shape
    if transpose:  # w [S, N, K]: element (n, k) at n·stride(1) + k·stride(2)
        N, s_wn, s_wk = w.shape[1], w.stride(1), w.stride(2)
    else:  # w [S, K, N]: element (n, k) at k·stride(1) + n·stride(2)
        N, s_wn, s_wk = w.shape[2], w.stride(2), w.stride(1)
    y = torch.empty(M, N, dtype=x.dtype, device=x.device)
    if M == 0:
        return y
    seg, row = _tiles(offsets, BLOCK_M)
    grid = (len(seg), triton.cdiv(N, BLOCK_N))
    _grouped_mm[grid](x, w, y, seg, row, offsets, N, K, x.stride(0), x.stride(1), w.stride(0), s_wn, s_wk,
                      y.stride(0), y.stride(1), BM=BLOCK_M, BN=BLOCK_N, BK=BLOCK_K)
    return y


def grouped_outer(y: torch.Tensor, x: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """See finetune.kernels.experts.outer."""
    S, NA, NB = len(offsets) - 1, y.shape[1], x.shape[1]
    g = torch.empty(S, NA, NB, dtype=torch.float32, device=x.device)
    block_a = max(16, min(64, triton.next_power_of_2(NA)))
    block_b = max(16, min(64, triton.next_power_of_2(NB)))
    grid = (S, triton.cdiv(NA, block_a), triton.cdiv(NB, block_b))
    _grouped_outer[grid](y, x, g, offsets, NA, NB, y.stride(0), y.stride(1), x.stride(0), x.stride(1), g.stride(0),
                         g.stride(1), g.stride(2), BA=block_a, BB=block_b, BM=32)
    return g
