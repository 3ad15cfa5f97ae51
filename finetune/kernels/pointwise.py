"""RMSNorm, rotary embedding and SwiGLU with hand-written backward (Triton), and their plain-PyTorch twins; Gemma's
(offset + w) RMSNorm on the same kernels; GeGLU (tanh) and a partial rotary embedding as torch compositions.

`rms_norm`, `rotary` and `swiglu` take the Triton path when `backend.use_triton` says it can run (CUDA, or the
interpreter in tests) and `kernels=True`; otherwise they compute exactly what transformers' eager modules
compute (the `*_reference` functions), so the CPU path and the `train.triton_kernels: false` switch are the
standard arithmetic.

Saved for backward: RMSNorm keeps its input and one fp32 scale per row (eager keeps fp32 copies of the whole
input); rotary keeps nothing but cos/sin (the rotation is inverted on the gradient); SwiGLU keeps its two inputs
(eager also keeps SiLU's output).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from finetune.kernels.backend import use_triton


def _tk():
    from finetune.kernels import triton_kernels

    return triton_kernels


# ------------------------------------------------------------------------------------------------ RMSNorm


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


class _RMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps, out_dtype=None):
        shape = x.shape
        x2d = x.reshape(-1, shape[-1])
        if x2d.stride(-1) != 1:
            x2d = x2d.contiguous()
        out_dtype = out_dtype or torch.promote_types(weight.dtype, x.dtype)
        y, rstd = _tk().rms_norm_fwd(x2d, weight, eps, out_dtype)
        ctx.save_for_backward(x2d, weight, rstd)
        ctx.shape, ctx.eps = shape, eps
        return y.view(shape)

    @staticmethod
    def backward(ctx, dy):
        x2d, weight, rstd = ctx.saved_tensors
        dy2d = dy.reshape(x2d.shape)
        if dy2d.stride(-1) != 1:
            dy2d = dy2d.contiguous()
        dx = _tk().rms_norm_bwd(dy2d, x2d, weight, rstd) if ctx.needs_input_grad[0] else None
        dw = None
        if ctx.needs_input_grad[1]:  # a trained norm weight (LoRA leaves norms frozen): the eager formula
            h = (x2d.float() * rstd[:, None]).to(x2d.dtype)
            dw = (dy2d.float() * h.float()).sum(0).to(weight.dtype)
        return (dx.view(ctx.shape) if dx is not None else None), dw, None, None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, kernels: bool = True) -> torch.Tensor:
    if kernels and use_triton(x):
        return _RMSNorm.apply(x, weight, eps)
    return rms_norm_reference(x, weight, eps)


def rms_norm_offset_reference(x: torch.Tensor, weight: torch.Tensor, eps: float, offset: float) -> torch.Tensor:
    """Gemma's RMSNorm: normalised and multiplied by (offset + weight) in fp32, then rounded once to x's dtype."""
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return (h * (offset + weight.float())).to(x.dtype)


def rms_norm_offset(x: torch.Tensor, weight: torch.Tensor, eps: float, offset: float,
                    kernels: bool = True) -> torch.Tensor:
    """RMSNorm multiplying by (offset + weight): Gemma's norms (offset 1.0, also its q/k norms). The Triton path
    rounds the normalised x to x's dtype before the weight, as the plain RMSNorm kernel does (the eager module
    does not: one more rounding in bf16, none in fp32)."""
    if kernels and use_triton(x) and not weight.requires_grad:  # the effective weight: fp32, x's dtype out
        return _RMSNorm.apply(x, weight.float() + offset, eps, x.dtype)
    return rms_norm_offset_reference(x, weight, eps, offset)


# ------------------------------------------------------------------------------------------------ rotary


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def rotary_reference(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, T, H, D]; cos/sin [B or 1, T, D]: transformers' apply_rotary_pos_emb in token-major layout."""
    cos, sin = cos.unsqueeze(2), sin.unsqueeze(2)
    return x * cos + _rotate_half(x) * sin


