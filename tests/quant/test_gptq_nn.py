"""GPTQLinear (QuantLinear is the same class under its earlier name): forward, autograd, peft LoRA on top, and
the Triton kernels against the torch reference."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from quant_helpers import run_in_triton_interpreter

from quant.feedback import HessianAccumulator
from quant.gptq import kernels as torch_ref
from quant.gptq.nn import QuantLinear
from quant.gptq.solver import GPTQConfig, gptq_quantize


def make_layer(bits=4, gs=32, K=128, N=64, desc_act=True, sym=True, fmt="gptq", bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    lin = torch.nn.Linear(K, N, bias=bias)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(N, K, generator=g) * 0.05)
        if bias:
            lin.bias.copy_(torch.randn(N, generator=g).half().float())
    acc = HessianAccumulator(K, "cpu")
    acc.add(torch.randn(256, K, generator=g) * torch.linspace(0.1, 3, K))
    res = gptq_quantize(lin.weight, acc.H, GPTQConfig(bits=bits, group_size=gs, desc_act=desc_act, sym=sym))
    return QuantLinear.from_result(res, bias=lin.bias, checkpoint_format=fmt), res


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("fmt", ["gptq", "gptq_v2"])
def test_forward_matches_linear_with_dequantized_weight(bits, fmt):
    layer, res = make_layer(bits=bits, sym=bits != 3, fmt=fmt)
    W = layer.dequantize()
    assert W.shape == (64, 128) and torch.equal(W, res.dequantize())
    x = torch.randn(3, 7, 128)
    torch.testing.assert_close(layer(x), F.linear(x, W, layer.bias.float()), rtol=1e-5, atol=1e-5)


def test_state_dict_keys_are_checkpoint_keys_and_no_weight():
    layer, _ = make_layer()
    assert set(layer.state_dict()) == {"qweight", "qzeros", "scales", "g_idx", "bias"}
    assert not hasattr(layer, "weight") and list(layer.parameters()) == []
    assert (layer.in_features, layer.out_features) == (layer.infeatures, layer.outfeatures) == (128, 64)


def test_input_gradient_matches_and_no_weight_gradient():
    layer, _ = make_layer(bits=3, sym=False)
    W = layer.dequantize()
    x = torch.randn(4, 9, 128, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_(True)
    g = torch.randn(4, 9, 64)
    layer(x).backward(g)
    F.linear(x_ref, W, layer.bias.float()).backward(g)
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-5, atol=1e-5)
    assert all(b.grad is None for b in layer.buffers())


def test_peft_lora_wraps_quantlinear_and_trains():
    from peft import LoraConfig, get_peft_model
    from quant_helpers import calib_ids, tiny_llama

    from quant.gptq.model import quantize_model
    from quant.peft_support import register_quantlinear

    model = tiny_llama()
    quantize_model(model, calib_ids(4, 32), GPTQConfig(bits=4, group_size=32), progress=False)
    cfg = register_quantlinear(LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
                                          lora_dropout=0.0))
    peft_model = get_peft_model(model, cfg)
    trainable = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    ids = torch.randint(3, 128, (2, 16))
    with torch.no_grad():
        before = peft_model(input_ids=ids).logits
    out = peft_model(input_ids=ids, labels=ids)
    out.loss.backward()
    # lora_B starts at zero, so its gradient is the one that must flow back through the frozen QuantLinears
    grads = {n: p.grad for n, p in peft_model.named_parameters() if "lora_B" in n}
    assert all(g is not None and torch.isfinite(g).all() and g.abs().sum() > 0 for g in grads.values())
    assert grads["base_model.model.model.layers.0.self_attn.q_proj.lora_B.default.weight"].abs().sum() > 0
    torch.optim.SGD([p for p in peft_model.parameters() if p.requires_grad], lr=1.0).step()
    with torch.no_grad():
        assert not torch.equal(peft_model(input_ids=ids).logits, before)


TRITON_CHECK = r"""
import os, torch
from quant.feedback import HessianAccumulator
from quant import packed
from quant.gptq import kernels as torch_ref, triton_kernels as triton_gptq
from quant.gptq.nn import QuantLinear
from quant.gptq.solver import GPTQConfig, gptq_quantize
torch.manual_seed(0)
def layers(bits, gs, K, N, desc):  # (format, kernel arguments) of one quantized random layer in both formats
    acc = HessianAccumulator(K, "cpu"); acc.add(torch.randn(64, K))
    res = gptq_quantize(torch.randn(N, K) * 0.05, acc.H, GPTQConfig(bits=bits, group_size=gs, desc_act=desc))
    for fmt in ("gptq", "gptq_v2"):
        L = QuantLinear.from_result(res, checkpoint_format=fmt)
        yield fmt, (L.qweight, L.qzeros, L.scales, L.g_idx, bits, L.zero_offset)
