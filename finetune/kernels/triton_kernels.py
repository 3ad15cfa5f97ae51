"""Triton kernels for the decoder layer's pointwise work: RMSNorm, rotary embedding, SwiGLU (forward and backward).

Each kernel reads its inputs once and writes its outputs once, in place of the several full passes (fp32 copies,
squares, means, casts) that the eager modules make. Arithmetic is fp32; where the eager module rounds an
intermediate to the input dtype before using it (RMSNorm before the weight, SiLU before the product) the forward
kernels round at the same point, so the forward outputs match eager to the last bit in most elements.

Only `finetune.kernels.pointwise` imports this module, and only when Triton is importable.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

ELEMENTWISE_BLOCK = 1024


@triton.jit
def _rms_norm_fwd(X, W, Y, RSTD, stride_x, stride_y, N, eps, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < N
    x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / N + eps)
    h = (x * rstd).to(X.dtype.element_ty).to(tl.float32)
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(Y + row * stride_y + cols, (h * w).to(Y.dtype.element_ty), mask=mask)
    tl.store(RSTD + row, rstd)


@triton.jit
def _rms_norm_bwd(DY, X, W, RSTD, DX, stride_dy, stride_x, stride_dx, N, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < N
    dy = tl.load(DY + row * stride_dy + cols, mask=mask, other=0.0).to(tl.float32)
    x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    rstd = tl.load(RSTD + row)
    xh = x * rstd
    dh = dy * w
    dx = (dh - xh * (tl.sum(dh * xh, axis=0) / N)) * rstd
    tl.store(DX + row * stride_dx + cols, dx.to(DX.dtype.element_ty), mask=mask)


def rms_norm_fwd(x2d: torch.Tensor, weight: torch.Tensor, eps: float, out_dtype: torch.dtype):
    rows, n = x2d.shape
    y = torch.empty((rows, n), dtype=out_dtype, device=x2d.device)
    rstd = torch.empty(rows, dtype=torch.float32, device=x2d.device)
    block = triton.next_power_of_2(n)
    _rms_norm_fwd[(rows,)](x2d, weight, y, rstd, x2d.stride(0), y.stride(0), n, eps, BLOCK=block,
                           num_warps=_row_warps(block))
    return y, rstd


def rms_norm_bwd(dy2d: torch.Tensor, x2d: torch.Tensor, weight: torch.Tensor, rstd: torch.Tensor):
    rows, n = x2d.shape
    dx = torch.empty_like(x2d)
    block = triton.next_power_of_2(n)
    _rms_norm_bwd[(rows,)](dy2d, x2d, weight, rstd, dx, dy2d.stride(0), x2d.stride(0), dx.stride(0), n,
                           BLOCK=block, num_warps=_row_warps(block))
    return dx


def _row_warps(block: int) -> int:
    return 16 if block >= 8192 else 8 if block >= 2048 else 4


@triton.jit
def _rotary(X, COS, SIN, Y, T, H, sxb, sxt, sxh, scb, sct, ssb, sst, syb, syt, syh,
            HALF: tl.constexpr, BLOCK_H: tl.constexpr, BACKWARD: tl.constexpr):
    # One program per (batch, position): all heads of that token against one row of cos/sin.
    pid = tl.program_id(0).to(tl.int64)
    b = pid // T
    t = pid % T
    d = tl.arange(0, HALF)
    c1 = tl.load(COS + b * scb + t * sct + d).to(tl.float32)
    c2 = tl.load(COS + b * scb + t * sct + HALF + d).to(tl.float32)
    s1 = tl.load(SIN + b * ssb + t * sst + d).to(tl.float32)
    s2 = tl.load(SIN + b * ssb + t * sst + HALF + d).to(tl.float32)
    h = tl.arange(0, BLOCK_H)
    mask = (h < H)[:, None]
    src = X + b * sxb + t * sxt + h[:, None] * sxh + d[None, :]
    x1 = tl.load(src, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(src + HALF, mask=mask, other=0.0).to(tl.float32)
    if BACKWARD:  # the transpose of the forward's 2x2 rotation per (d, d + HALF) pair
        y1 = x1 * c1[None, :] + x2 * s2[None, :]
        y2 = x2 * c2[None, :] - x1 * s1[None, :]
    else:  # x * cos + rotate_half(x) * sin, rotate_half(x) = (-x2, x1)
        y1 = x1 * c1[None, :] - x2 * s1[None, :]
        y2 = x2 * c2[None, :] + x1 * s2[None, :]
    dst = Y + b * syb + t * syt + h[:, None] * syh + d[None, :]
    tl.store(dst, y1.to(Y.dtype.element_ty), mask=mask)
    tl.store(dst + HALF, y2.to(Y.dtype.element_ty), mask=mask)


def rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, backward: bool) -> torch.Tensor:
    """x [B, T, H, D] (last dim contiguous), cos/sin [B, T, D] (may be expanded) -> new [B, T, H, D]."""
    B, T, H, D = x.shape
    y = torch.empty((B, T, H, D), dtype=x.dtype, device=x.device)
    _rotary[(B * T,)](x, cos, sin, y, T, H, x.stride(0), x.stride(1), x.stride(2), cos.stride(0), cos.stride(1),
                      sin.stride(0), sin.stride(1), y.stride(0), y.stride(1), y.stride(2),
                      HALF=D // 2, BLOCK_H=triton.next_power_of_2(H), BACKWARD=backward, num_warps=4)
    return y


@triton.jit
def _swiglu_fwd(G, U, OUT, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    g = tl.load(G + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(U + offs, mask=mask, other=0.0).to(tl.float32)
    silu = (g * tl.sigmoid(g)).to(G.dtype.element_ty).to(tl.float32)
    tl.store(OUT + offs, (silu * u).to(OUT.dtype.element_ty), mask=mask)


@triton.jit
def _swiglu_bwd(DH, G, U, DG, DU, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    dh = tl.load(DH + offs, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(G + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(U + offs, mask=mask, other=0.0).to(tl.float32)
    sig = tl.sigmoid(g)
    silu = (g * sig).to(G.dtype.element_ty).to(tl.float32)
    dsilu = (dh * u).to(G.dtype.element_ty).to(tl.float32)
    tl.store(DU + offs, (dh * silu).to(DU.dtype.element_ty), mask=mask)
    tl.store(DG + offs, (dsilu * sig * (1.0 + g * (1.0 - sig))).to(DG.dtype.element_ty), mask=mask)


def swiglu_fwd(g: torch.Tensor, u: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    out = torch.empty_like(g) if out is None else out
    n = g.numel()
    _swiglu_fwd[(triton.cdiv(n, ELEMENTWISE_BLOCK),)](g, u, out, n, BLOCK=ELEMENTWISE_BLOCK, num_warps=4)
    return out


def swiglu_bwd(dh: torch.Tensor, g: torch.Tensor, u: torch.Tensor, dg: torch.Tensor, du: torch.Tensor):
    """Writes dg and du; `dg` may be `dh` itself (each element is read before it is written)."""
    n = g.numel()
    _swiglu_bwd[(triton.cdiv(n, ELEMENTWISE_BLOCK),)](dh, g, u, dg, du, n, BLOCK=ELEMENTWISE_BLOCK, num_warps=4)
    return dg, du
