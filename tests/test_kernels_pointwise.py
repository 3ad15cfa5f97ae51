"""RMSNorm, rotary and SwiGLU: the torch twins are transformers' arithmetic; the Triton kernels match them."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from kernel_checks import check_pointwise
from support import run_in_triton_interpreter

from finetune.kernels import pointwise as P

gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_references_are_transformers_arithmetic(dtype):
    from transformers.models.llama.modeling_llama import LlamaRMSNorm, apply_rotary_pos_emb

    torch.manual_seed(0)
    x = torch.randn(2, 7, 64, dtype=dtype)
    norm = LlamaRMSNorm(64, eps=1e-5).to(dtype)
    norm.weight.data.uniform_(0.5, 1.5)
    assert torch.equal(P.rms_norm(x, norm.weight, 1e-5, kernels=False), norm(x))
    q, k = torch.randn(2, 7, 4, 16, dtype=dtype), torch.randn(2, 7, 2, 16, dtype=dtype)
    ang = torch.randn(2, 7, 8)
    cos, sin = torch.cat([ang.cos()] * 2, -1).to(dtype), torch.cat([ang.sin()] * 2, -1).to(dtype)
    q_hf, k_hf = apply_rotary_pos_emb(q.transpose(1, 2), k.transpose(1, 2), cos, sin)
    assert torch.equal(P.rotary(q, cos, sin, kernels=False), q_hf.transpose(1, 2))
    assert torch.equal(P.rotary(k, cos, sin, kernels=False), k_hf.transpose(1, 2))
    g, u = torch.randn(5, 9, dtype=dtype), torch.randn(5, 9, dtype=dtype)
    assert torch.equal(P.swiglu(g, u, kernels=False), torch.nn.SiLU()(g) * u)


def test_swiglu_backward_twin_matches_autograd():
    torch.manual_seed(1)
    g, u, dh = (torch.randn(6, 33, dtype=torch.bfloat16) for _ in range(3))
    gl, ul = g.clone().requires_grad_(), u.clone().requires_grad_()
    dg_ref, du_ref = torch.autograd.grad(P.swiglu_reference(gl, ul), (gl, ul), dh)
    dg, du = P.swiglu_backward_into(dh.clone(), g, u, False, dg=torch.empty_like(g), du=torch.empty_like(u))
    assert torch.equal(du, du_ref)
    assert (dg.float() - dg_ref.float()).abs().max() <= 2 ** -6 * dg_ref.float().abs().max()


def test_triton_kernels_in_interpreter():
    """The Triton source runs on CPU under TRITON_INTERPRET=1 (only where triton is installed)."""
    run_in_triton_interpreter(Path(__file__).resolve().parent / "kernel_checks.py", "KERNEL-CHECKS-OK")


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_triton_kernels_on_gpu(dtype):
    for _ in range(3):  # fresh inputs each time
        check_pointwise("cuda", dtype, rows=4096, hidden=4096)
    check_pointwise("cuda", dtype, rows=300, hidden=3584)  # Qwen2.5-7B's width: masked columns
