"""GPTQ wall time and peak memory on a Llama-3.1-8B-shaped model with random weights (one GPU).

Needs only torch, transformers, triton, safetensors and tqdm (the lent GPU image has them; no network,
no datasets). The model is built directly on the GPU in bf16 from a config and calibrated with random
tokens: speed and memory do not depend on the weights' values (scripts/bench/quant_bench.py). The quantizer
flags are `quant gptq`'s, with its defaults.

    python -m scripts.bench.bench_gptq                      # all 32 layers, 128 x 2048 calibration tokens
    python -m scripts.bench.bench_gptq --layers 4           # a subset; per-block time is extrapolated to 32

By default the model is then parked in host memory and blocks visit the GPU one at a time (the mode that
lets an 8B model fit a small GPU budget); --no-offload keeps everything on the GPU.

Prints the configuration, wall time (capture + per block), extrapolated full-model time, peak GPU memory
(torch allocator) and peak host RSS, then times GPTQLinear (Triton, torch reference) against a dense bf16
matmul on one quantized down_proj.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from quant.gptq.model import quantize_model
from quant.gptq.nn import GPTQLinear
from quant.gptq.solver import GPTQConfig
from quant.settings import from_flags
from scripts.bench.quant_bench import arguments, build, device, host_peak_gib, random_calibration, sync, timed


def kernel_bench(layer: GPTQLinear, dense_w: torch.Tensor) -> None:
    print("\nGPTQLinear timing on one down_proj (ms per call):")
    print(f"{'tokens':>7} {'triton':>9} {'torch-ref':>10} {'dense bf16':>11}")
    for m in (1, 16, 256, 2048):  # up to 256 the fused kernel, above it dequantize + cuBLAS
        x = torch.randn(m, layer.in_features, device="cuda", dtype=torch.bfloat16)
        layer.kernel = "triton"
        t_tri = timed(lambda: layer(x))
        layer.kernel = "torch"
        t_ref = timed(lambda: layer(x))
        t_dense = timed(lambda: x @ dense_w.T)
        print(f"{m:>7} {t_tri:>9.3f} {t_ref:>10.3f} {t_dense:>11.3f}")
    layer.kernel = "auto"


def main() -> None:
    ap = arguments(__doc__, GPTQConfig, layers=32)
    ap.add_argument("--no-offload", dest="offload", action="store_false",
                    help="keep the whole model on the GPU (default: park it in host memory and bring one block "
                         "at a time, which is what lets large models fit)")
    ap.add_argument("--no-kernel-bench", dest="kernel_bench", action="store_false")
    a = ap.parse_args()
    dev = device(a, "bench_gptq.py")
    qcfg = from_flags(GPTQConfig, a)
    t0 = time.perf_counter()
    model, cfg, dense_down = build(a, dev)
    n_params = sum(p.numel() for p in model.parameters())
    name = torch.cuda.get_device_name() if dev == "cuda" else "cpu"
    print(f"built Llama-3.1-8B-shaped model with {a.layers} layers ({n_params / 1e9:.2f}B params, bf16) on "
          f"{name} in {time.perf_counter() - t0:.1f}s", flush=True)
    if a.offload and dev == "cuda":
        model.to("cpu")
        torch.cuda.empty_cache()

    calib = random_calibration(cfg, a.calib_samples, a.calib_seqlen)
    if dev == "cuda":
        torch.cuda.reset_peak_memory_stats()
    mem_before = torch.cuda.memory_allocated() if dev == "cuda" else 0
    sync(dev)
    t1 = time.perf_counter()
    report = quantize_model(model, calib if qcfg.calibrated else None, qcfg, device=dev)
    sync(dev)
    wall = time.perf_counter() - t1
    peak = torch.cuda.max_memory_allocated() if dev == "cuda" else 0
    per_layer_s = sum(e.seconds for e in report.layers) / a.layers
    # Everything but the one-off capture of block 0's inputs scales with the number of blocks, so scaling
    # the whole wall time slightly over-estimates the full model.
    full = wall * 32 / a.layers
    res = {
        "layers": a.layers, "calib": f"{a.calib_samples}x{a.calib_seqlen}", **qcfg.to_dict(),
        "wall_s": round(wall, 1), "solver_s_per_block": round(per_layer_s, 2),
        "extrapolated_32_layers_s": round(full, 1), "peak_gpu_gib": round(peak / 2**30, 2),
        "offload": a.offload, "gpu_before_gib": round(mem_before / 2**30, 2),
        "peak_host_rss_gib": round(host_peak_gib(), 2),
        "mean_rel_error": report.mean_error(),
    }
    print(f"\nquantized {len(report.layers)} Linears in {wall:.1f}s ({wall / a.layers:.1f}s per block, of which "
          f"{per_layer_s:.1f}s in the solver); extrapolated to 32 layers: {full / 60:.1f} min")
    where = "model parked in host memory, one block on the GPU at a time" if a.offload else "whole model on the GPU"
    print(f"peak GPU memory {res['peak_gpu_gib']} GiB ({where}; {res['gpu_before_gib']} GiB allocated before; "
          f"the full 32-layer bf16 model is ~15 GiB), peak host RSS {res['peak_host_rss_gib']} GiB")
    print(json.dumps(res))
    if a.kernel_bench and dev == "cuda":
        kernel_bench(model.model.layers[0].mlp.down_proj.cuda(), dense_down)
    if a.json:
        Path(a.json).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
