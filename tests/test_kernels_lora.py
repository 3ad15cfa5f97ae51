"""The fused LoRA projection group and the fused MLP compute what peft's modules compute, gradients included."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from finetune.kernels.lora import Projection, project, projection_of
from finetune.kernels.mlp import lora_mlp
from quant.formats.registry import frozen_weight

gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def make_proj(n_in, n_out, r, scale, bias=False, dropout=0.0, device="cpu", dtype=torch.float32):
    base = nn.Linear(n_in, n_out, bias=bias).to(device=device, dtype=dtype).requires_grad_(False)
    A = nn.Parameter(torch.randn(r, n_in, device=device) / n_in ** 0.5)
    B = nn.Parameter(torch.randn(n_out, r, device=device) * 0.1)
    return Projection(base, frozen_weight(base), A, B, scale, nn.Dropout(dropout) if dropout else None)


def plain(p: Projection, x):
    """peft's LoRA layer, written out: base(x) + s * B(A(dropout(x)))."""
    xd = p.dropout(x) if p.dropout is not None else x
    dtype = x.dtype
    return p.base(x) + p.scale * (xd @ p.A.to(dtype).t()) @ p.B.to(dtype).t()


def grads_of(out_fn, leaves):
    outs = out_fn()
    loss = sum((o.float() * torch.linspace(-1, 1, o.numel(), device=o.device).view(o.shape)).sum() for o in outs)
    return [o.detach() for o in outs], torch.autograd.grad(loss, leaves)


def assert_close(a, b, tol=1e-5):
    for x, y in zip(a, b):
        assert (x - y).norm() <= tol * y.norm().clamp_min(1e-12) + 1e-7, ((x - y).norm(), y.norm())


@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_projection_group_matches_peft_formula(dropout):
    torch.manual_seed(0)
    projs = [make_proj(24, 24, 4, 2.0, bias=True, dropout=dropout), make_proj(24, 8, 4, 0.5, dropout=dropout),
             make_proj(24, 8, 2, 1.0)]
    for p in projs:
        p.dropout = p.dropout.train() if p.dropout is not None else None
    x = torch.randn(3, 5, 24, requires_grad=True)
    leaves = [x] + [t for p in projs for t in (p.A, p.B)]
    torch.manual_seed(7)
    got, g_got = grads_of(lambda: project(projs, x), leaves)
    torch.manual_seed(7)  # same dropout masks: the same draws in the same order
    ref, g_ref = grads_of(lambda: [plain(p, x) for p in projs], leaves)
    assert_close(got, ref)
    assert_close(g_got, g_ref)


@pytest.mark.parametrize("tile", [None, 4, 7])
def test_fused_mlp_matches_plain_mlp(tile):
    torch.manual_seed(1)
    gate, up, down = make_proj(16, 40, 4, 2.0), make_proj(16, 40, 4, 2.0), make_proj(40, 16, 4, 2.0, bias=True)
    x = torch.randn(2, 9, 16, requires_grad=True)
    leaves = [x] + [t for p in (gate, up, down) for t in (p.A, p.B)]
    got, g_got = grads_of(lambda: [lora_mlp(gate, up, down, x, tile=tile, kernels=False)], leaves)
    ref, g_ref = grads_of(lambda: [plain(down, torch.nn.functional.silu(plain(gate, x)) * plain(up, x))], leaves)
    assert_close(got, ref)
    assert_close(g_got, g_ref)