class _Rotary(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, cos, sin):
        ctx.save_for_backward(cos, sin)
        return _tk().rotary(x, cos, sin, backward=False)

    @staticmethod
    def backward(ctx, dy):
        cos, sin = ctx.saved_tensors
        if dy.stride(-1) != 1:
            dy = dy.contiguous()
        return _tk().rotary(dy, cos, sin, backward=True), None, None


def _rotary_fits(x: torch.Tensor) -> bool:
    half = x.shape[-1] // 2
    return x.shape[-1] % 2 == 0 and half >= 1 and half & (half - 1) == 0


def rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, kernels: bool = True) -> torch.Tensor:
    if kernels and use_triton(x) and _rotary_fits(x):
        B, T = x.shape[:2]
        if x.stride(-1) != 1:
            x = x.contiguous()
        cos, sin = cos.expand(B, T, -1), sin.expand(B, T, -1)
        if cos.stride(-1) != 1 or sin.stride(-1) != 1:
            cos, sin = cos.contiguous(), sin.contiguous()
        return _Rotary.apply(x, cos, sin)
    return rotary_reference(x, cos, sin)


def partial_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, kernels: bool = True) -> torch.Tensor:
    """The rotary embedding of the first cos.shape[-1] channels of each head, the rest passed on (Phi-4-mini's
    partial_rotary_factor; transformers' Phi-3 apply_rotary_pos_emb); all channels when cos is as wide as x."""
    rot = cos.shape[-1]
    if rot == x.shape[-1]:
        return rotary(x, cos, sin, kernels)
    return torch.cat([rotary(x[..., :rot], cos, sin, kernels), x[..., rot:]], dim=-1)


# ------------------------------------------------------------------------------------------------ SwiGLU


def swiglu_reference(g: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    return F.silu(g) * u


class _SwiGLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, g, u):
        ctx.save_for_backward(g, u)
        return _tk().swiglu_fwd(g, u)

    @staticmethod
    def backward(ctx, dh):
        g, u = ctx.saved_tensors
        dg, du = torch.empty_like(g), torch.empty_like(u)
        _tk().swiglu_bwd(dh.contiguous(), g, u, dg, du)
        return dg, du


def swiglu(g: torch.Tensor, u: torch.Tensor, kernels: bool = True) -> torch.Tensor:
    """silu(g) * u for same-shaped tensors."""
    if kernels and use_triton(g) and g.shape == u.shape:
        return _SwiGLU.apply(g.contiguous(), u.contiguous())
    return swiglu_reference(g, u)


def swiglu_forward_into(g: torch.Tensor, u: torch.Tensor, kernels: bool, out: torch.Tensor | None = None):
    """silu(g) * u without autograd (the fused MLP calls this inside its own Function)."""
    if kernels and use_triton(g):
        return _tk().swiglu_fwd(g, u, out)
    h = swiglu_reference(g, u)
    return h if out is None else out.copy_(h)


def swiglu_backward_into(dh: torch.Tensor, g: torch.Tensor, u: torch.Tensor, kernels: bool,
                         dg: torch.Tensor, du: torch.Tensor):
    """(dg, du) of silu(g) * u given dh, written into `dg` (which may be `dh`) and `du`."""
    if kernels and use_triton(g):
        return _tk().swiglu_bwd(dh, g, u, dg, du)
    gf = g.float()
    sig = torch.sigmoid(gf)
    silu = (gf * sig).to(g.dtype)
    dsilu = (dh * u).float()
    du.copy_(dh * silu)
    dg.copy_(dsilu * sig * (1 + gf * (1 - sig)))
    return dg, du


def geglu(g: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """gelu_tanh(g) * u (Gemma's gelu_pytorch_tanh MLP), in torch: autograd keeps g, u and the GELU's output."""
    return F.gelu(g, approximate="tanh") * u
