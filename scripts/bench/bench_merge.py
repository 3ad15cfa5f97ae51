"""Benchmark `finetune merge` on a Llama-3.1-8B-shaped model: wall time and peak host/GPU memory.

Builds (once, in --work) a random bf16 model of the published shape and a random LoRA adapter in peft format
(r=16 on every Linear of every layer, as if trained on an NF4 base by `finetune sft`), then merges it into
NF4 (bitsandbytes serialization) and into GPTQ (4-bit g128, random-token calibration), with the fidelity
report off (it would load whole models; the merge itself streams one layer at a time). Prints one line per
merge and a JSON summary. Weights are random: the figures are about time and memory, not quality.

On the lent H100 (torch, transformers, peft, accelerate, safetensors, triton; bitsandbytes and datasets
carried as wheels; no network), from the repository root:

    PYTHONPATH=. python -m scripts.bench.bench_merge --device cuda                 # all 32 layers
    PYTHONPATH=. python -m scripts.bench.bench_merge --device cuda --layers 8      # a quicker subset
CPU smoke test:  python -m scripts.bench.bench_merge --shape tiny --device cpu --calib-samples 4
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import time
from pathlib import Path

import torch
from peft import LoraConfig
from safetensors.torch import save_file

from finetune.merge import MergeConfig, merge
from finetune.merge.config import format_options
from finetune.synthetic import save_random_model
from quant.files import staged
from quant.tensorfiles import Checkpoint
from quant.formats.registry import resolve_base

LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def build_base(shape: str, layers: int | None, path: Path, device: str) -> Path:
    if (path / "config.json").exists():
        return path
    overrides = {"num_hidden_layers": layers} if layers else {}
    t0 = time.perf_counter()
    with staged(path) as tmp:
        save_random_model(shape, tmp, dtype=torch.bfloat16, device=device, **overrides)
    print(f"base: random {shape} ({layers or 'all'} layers) written to {path} in {time.perf_counter() - t0:.0f}s")
    return path


def build_adapter(base: Path, path: Path, rank: int, seed: int = 0) -> Path:
    """A peft LoRA adapter directory as `finetune sft` leaves it: adapter files, base.json, recipe.yaml."""

    if (path / "adapter_config.json").exists():
        return path
    ckpt = Checkpoint(base)
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for key in ckpt.keys():
        module, _, leaf = key.rpartition(".")
        if leaf != "weight" or module.rpartition(".")[2] not in LINEARS:
            continue
        out_f, in_f = ckpt.shape(key)
        # Trained-adapter magnitudes: A ~ kaiming-uniform as peft initialises it, B small but nonzero.
        bound = 1 / in_f ** 0.5
        tensors[f"base_model.model.{module}.lora_A.weight"] = (torch.rand(rank, in_f, generator=g) * 2 - 1) * bound
        tensors[f"base_model.model.{module}.lora_B.weight"] = torch.randn(out_f, rank, generator=g) * 1e-3
    path.mkdir(parents=True, exist_ok=True)
    LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=list(LINEARS), task_type="CAUSAL_LM",
               base_model_name_or_path=str(base)).save_pretrained(str(path))
    save_file(tensors, str(path / "adapter_model.safetensors"))
    resolve_base(str(base), str(base), "nf4", compute_dtype=torch.bfloat16).save(path)
    (path / "recipe.yaml").write_text(f"base:\n  model: {base}\n  quantization: nf4\n  double_quant: true\n"
                                      "  compute_dtype: bfloat16\n")
    return path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="llama-3.1-8b", help="finetune.synthetic.SHAPES key")
    p.add_argument("--layers", type=int, default=None, help="decoder layers (default: all of the shape)")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--formats", default="nf4,gptq", help="comma-separated merge formats")
    p.add_argument("--calib-samples", type=int, default=16, help="random-token calibration windows for gptq")
    p.add_argument("--calib-seqlen", type=int, default=512)
    p.add_argument("--group-size", type=int, default=None, help="gptq group size (default 128; 32 for tiny)")
    p.add_argument("--work", default="/tmp/bench-merge", help="where the base, adapter and outputs go")
    p.add_argument("--keep", action="store_true", help="keep the merged outputs")
    args = p.parse_args()

    work = Path(args.work)
    tag = f"{args.shape}-L{args.layers or 'all'}"
    base = build_base(args.shape, args.layers, work / f"base-{tag}", args.device)
    adapter = build_adapter(base, work / f"adapter-{tag}-r{args.rank}", args.rank)
    vocab = json.loads((base / "config.json").read_text())["vocab_size"]
    g = torch.Generator().manual_seed(1)
    calib = [torch.randint(0, vocab, (1, args.calib_seqlen), generator=g) for _ in range(args.calib_samples)]
    group = args.group_size or (32 if args.shape == "tiny" else 128)

    rows = []
    for fmt in args.formats.split(","):
        out = work / f"out-{tag}-{fmt}"
        shutil.rmtree(out, ignore_errors=True)
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        cfg = MergeConfig(adapter=adapter, out=out, format=fmt, report=False, device=args.device, progress=False)
        if cfg.fmt.accepts_calibration():
            cfg.calib = calib
        if fmt in format_options().get("group_size", ({}, []))[1]:
            cfg.options = {"group_size": group}
        result = merge(cfg)
        wall = time.perf_counter() - t0
        size = sum(f.stat().st_size for f in out.glob("*.safetensors"))
        row = {"format": fmt, "wall_s": round(wall, 1), "stream_s": result.report["stream_seconds"],
               "modules": result.modules_merged, "output_gb": round(size / 1e9, 2), **result.memory}
        rows.append(row)
        gpu = f", peak GPU {row['peak_gpu_mb'] / 1024:.2f} GiB" if row["peak_gpu_mb"] is not None else ""
        print(f"{fmt:5s}: {wall:7.1f} s wall; peak host RSS {row['peak_rss_mb'] / 1024:.2f} GiB, of which anonymous "
              f"{row['peak_anon_mb'] / 1024:.2f} GiB (+{row['peak_anon_increase_mb'] / 1024:.2f} GiB during the merge; "
              f"the rest is page cache of the memory-mapped inputs){gpu}; output {row['output_gb']} GB")
        if not args.keep:
            shutil.rmtree(out, ignore_errors=True)
    summary = {"shape": args.shape, "layers": args.layers, "rank": args.rank, "device": args.device,
               "gpu": torch.cuda.get_device_name() if args.device.startswith("cuda") else None,
               "process_max_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
               "calib": f"{args.calib_samples}x{args.calib_seqlen} random tokens", "merges": rows}
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
