"""Triton AWQ matrix-vector kernel for decode: x [a few rows, K] against an AWQ "gemm" layer, read straight
from the checkpoint tensors (qweight int32 [K, N/8], qzeros int32 [G, N/8], scales [G, N]; docs/awq-format.md).

Each program streams the packed words of BLOCK_N output columns once, unpacks the eight nibbles of every word
with shifts in registers and reduces over K with plain multiply-adds: at one row the work is bound by reading the
weight, and 4-bit codes are a quarter of the bytes of a bf16 weight. A block of BLOCK_K rows lies in one group
(BLOCK_K divides the group size), so the scale and zero point are applied once per block:
sum_k x_k (q_kn - z_n) s_n = s_n (sum_k x_k q_kn - z_n sum_k x_k). Nibble i of a word holds column 8c + AWQ_ORDER[i]
of its run of eight; the kernel keeps the nibble order and writes each result to its column. Programs split K
(fp32 atomics) when N alone gives too few of them to fill the GPU.

The torch reference (`quant.awq.kernels.awq_dequantize`, then a GEMM) is the CPU path and what this kernel is
tested against (on CPU under TRITON_INTERPRET=1). Only AWQLinear imports this module, for CUDA inputs.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from quant.packed import gemv_block_k, gemv_split


@triton.jit
def awq_gemv_kernel(x_ptr, qw_ptr, qz_ptr, sc_ptr, y_ptr, N, K, group_size, s_xm, s_qwk, s_qzg, s_sg, s_ym,
                    SPLIT_K: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    WORDS: tl.constexpr = BLOCK_N // 8  # packed words per row of the program's columns
    pid_n, pid_k, m = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    cols = pid_n * WORDS + tl.arange(0, WORDS)
    wmask = cols < N // 8
    nib = tl.arange(0, 8)
    shifts = (nib * 4).to(tl.uint32)
    offs_n = cols[:, None] * 8 + ((nib % 4) * 2 + nib // 4)[None, :]  # [WORDS, 8]: column of each nibble
    nmask = wmask[:, None] & (offs_n < N)
    acc = tl.zeros((WORDS, 8), dtype=tl.float32)
    k_share = tl.cdiv(tl.cdiv(K, BLOCK_K), SPLIT_K) * BLOCK_K
    k_lo = pid_k * k_share
    k_hi = tl.minimum(k_lo + k_share, K)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        kmask = offs_k < K
        w = tl.load(qw_ptr + offs_k[:, None] * s_qwk + cols[None, :], mask=kmask[:, None] & wmask[None, :], other=0)
        q = ((w.to(tl.uint32, bitcast=True)[:, :, None] >> shifts[None, None, :]) & 0xF).to(tl.float32)
        x = tl.load(x_ptr + m * s_xm + offs_k, mask=kmask, other=0.0).to(tl.float32)  # 0 past K: masks q
        g = k0 // group_size
        s = tl.load(sc_ptr + g * s_sg + offs_n, mask=nmask, other=0.0).to(tl.float32)
        zw = tl.load(qz_ptr + g * s_qzg + cols, mask=wmask, other=0)
        z = ((zw.to(tl.uint32, bitcast=True)[:, None] >> shifts[None, :]) & 0xF).to(tl.float32)
        xq = tl.sum(x[:, None, None] * q, axis=0)
        acc += s * (xq - z * tl.sum(x, axis=0))
    if SPLIT_K == 1:
        tl.store(y_ptr + m * s_ym + offs_n, acc.to(y_ptr.dtype.element_ty), mask=nmask)
    else:
        tl.atomic_add(y_ptr + m * s_ym + offs_n, acc, mask=nmask)


def gemv_config(N: int, K: int, group_size: int, device: torch.device) -> tuple[int, int, int] | None:
    """(BLOCK_N, BLOCK_K, SPLIT_K): 64 columns a program, K in blocks that lie in one group (quant.packed.gemv_block_k),
    K split across programs as gemv_split says; None when no block of at least 8 rows divides the group size."""
    block_k = gemv_block_k(group_size, K, 8)
    if block_k is None:
        return None
    return 64, block_k, gemv_split(triton.cdiv(N, 64), triton.cdiv(K, block_k), device)


def awq_gemv(x: torch.Tensor, qweight, qzeros, scales, group_size: int,
             config: tuple[int, int, int] | None = None) -> torch.Tensor:
    """x [..., K] @ W -> [..., N] in x.dtype for a few rows of x; `config` = (BLOCK_N, BLOCK_K, SPLIT_K)."""
    K, N = qweight.shape[0], scales.shape[1]
    lead = x.shape[:-1]
    x2 = x.reshape(-1, K)
    M = x2.shape[0]
    config = config or gemv_config(N, K, group_size, x.device)
    if config is None or config[1] % 8 or (group_size < K and group_size % config[1]):
        raise ValueError(f"no block of K rows (a power of two >= 8) divides the group size {group_size}")
    block_n, block_k, split = config
    y = torch.zeros(M, N, dtype=torch.float32, device=x.device) if split > 1 else \
        torch.empty(M, N, dtype=x.dtype, device=x.device)
    if M:
        awq_gemv_kernel[(triton.cdiv(N, block_n), split, M)](
            x2, qweight, qzeros, scales, y, N, K, group_size,
            x2.stride(0), qweight.stride(0), qzeros.stride(0), scales.stride(0), y.stride(0),
            SPLIT_K=split, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=4)
    return y.to(x.dtype).reshape(*lead, N)