for bits, gs, K, N, desc in [(4, 32, 128, 64, True), (3, 64, 96, 64, False), (2, 32, 64, 32, True), (8, -1, 64, 32, False)]:
    for fmt, args in layers(bits, gs, K, N, desc):
        Wr = torch_ref.gptq_dequantize(*args)
        Wt = triton_gptq.gptq_dequantize(*args)
        assert torch.equal(Wr, Wt), (bits, fmt)
        x = torch.randn(5, K)
        torch.testing.assert_close(triton_gptq.gptq_matmul(x, *args), torch_ref.gptq_matmul(x, *args), rtol=1e-4, atol=1e-4)
# The decode kernel: groups in order (one scale per block) and act-order (g_idx per row), K split or not.
for bits, gs, K, N, desc, ordered in [(4, 32, 256, 64, False, True), (4, 64, 192, 96, True, False),
                                      (2, 32, 128, 64, True, False), (8, -1, 64, 32, False, True),
                                      (4, 128, 320, 72, False, True)]:  # 320: a partial last group
    for fmt, args in layers(bits, gs, K, N, desc):
        assert (triton_gptq.group_len(args[3]) > 0) == ordered, (bits, gs, desc)
        exact = torch_ref.gptq_dequantize(*args).double()
        for M in (1, 3):
            for config in (None, (32, 32, 2)):
                x = torch.randn(M, K)
                got = triton_gptq.gptq_gemv(x, *args, config=config)
                assert got.shape == (M, N) and got.dtype == x.dtype
                err = float((got.double() - x.double() @ exact).norm() / (x.double() @ exact).norm())
                assert err < 1e-5, (bits, gs, desc, fmt, M, config, err)
        x = torch.randn(1, K)  # decode: the tile kernel by default (GEMV off until timed); GEMV_ROWS turns it on
        assert torch.equal(triton_gptq.gptq_matmul(x, *args), triton_gptq.fused_matmul(x, *args))
        packed.GEMV_MAX_ROWS = packed.GEMV_ROWS
        assert torch.equal(triton_gptq.gptq_matmul(x, *args), triton_gptq.gptq_gemv(x, *args))
        packed.GEMV_MAX_ROWS = 0
print("TRITON-INTERPRETER-OK")
"""


def test_triton_kernels_in_interpreter_match_torch():
    """The Triton source runs on CPU under TRITON_INTERPRET=1 (only where triton is installed)."""
    run_in_triton_interpreter(TRITON_CHECK)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("bits,gs,desc_act,K,N", [(4, 128, False, 576, 1536), (4, 64, True, 1536, 576),
                                                  (3, 64, True, 576, 192), (2, 32, False, 256, 128),
                                                  (8, -1, False, 512, 256), (4, 128, True, 4096, 1024)])
def test_triton_matches_torch_on_gpu(dtype, bits, gs, desc_act, K, N):
    from quant.gptq import triton_kernels as triton_gptq

    layer, _ = make_layer(bits=bits, gs=gs, K=K, N=N, desc_act=desc_act, sym=bits != 3, fmt="gptq")
    layer = layer.cuda()
    args = (layer.qweight, layer.qzeros, layer.scales, layer.g_idx, bits, layer.zero_offset)
    assert torch.equal(triton_gptq.gptq_dequantize(*args, out_dtype=torch.float32),
                       torch_ref.gptq_dequantize(*args, out_dtype=torch.float32))
    for M in (1, 3, 17, 256, 1024):  # 1-3: the decode kernel; 1024 > FUSED_MAX_M: dequantize + cuBLAS
        x = torch.randn(M, K, device="cuda", dtype=dtype)
        ref = (x.float() @ torch_ref.gptq_dequantize(*args).to(dtype).float()).to(dtype)
        got = triton_gptq.gptq_matmul(x, *args)
        tol = 1e-4 if dtype == torch.float32 else 2e-2
        torch.testing.assert_close(got.float(), ref.float(), rtol=tol, atol=tol * ref.abs().max().item())
    # autograd through the Triton path
    x = torch.randn(8, K, device="cuda", dtype=dtype, requires_grad=True)
    layer(x).float().sum().backward()
    W = layer.dequantize(torch.float32)
    torch.testing.assert_close(x.grad.float(), torch.ones(8, N, device="cuda") @ W, rtol=3e-2, atol=3e-2)
