"""Triton GPTQ kernels with the signatures of the torch reference in `quant.gptq.kernels`.

`gptq_matmul` picks one of three paths by the number of rows of x:
- up to quant.packed.GEMV_MAX_ROWS (decode: one token per sequence; 0 = off until timed on a GPU): `gptq_gemv`, a
  matrix-vector kernel that streams the packed words once, unpacks them with shifts in registers and reduces over K
  with plain multiply-adds (no tensor cores: at one row the work is bound by reading the 4-bit weight, a quarter of
  the bytes of a bf16 one). Where
  the groups are contiguous (no act-order) the scale and zero point are applied once per block of a group:
  sum_k x_k (q_kn - z_n) s_n = s_n (sum_k x_k q_kn - z_n sum_k x_k). Act-order checkpoints read each row's group
  from g_idx instead. Programs split K when N alone gives too few of them to fill the GPU (fp32 atomics).
- up to DEQUANT_THEN_GEMM_ROWS: the fused kernel, which dequantizes [BLOCK_K, BLOCK_N] tiles in registers and
  feeds them to tl.dot, so the float weight never exists in memory.
- above: W dequantized once, then cuBLAS (measured in scripts/bench/PERF.md).
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

from quant import packed
from quant.packed import gemv_block_k, gemv_split


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



@triton.jit
def gemv_kernel(x_ptr, qw_ptr, qz_ptr, sc_ptr, gi_ptr, y_ptr, N, K, group_size,
                s_xm, s_qwk, s_qzg, s_sg, s_ym,
                BITS: tl.constexpr, ZERO_OFFSET: tl.constexpr, GROUPED: tl.constexpr, SPLIT_K: tl.constexpr,
                BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    # One row of x (program axis 2) against BLOCK_N output columns over this program's share of K.
    PER: tl.constexpr = 32 // BITS  # codes per int32 word, packed along K (LSB first)
    WORDS: tl.constexpr = BLOCK_K // PER
    MASK: tl.constexpr = (1 << BITS) - 1
    pid_n, pid_k, m = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    nmask = offs_n < N
    words = tl.arange(0, WORDS)
    lanes = tl.arange(0, PER)
    shifts = (lanes * BITS).to(tl.uint32)
    # zero points are packed along N: column n's field of its group's row
    z_word = offs_n // PER
    z_shift = ((offs_n % PER) * BITS).to(tl.uint32)
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    k_share = tl.cdiv(tl.cdiv(K, BLOCK_K), SPLIT_K) * BLOCK_K
    k_lo = pid_k * k_share
    k_hi = tl.minimum(k_lo + k_share, K)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        rows = k0 // PER + words
        offs_k = k0 + words[:, None] * PER + lanes[None, :]  # [WORDS, PER]: element k of each field
        kmask = offs_k < K
        w = tl.load(qw_ptr + rows[:, None] * s_qwk + offs_n[None, :], mask=(rows < K // PER)[:, None] & nmask[None, :],
                    other=0)
        q = ((w.to(tl.uint32, bitcast=True)[:, None, :] >> shifts[None, :, None]) & MASK).to(tl.float32)
        x = tl.load(x_ptr + m * s_xm + offs_k, mask=kmask, other=0.0).to(tl.float32)  # 0 past K: masks q
        if GROUPED:  # the whole block lies in one group (BLOCK_K divides group_size, no act-order)
            g = k0 // group_size
            s = tl.load(sc_ptr + g * s_sg + offs_n, mask=nmask, other=0.0).to(tl.float32)
            zw = tl.load(qz_ptr + g * s_qzg + z_word, mask=nmask, other=0)
            z = ((zw.to(tl.uint32, bitcast=True) >> z_shift) & MASK).to(tl.float32) + ZERO_OFFSET
            xq = tl.sum(tl.sum(x[:, :, None] * q, axis=1), axis=0)
            acc += s * (xq - z * tl.sum(tl.sum(x, axis=1), axis=0))
        else:  # act-order: every row reads its own group from g_idx
            g = tl.load(gi_ptr + offs_k, mask=kmask, other=0)
            valid = kmask[:, :, None] & nmask[None, None, :]
            s = tl.load(sc_ptr + g[:, :, None] * s_sg + offs_n[None, None, :], mask=valid, other=0.0).to(tl.float32)
            zw = tl.load(qz_ptr + g[:, :, None] * s_qzg + z_word[None, None, :], mask=valid, other=0)
            z = ((zw.to(tl.uint32, bitcast=True) >> z_shift[None, None, :]) & MASK).to(tl.float32) + ZERO_OFFSET
            acc += tl.sum(tl.sum(x[:, :, None] * (q - z) * s, axis=1), axis=0)
    if SPLIT_K == 1:
        tl.store(y_ptr + m * s_ym + offs_n, acc.to(y_ptr.dtype.element_ty), mask=nmask)
    else:
        tl.atomic_add(y_ptr + m * s_ym + offs_n, acc, mask=nmask)


def _block_m(M: int) -> int:
    # tl.dot needs tiles of at least 16; decode-sized inputs would waste most of a bigger tile.
    return 16 if M <= 16 else 32 if M <= 32 else 64


# Above this many rows the fused kernel loses to dequantize + cuBLAS (measured on an H100, scripts/bench/PERF.md).
DEQUANT_THEN_GEMM_ROWS = 64


# Above this many rows of x, dequantizing W once and using cuBLAS beats re-dequantizing the same tiles in
# every row block of the fused kernel (the usual exllama-style switch). Module-level so tests can move it.
FUSED_MAX_M = 256


GEMV_BITS = (2, 4, 8)  # whole fields per word (3-bit fields straddle words: the fused kernel takes those)


def group_len(g_idx: torch.Tensor) -> int:
    """The group length L when g_idx == arange(K) // L (groups in order, no act-order; one group: K), else 0.
    Checked once per g_idx tensor (a host sync) and remembered on it until it is written to."""
    hit = getattr(g_idx, "_group_len", None)
    if hit is not None and hit[0] == g_idx._version:
        return hit[1]
    K = g_idx.shape[0]
    L = int((g_idx == 0).sum())
    ordered = L > 0 and torch.equal(g_idx.long(), torch.arange(K, device=g_idx.device) // L)
    g_idx._group_len = (g_idx._version, L if ordered else 0)
    return g_idx._group_len[1]


def gemv_config(N: int, K: int, device: torch.device, group: int, per: int) -> tuple[int, int, int]:
    """(BLOCK_N, BLOCK_K, SPLIT_K): 64 columns a program; K in blocks that lie in one group where the groups are in
    order (quant.packed.gemv_block_k), else in blocks of 128; K split across programs as gemv_split says."""
    block_k = (gemv_block_k(group, K, per) if group else None) or 128
    return 64, block_k, gemv_split(triton.cdiv(N, 64), triton.cdiv(K, block_k), device)


def gptq_gemv(x: torch.Tensor, qweight, qzeros, scales, g_idx, bits: int, zero_offset: int,
              config: tuple[int, int, int] | None = None) -> torch.Tensor:
    """x [..., K] @ W for a few rows of x (see the module docstring); `config` = (BLOCK_N, BLOCK_K, SPLIT_K)."""
    K, N = g_idx.shape[0], scales.shape[1]
    lead = x.shape[:-1]
    x2 = x.reshape(-1, K)
    M = x2.shape[0]
    per = 32 // bits
    L = group_len(g_idx)
    block_n, block_k, split = config or gemv_config(N, K, x.device, L, per)
    grouped = L > 0 and (L >= K or L % block_k == 0)
    y = torch.zeros(M, N, dtype=torch.float32, device=x.device) if split > 1 else \
        torch.empty(M, N, dtype=x.dtype, device=x.device)
    if M:
        gemv_kernel[(triton.cdiv(N, block_n), split, M)](
            x2, qweight, qzeros, scales, g_idx, y, N, K, max(L, 1),
            x2.stride(0), qweight.stride(0), qzeros.stride(0), scales.stride(0), y.stride(0),
            BITS=bits, ZERO_OFFSET=zero_offset, GROUPED=grouped, SPLIT_K=split, BLOCK_N=block_n, BLOCK_K=block_k,
            num_warps=4)
    return y.to(x.dtype).reshape(*lead, N)


def gptq_matmul(x: torch.Tensor, qweight, qzeros, scales, g_idx, bits: int, zero_offset: int) -> torch.Tensor:
    K, N = g_idx.shape[0], scales.shape[1]
    lead = x.shape[:-1]
    x2 = x.reshape(-1, K)
    M = x2.shape[0]
    contiguous = all(t.stride(-1) == 1 for t in (x2, qweight, qzeros, scales))
    if 0 < M <= packed.GEMV_MAX_ROWS and bits in GEMV_BITS and contiguous:
        return gptq_gemv(x2, qweight, qzeros, scales, g_idx, bits, zero_offset).reshape(*lead, N)
    if M > FUSED_MAX_M:
        return x @ gptq_dequantize(qweight, qzeros, scales, g_idx, bits, zero_offset, out_dtype=x.dtype)
    if M > DEQUANT_THEN_GEMM_ROWS:
        # Many rows (training, prefill): one dequantize pass (K·N writes) is cheap next to the 2·M·K·N FLOPs,
        # and cuBLAS runs those on the tensor cores far faster than the fused kernel's plain tiles.
        W = gptq_dequantize(qweight, qzeros, scales, g_idx, bits, zero_offset, out_dtype=x.dtype)
        return (x2 @ W).reshape(*lead, N)
    return fused_matmul(x2, qweight, qzeros, scales, g_idx, bits, zero_offset).reshape(*lead, N)


def fused_matmul(x2: torch.Tensor, qweight, qzeros, scales, g_idx, bits: int, zero_offset: int) -> torch.Tensor:
    """x2 [M, K] @ W through the fused tile kernel (dequantized [BLOCK_K, BLOCK_N] tiles fed to tl.dot)."""
    K, N = g_idx.shape[0], scales.shape[1]
    M = x2.shape[0]
    y = torch.empty(M, N, dtype=x2.dtype, device=x2.device)
    if M == 0:
        return y
    BM, BN, BK = _block_m(M), 64, 32
    grid = (triton.cdiv(M, BM), triton.cdiv(N, BN))
    matmul_kernel[grid](
        x2, qweight, qzeros, scales, g_idx, y, M, N, K,
        x2.stride(0), x2.stride(1), qweight.stride(0), qweight.stride(1), qzeros.stride(0), qzeros.stride(1),
        scales.stride(0), scales.stride(1), y.stride(0), y.stride(1),
        BITS=bits, ZERO_OFFSET=zero_offset, IEEE=x2.dtype == torch.float32,
        BLOCK_M=BM, BLOCK_N=BN, BLOCK_K=BK, num_warps=4,
    )
    return y


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
