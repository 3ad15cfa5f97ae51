"""GPU checks of the GPTQ Triton kernels against the torch reference, without pytest.

The lent GPU image has torch, transformers and triton but no pytest; this runs the same comparisons as
the `gpu`-marked tests in tests/quant/test_gptq_nn.py, plus an end-to-end GPTQ run of a small random
Llama on the GPU whose logits must agree between the Triton and the torch path.

    python -m scripts.bench.gptq_gpu_check          # exits 1 on any mismatch
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from quant.feedback import HessianAccumulator
from quant.gptq import kernels as torch_ref
from quant.gptq.kernels import kernels_for
from quant.gptq.model import load_gptq_model, quantize_model, save_quantized
from quant.gptq.nn import QuantLinear
from quant.gptq.solver import GPTQConfig, gptq_quantize

CASES = [  # bits, group_size, desc_act, K, N, format
    (4, 128, False, 576, 1536, "gptq"), (4, 64, True, 1536, 576, "gptq"), (3, 64, True, 576, 192, "gptq"),
    (3, 128, False, 4096, 512, "gptq_v2"), (2, 32, False, 256, 128, "gptq"), (8, -1, False, 512, 256, "gptq"),
    (4, 128, True, 4096, 1024, "gptq_v2"), (4, 128, False, 14336, 4096, "gptq"),
]
FAILED = []


def report(label, ok, detail):
    print(f"{'PASS' if ok else 'FAIL'}  {label:58s} {detail}", flush=True)
    if not ok:
        FAILED.append(label)


def make_layer(bits, gs, desc_act, K, N, fmt):
    g = torch.Generator().manual_seed(K + N + bits)
    W = torch.randn(N, K, generator=g) * 0.02
    acc = HessianAccumulator(K, "cuda")
    acc.add((torch.randn(512, K, generator=g) * torch.linspace(0.1, 3, K)).cuda())
    res = gptq_quantize(W.cuda(), acc.H, GPTQConfig(bits=bits, group_size=gs, desc_act=desc_act, sym=bits != 3))
    return QuantLinear.from_result(res, checkpoint_format=fmt).cuda()


def kernel_checks():
    triton_gptq = kernels_for(torch.empty(0), "triton")  # the Triton kernels (Triton is optional: imported there)
    for bits, gs, desc, K, N, fmt in CASES:
        L = make_layer(bits, gs, desc, K, N, fmt)
        args = (L.qweight, L.qzeros, L.scales, L.g_idx, bits, L.zero_offset)
        name = f"{bits}-bit g{gs} {'act-order ' if desc else ''}{K}x{N} {fmt}"
        same = torch.equal(triton_gptq.gptq_dequantize(*args), torch_ref.gptq_dequantize(*args))
        report(f"dequant {name}", same, "bit-exact" if same else "differs")
        for dtype in (torch.float16, torch.bfloat16, torch.float32):
            worst = 0.0
            for M in (1, 17, 256, 1024):  # 1024 > FUSED_MAX_M: the dequantize + cuBLAS branch
                x = torch.randn(M, K, device="cuda", dtype=dtype)
                ref = x.float() @ torch_ref.gptq_dequantize(*args, out_dtype=dtype).float()
                got = triton_gptq.gptq_matmul(x, *args).float()
                worst = max(worst, ((got - ref).abs().max() / ref.abs().max()).item())
            tol = 1e-4 if dtype == torch.float32 else 1e-2
            report(f"matmul  {name} {str(dtype)[6:]}", worst < tol, f"max rel. diff {worst:.1e}")
        x = torch.randn(8, K, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        L(x).float().sum().backward()
        ref = torch.ones(8, N, device="cuda") @ L.dequantize(torch.float32)
        d = ((x.grad.float() - ref).abs().max() / ref.abs().max()).item()
        report(f"grad_x  {name} bf16", d < 2e-2, f"max rel. diff {d:.1e}")


def end_to_end():
    cfg = LlamaConfig(hidden_size=512, intermediate_size=1536, num_hidden_layers=2, num_attention_heads=8,
                      num_key_value_heads=4, vocab_size=1024)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).to(torch.float16)
    calib = [torch.randint(0, 1024, (1, 256)) for _ in range(16)]
    rep = quantize_model(model, calib, GPTQConfig(bits=4, group_size=128, desc_act=True), device="cuda",
                         progress=False)
    with tempfile.TemporaryDirectory() as d:
        save_quantized(model, Path(d) / "ckpt")
        q = load_gptq_model(Path(d) / "ckpt", device="cuda", dtype=torch.float16)
    ids = torch.randint(0, 1024, (2, 64), device="cuda")
    with torch.no_grad():
        a = q(ids).logits.float()
        for m in q.modules():
            if isinstance(m, QuantLinear):
                m.kernel = "torch"
        b = q(ids).logits.float()
    d = ((a - b).abs().max() / b.abs().max()).item()
    report("end-to-end GPTQ on cuda, logits triton vs torch path", d < 1e-2,
           f"max rel. diff {d:.1e}; mean layer rel. error {rep.mean_error():.2e}")


def main() -> int:
    if not torch.cuda.is_available():
        print("needs a CUDA GPU")
        return 2
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}")
    kernel_checks()
    end_to_end()
    print("all checks passed" if not FAILED else f"FAILED: {len(FAILED)} checks")
    return 1 if FAILED else 0


if __name__ == "__main__":
    sys.exit(main())
