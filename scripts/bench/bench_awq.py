"""AWQ wall time and peak memory on a Llama-3.1-8B-shaped model with random weights (one GPU), and AWQLinear
forward/backward against a dense bf16 matmul.

    python -m scripts.bench.bench_awq --layers 4      # 4 of 32 blocks; the per-block time is extrapolated to 32
    python -m scripts.bench.bench_awq --smoke         # tiny shapes on CPU: checks the script itself

Same set-up as scripts/bench/bench_gptq.py (bf16 model built from a config, random calibration tokens, the model
parked in host memory with one block on the GPU at a time); speed and memory do not depend on the weights.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path


import torch  # noqa: E402
from scripts.bench.bench_gptq import LLAMA31_8B, host_peak_gib, sync, timed

from quant.awq.solver import AWQConfig  # noqa: E402
from quant.awq.model import quantize_model_awq  # noqa: E402
from quant.awq.nn import AWQLinear  # noqa: E402


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
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=4, help="decoder blocks to build and quantize (of 32)")
    ap.add_argument("--calib-samples", type=int, default=128)
    ap.add_argument("--calib-seqlen", type=int, default=2048)
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--search-tokens", type=int, default=AWQConfig.search_tokens)
    ap.add_argument("--json", default=None)
    ap.add_argument("--smoke", action="store_true")
    a = ap.parse_args()
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    if dev == "cpu" and not a.smoke:
        raise SystemExit("bench_awq.py needs a CUDA GPU (or --smoke)")
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(0)
    shape = dict(LLAMA31_8B, num_hidden_layers=a.layers)
    if a.smoke:
        shape.update(hidden_size=256, intermediate_size=512, num_attention_heads=4, num_key_value_heads=2,
                     vocab_size=1024)
        a.calib_samples, a.calib_seqlen = min(a.calib_samples, 4), min(a.calib_seqlen, 64)
    cfg = LlamaConfig(**shape)
    with torch.device(dev):
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16).eval()
    dense_down = model.model.layers[0].mlp.down_proj.weight.detach().clone()
    if dev == "cuda":
        model.to("cpu")
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    g = torch.Generator().manual_seed(1)
    calib = [torch.randint(0, cfg.vocab_size, (1, a.calib_seqlen), generator=g) for _ in range(a.calib_samples)]
    qcfg = AWQConfig(group_size=a.group_size, search_tokens=a.search_tokens)
    sync(dev)
    t = time.perf_counter()
    report = quantize_model_awq(model, calib, qcfg, device=dev)
    sync(dev)
    wall = time.perf_counter() - t
    res = {"layers": a.layers, "calib": f"{a.calib_samples}x{a.calib_seqlen}", "group_size": a.group_size,
           "search_tokens": a.search_tokens, "wall_s": round(wall, 1), "s_per_block": round(wall / a.layers, 2),
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
