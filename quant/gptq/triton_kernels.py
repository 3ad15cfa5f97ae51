"""Triton GPTQ kernels with the signatures of the torch reference in `quant.gptq.kernels`.

`gptq_matmul` fuses dequantization into the matmul: each program dequantizes a [BLOCK_K, BLOCK_N] tile
of W in registers and feeds it to tl.dot, so the float weight never exists in memory. That is the win
for decode-sized inputs; above FUSED_MAX_M rows it dequantizes W once and calls cuBLAS instead.
`gptq_dequantize` materializes W (the backward pass uses it for one layer at a time, then drops it).

Codes are read as one LSB-first bit stream (see quant.gptq.pack): for element k the field starts at
bit b·(k mod 32) of word (k div 32)·b + that offset div 32; only 3-bit fields can straddle two words.

Only `quant.gptq.kernels.kernels_for` imports this module (Triton is optional), for CUDA tensors, so `import quant`
works without Triton. Importing it with TRITON_INTERPRET=1 set runs the kernels on the CPU interpreter (tests do).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _codes(ptr, idx, other, stride_idx, stride_other, valid, BITS: tl.constexpr):
    # Codes of the elements idx (the packed axis) for each `other` (the unpacked axis): a 2-D tile.
    bit = (idx % 32) * BITS
    row = (idx // 32) * BITS + bit // 32
    shift = bit % 32
    # Unsigned, so that >> is a logical shift: sign bits must not leak into the straddling 3-bit fields.
    lo = tl.load(ptr + row[:, None] * stride_idx + other[None, :] * stride_other, mask=valid, other=0)
    v = lo.to(tl.uint32, bitcast=True) >> shift[:, None].to(tl.uint32)
    if BITS == 3:
        straddle = (shift + BITS) > 32
        hi = tl.load(ptr + (row + 1)[:, None] * stride_idx + other[None, :] * stride_other,
                     mask=valid & straddle[:, None], other=0)
        v = v | (hi.to(tl.uint32, bitcast=True) << tl.where(straddle, 32 - shift, 0)[:, None].to(tl.uint32))
    return (v & ((1 << BITS) - 1)).to(tl.int32)

@triton.jit
def _weight_tile(qw_ptr, qz_ptr, sc_ptr, gi_ptr, offs_k, offs_n, K, N,
                 s_qwk, s_qwn, s_qzg, s_qzn, s_sg, s_sn,
                 BITS: tl.constexpr, ZERO_OFFSET: tl.constexpr):
    kmask = offs_k < K
    nmask = offs_n < N
    valid = kmask[:, None] & nmask[None, :]
    q = _codes(qw_ptr, offs_k, offs_n, s_qwk, s_qwn, valid, BITS)
    g = tl.load(gi_ptr + offs_k, mask=kmask, other=0)
    # zeros are packed along N: read them with the roles of the axes swapped, then transpose.
    zt = _codes(qz_ptr, offs_n, g, s_qzn, s_qzg, tl.trans(valid), BITS)
    z = tl.trans(zt) + ZERO_OFFSET
    s = tl.load(sc_ptr + g[:, None] * s_sg + offs_n[None, :] * s_sn, mask=valid, other=0.0).to(tl.float32)
    return (q - z).to(tl.float32) * s

@triton.jit
def matmul_kernel(x_ptr, qw_ptr, qz_ptr, sc_ptr, gi_ptr, y_ptr, M, N, K,
                  s_xm, s_xk, s_qwk, s_qwn, s_qzg, s_qzn, s_sg, s_sn, s_ym, s_yn,
                  BITS: tl.constexpr, ZERO_OFFSET: tl.constexpr, IEEE: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + offs_m[:, None] * s_xm + offs_k[None, :] * s_xk,
                    mask=(offs_m[:, None] < M) & (offs_k[None, :] < K), other=0.0)
        w = _weight_tile(qw_ptr, qz_ptr, sc_ptr, gi_ptr, offs_k, offs_n, K, N,
                         s_qwk, s_qwn, s_qzg, s_qzn, s_sg, s_sn, BITS, ZERO_OFFSET)
        if IEEE:
            acc += tl.dot(x, w.to(x.dtype), input_precision="ieee")
        else:
            acc += tl.dot(x, w.to(x.dtype))
    tl.store(y_ptr + offs_m[:, None] * s_ym + offs_n[None, :] * s_yn, acc.to(y_ptr.dtype.element_ty),
             mask=(offs_m[:, None] < M) & (offs_n[None, :] < N))

@triton.jit
def dequant_kernel(qw_ptr, qz_ptr, sc_ptr, gi_ptr, w_ptr, N, K,
                   s_qwk, s_qwn, s_qzg, s_qzn, s_sg, s_sn, s_wk, s_wn,
                   BITS: tl.constexpr, ZERO_OFFSET: tl.constexpr,
                   BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr):
    offs_k = tl.program_id(0) * BLOCK_K + tl.arange(0, BLOCK_K)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    w = _weight_tile(qw_ptr, qz_ptr, sc_ptr, gi_ptr, offs_k, offs_n, K, N,
                     s_qwk, s_qwn, s_qzg, s_qzn, s_sg, s_sn, BITS, ZERO_OFFSET)
    tl.store(w_ptr + offs_k[:, None] * s_wk + offs_n[None, :] * s_wn, w.to(w_ptr.dtype.element_ty),
             mask=(offs_k[:, None] < K) & (offs_n[None, :] < N))



def _block_m(M: int) -> int:
    # tl.dot needs tiles of at least 16; decode-sized inputs would waste most of a bigger tile.
    return 16 if M <= 16 else 32 if M <= 32 else 64


# Above this many rows the fused kernel loses to dequantize + cuBLAS (measured on an H100, scripts/bench/PERF.md).
DEQUANT_THEN_GEMM_ROWS = 64


# Above this many rows of x, dequantizing W once and using cuBLAS beats re-dequantizing the same tiles in
# every row block of the fused kernel (the usual exllama-style switch). Module-level so tests can move it.
FUSED_MAX_M = 256


def gptq_matmul(x: torch.Tensor, qweight, qzeros, scales, g_idx, bits: int, zero_offset: int) -> torch.Tensor:
    K, N = g_idx.shape[0], scales.shape[1]
    lead = x.shape[:-1]
    x2 = x.reshape(-1, K)
    M = x2.shape[0]
    if M > FUSED_MAX_M:
        return x @ gptq_dequantize(qweight, qzeros, scales, g_idx, bits, zero_offset, out_dtype=x.dtype)
    y = torch.empty(M, N, dtype=x.dtype, device=x.device)
    if M == 0:
        return y.reshape(*lead, N)
    if M > DEQUANT_THEN_GEMM_ROWS:
        # Many rows (training, prefill): one dequantize pass (K·N writes) is cheap next to the 2·M·K·N FLOPs,
        # and cuBLAS runs those on the tensor cores far faster than the fused kernel's plain tiles.
        W = gptq_dequantize(qweight, qzeros, scales, g_idx, bits, zero_offset, out_dtype=x.dtype)
        return (x2 @ W).reshape(*lead, N)
    BM, BN, BK = _block_m(M), 64, 32
    grid = (triton.cdiv(M, BM), triton.cdiv(N, BN))
    matmul_kernel[grid](
        x2, qweight, qzeros, scales, g_idx, y, M, N, K,
        x2.stride(0), x2.stride(1), qweight.stride(0), qweight.stride(1), qzeros.stride(0), qzeros.stride(1),
        scales.stride(0), scales.stride(1), y.stride(0), y.stride(1),
        BITS=bits, ZERO_OFFSET=zero_offset, IEEE=x.dtype == torch.float32,
        BLOCK_M=BM, BLOCK_N=BN, BLOCK_K=BK, num_warps=4,
    )
    return y.reshape(*lead, N)


def gptq_dequantize(qweight, qzeros, scales, g_idx, bits: int, zero_offset: int, out_dtype=torch.float32):
    K, N = g_idx.shape[0], scales.shape[1]
    W = torch.empty(K, N, dtype=out_dtype, device=qweight.device)
    BK, BN = 32, 64
    grid = (triton.cdiv(K, BK), triton.cdiv(N, BN))
    dequant_kernel[grid](
        qweight, qzeros, scales, g_idx, W, N, K,
        qweight.stride(0), qweight.stride(1), qzeros.stride(0), qzeros.stride(1),
        scales.stride(0), scales.stride(1), W.stride(0), W.stride(1),
        BITS=bits, ZERO_OFFSET=zero_offset, BLOCK_K=BK, BLOCK_N=BN,
    )
    return W