@pytest.mark.parametrize("dropouts", [(0.3, 0.3, 0.3), (0.2, 0.0, 0.0), (0.0, 0.0, 0.4)])
def test_fused_mlp_with_dropout_matches_peft_formula(dropouts):
    """The same masks as eager for a seed (gate, up, then down on h), the same values and gradients."""
    torch.manual_seed(1)
    pg, pu, pd = dropouts
    gate, up = make_proj(16, 40, 4, 2.0, dropout=pg), make_proj(16, 40, 4, 2.0, dropout=pu)
    down = make_proj(40, 16, 4, 2.0, bias=True, dropout=pd)
    x = torch.randn(2, 9, 16, requires_grad=True)
    leaves = [x] + [t for p in (gate, up, down) for t in (p.A, p.B)]
    torch.manual_seed(7)
    got, g_got = grads_of(lambda: [lora_mlp(gate, up, down, x, kernels=False)], leaves)
    torch.manual_seed(7)
    ref, g_ref = grads_of(lambda: [plain(down, torch.nn.functional.silu(plain(gate, x)) * plain(up, x))], leaves)
    assert_close(got, ref)
    assert_close(g_got, g_ref)
    with pytest.raises(ValueError, match="dropout"):  # tiles would draw other masks than eager
        lora_mlp(gate, up, down, x, tile=4)


def test_projection_of_reads_peft_layers_and_names_what_it_cannot_take():
    from peft import LoraConfig, get_peft_model

    class Tiny(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(8, 8), nn.Linear(8, 8)

    m = get_peft_model(Tiny(), LoraConfig(r=2, lora_alpha=6, target_modules=["a"], lora_dropout=0.0))
    p, why = projection_of(m.base_model.model.a)
    assert why == "on" and p.kind == "dense" and p.scale == 3.0 and p.dropout is None
    assert p.A is m.base_model.model.a.lora_A["default"].weight
    assert projection_of(m.base_model.model.b)[0] is None
    dora = get_peft_model(Tiny(), LoraConfig(r=2, target_modules=["a"], use_dora=True))
    p, why = projection_of(dora.base_model.model.a)
    assert p is None and "variant" in why


def test_nf4_weight_is_bitsandbytes_dequantization():
    bnb = pytest.importorskip("bitsandbytes")
    from quant.formats.bnb_lib import keep_reference_layout

    torch.manual_seed(2)
    q = bnb.nn.Linear4bit(64, 32, bias=False, compute_dtype=torch.float32, quant_type="nf4")
    q.weight = bnb.nn.Params4bit(torch.randn(32, 64), requires_grad=False, quant_type="nf4", compress_statistics=True)
    q = q.to("cpu")  # quantizes (double quantization: nested absmax)
    keep_reference_layout(q)
    p = Projection(q, frozen_weight(q), nn.Parameter(torch.zeros(2, 64)), nn.Parameter(torch.zeros(32, 2)), 1.0, None)
    assert p.kind == "bnb4"
    import bitsandbytes.functional as F

    assert torch.equal(p.weight(torch.float32), F.dequantize_4bit(q.weight.data, q.weight.quant_state))
    x = torch.randn(5, 64)
    torch.testing.assert_close(project([p], x)[0], q(x), rtol=1e-5, atol=1e-5)


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("tile", [None, 1000])
def test_fused_paths_on_gpu_bf16(tile):
    torch.manual_seed(3)
    kw = dict(device="cuda", dtype=torch.bfloat16)
    qkv = [make_proj(1024, 1024, 16, 1.0, **kw), make_proj(1024, 256, 16, 1.0, bias=True, **kw),
           make_proj(1024, 256, 16, 1.0, **kw)]
    mlp = [make_proj(1024, 2816, 16, 2.0, **kw), make_proj(1024, 2816, 16, 2.0, **kw), make_proj(2816, 1024, 16, 2.0, **kw)]
    x = (torch.randn(4, 768, 1024, device="cuda") * 0.5).to(torch.bfloat16).requires_grad_()
    leaves = [x] + [t for p in qkv + mlp for t in (p.A, p.B)]
    exact = [x] + [t for p in qkv + mlp for t in (p.A, p.B)]

    def fused():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            return project(qkv, x) + [lora_mlp(*mlp, x, tile=tile)]

    def ref():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            return [plain(p, x) for p in qkv] + [plain(mlp[2], torch.nn.functional.silu(plain(mlp[0], x)) *
                                                     plain(mlp[1], x))]

    got, g_got = grads_of(fused, leaves)
    want, g_want = grads_of(ref, exact)
    for a, b in zip(got + list(g_got), want + list(g_want)):
        err = float((a.float() - b.float()).norm() / b.float().norm())
        assert err < 2e-2, err
