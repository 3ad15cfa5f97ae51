"""AWQ wall time and peak memory on a Llama-3.1-8B-shaped model with random weights (one GPU), and AWQLinear
forward/backward against a dense bf16 matmul.

    python -m scripts.bench.bench_awq --layers 4      # 4 of 32 blocks; the per-block time is extrapolated to 32
    python -m scripts.bench.bench_awq --smoke         # tiny shapes on CPU: checks the script itself

Same set-up as scripts/bench/bench_gptq.py (scripts/bench/quant_bench.py: bf16 model built from a config, random
calibration tokens, the model parked in host memory with one block on the GPU at a time); speed and memory do not
depend on the weights. The quantizer flags are `quant awq`'s, with its defaults.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from quant.awq.model import quantize_model_awq
from quant.awq.nn import AWQLinear
from quant.awq.solver import AWQConfig
from quant.settings import from_flags
from scripts.bench.quant_bench import arguments, build, device, host_peak_gib, random_calibration, sync, timed


def layer_bench(layer: AWQLinear, dense_w: torch.Tensor) -> list[dict]:
    """ms per call: forward, and forward + backward to the input (what LoRA training on the base costs)."""
    rows = []
    print("\nAWQLinear on one down_proj (ms per call):")
    print(f"{'tokens':>7} {'awq fwd':>9} {'dense fwd':>10} {'awq fwd+bwd':>12} {'dense fwd+bwd':>14}")
    for m in (1, 16, 256, 2048, 8192):
        x = torch.randn(m, layer.in_features, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        g = torch.randn(m, layer.out_features, device="cuda", dtype=torch.bfloat16)
        with torch.no_grad():
            f_awq, f_dense = timed(lambda: layer(x)), timed(lambda: x @ dense_w.T)
        b_awq = timed(lambda: layer(x).backward(g), reps=10)
        b_dense = timed(lambda: (x @ dense_w.T).backward(g), reps=10)
        rows.append(dict(tokens=m, awq_fwd=f_awq, dense_fwd=f_dense, awq_fwd_bwd=b_awq, dense_fwd_bwd=b_dense))
        print(f"{m:>7} {f_awq:>9.3f} {f_dense:>10.3f} {b_awq:>12.3f} {b_dense:>14.3f}")
    return rows


def main() -> None:
    a = arguments(__doc__, AWQConfig, layers=4).parse_args()
    dev = device(a, "bench_awq.py")
    qcfg = from_flags(AWQConfig, a)
    model, cfg, dense_down = build(a, dev)
    if dev == "cuda":
        model.to("cpu")
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    calib = random_calibration(cfg, a.calib_samples, a.calib_seqlen)
    sync(dev)
    t = time.perf_counter()
    report = quantize_model_awq(model, calib, qcfg, device=dev)
    sync(dev)
    wall = time.perf_counter() - t
    res = {"layers": a.layers, "calib": f"{a.calib_samples}x{a.calib_seqlen}", **qcfg.to_dict(),
           "wall_s": round(wall, 1), "s_per_block": round(wall / a.layers, 2),
           "extrapolated_32_layers_s": round(wall * 32 / a.layers, 1),
           "peak_gpu_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if dev == "cuda" else 0,
           "peak_host_rss_gib": round(host_peak_gib(), 2), "mean_rel_error": report.mean_error(),
           "device": torch.cuda.get_device_name() if dev == "cuda" else "cpu"}
    print(f"AWQ: {len(report.layers)} Linears in {wall:.1f}s ({wall / a.layers:.1f}s per block); extrapolated to "
          f"32 layers: {wall * 32 / a.layers / 60:.1f} min; peak GPU {res['peak_gpu_gib']} GiB")
    print(json.dumps(res))
    if dev == "cuda":
        res["layer_ms"] = layer_bench(model.model.layers[0].mlp.down_proj.cuda(), dense_down.cuda())
    if a.json:
        Path(a.json).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
