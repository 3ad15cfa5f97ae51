"""Checks of finetune.kernels shared by the CPU tests, the Triton-interpreter run and the GPU tests.

Each check draws fresh random inputs, runs the fast path and the plain-PyTorch reference, and compares both with
a float64 evaluation of the same formula: the fast path must be at least about as close to it as the reference
(the reference rounds more often, so it is usually the less accurate one), and close in absolute terms.
"""

from __future__ import annotations

import torch


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def assert_as_close(name: str, got, ref, exact, dtype) -> None:
    """`got` (fast) and `ref` (reference) against `exact` (float64)."""
    e_got, e_ref = rel(got, exact), rel(ref, exact)
    bound = 2 * e_ref + (1e-5 if dtype == torch.float32 else 4e-3)
    assert torch.isfinite(got).all(), f"{name}: non-finite values"
    assert e_got <= bound, f"{name}: fast path error {e_got:.2e} vs reference {e_ref:.2e}"


def _grads(fn, inputs, dy):
    out = fn(*inputs)
    grads = torch.autograd.grad(out, [t for t in inputs if t.requires_grad], dy)
    return out.detach(), grads


def _leaf(t, grad=True):
    return t.detach().clone().requires_grad_(grad)


def check_pointwise(device: str, dtype=torch.bfloat16, rows: int = 96, hidden: int = 384) -> None:
    from finetune.kernels import pointwise as P

    g = torch.Generator().manual_seed(int(torch.randint(0, 2**31, (1,))))

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(device=device, dtype=dtype)

    def run(name, fast, ref, args, grad_mask):
        dy = rnd(*ref(*args).shape)
        ins = [_leaf(a, m) for a, m in zip(args, grad_mask)]
        exact_ins = [_leaf(a.double(), m) for a, m in zip(args, grad_mask)]
        out_f, g_f = _grads(fast, ins, dy)
        out_r, g_r = _grads(ref, [_leaf(a, m) for a, m in zip(args, grad_mask)], dy)
        out_e, g_e = _grads(ref, exact_ins, dy.double())
        assert out_f.dtype == out_r.dtype and out_f.shape == out_r.shape, name
        assert_as_close(f"{name} forward", out_f, out_r, out_e, dtype)
        for i, (a, b, c) in enumerate(zip(g_f, g_r, g_e)):
            assert_as_close(f"{name} grad {i}", a, b, c, dtype)

    x, w = rnd(2, rows // 2, hidden, scale=3.0), (rnd(hidden).float().abs() + 0.5).to(dtype)
    run("rms_norm", lambda x, w: P.rms_norm(x, w, 1e-5), lambda x, w: P.rms_norm_reference(x, w, 1e-5), (x, w),
        (True, False))
    ang = torch.randn(2, rows // 2, 32, generator=g).to(device)
    cos, sin = torch.cat([ang.cos()] * 2, -1).to(dtype), torch.cat([ang.sin()] * 2, -1).to(dtype)
    for heads in (4, 6):  # 6: not a power of two (masked heads)
        q = rnd(2, rows // 2, heads, 64)
        run(f"rotary {heads} heads", lambda q: P.rotary(q, cos, sin), lambda q: P.rotary_reference(q, cos, sin),
            (q,), (True,))
    a, b = rnd(rows, 3 * hidden + 5, scale=2.0), rnd(rows, 3 * hidden + 5)
    run("swiglu", P.swiglu, P.swiglu_reference, (a, b), (True, True))


def check_rms_norm_offset(device: str, dtype=torch.bfloat16, rows: int = 96, hidden: int = 384) -> None:
    """Gemma's (1 + w) RMSNorm on the RMSNorm kernels, against its reference and float64, forward and input grad;
    also over a head_dim of 256 (its q/k norms)."""
    from finetune.kernels import pointwise as P

    g = torch.Generator().manual_seed(int(torch.randint(0, 2**31, (1,))))
    for width in (hidden, 256):
        x = (torch.randn(2, rows // 2, width, generator=g) * 3).to(device=device, dtype=dtype)
        w = (torch.randn(width, generator=g) * 0.3).to(device=device, dtype=dtype)
        dy = torch.randn(x.shape, generator=g).to(device=device, dtype=dtype)
        outs = []
        for fn, xin in ((lambda t: P.rms_norm_offset(t, w, 1e-6, 1.0), x),
                        (lambda t: P.rms_norm_offset_reference(t, w, 1e-6, 1.0), x),
                        (lambda t: P.rms_norm_offset_reference(t, w.double(), 1e-6, 1.0), x.double())):
            leaf = _leaf(xin)
            out, (dx,) = _grads(fn, [leaf], dy.to(xin.dtype))
            outs.append((out, dx))
        (y, dx), (y_ref, dx_ref), (y_e, dx_e) = outs
        assert y.dtype == y_ref.dtype == dtype
        assert_as_close(f"rms_norm_offset {width} forward", y, y_ref, y_e, dtype)
        assert_as_close(f"rms_norm_offset {width} grad", dx, dx_ref, dx_e, dtype)


if __name__ == "__main__":  # the interpreter run: python kernel_checks.py (with TRITON_INTERPRET=1)
    from finetune.kernels.backend import use_triton

    assert use_triton(torch.empty(0)), "Triton is not active here"
    for dt in (torch.float32, torch.bfloat16):
        check_pointwise("cpu", dt, rows=8, hidden=96)
        check_rms_norm_offset("cpu", dt, rows=8, hidden=96)
    print("KERNEL-CHECKS-OK")
