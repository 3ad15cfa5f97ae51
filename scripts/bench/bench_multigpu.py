"""Multi-GPU QLoRA runs through `accelerate launch` and the shipped configs, against one GPU at the same global batch.

    python -m scripts.bench.bench_multigpu --gpus 2                                  # the four runs of issue #7
    python -m scripts.bench.bench_multigpu --gpus 4 --runs zero3-nf4,fsdp-nf4 --shape llama-70b --steps 6
    python -m scripts.bench.bench_multigpu --cpu --shape tiny --runs ddp-nf4 --steps 4   # smoke test on a CPU box

Builds a random model of --shape (bf16, saved once; a GPTQ 4-bit g128 RTN copy for *-gptq runs), synthetic
text, and for each run `RUN = MODE-BASE` (MODE: ddp, zero3, fsdp, taken from recipes/accelerate/MODE.yaml;
BASE: nf4 or gptq) launches `finetune sft` on --gpus processes with micro-batch --batch, and once on one GPU
with gradient_accumulation = --gpus, so both see the same global batch in the same order. ZeRO-3 and FSDP
runs use `base.quant_storage: auto` (the 4-bit weights stored in bf16, so they are sharded). Prints one table:
tokens/s (whole job) and peak memory of rank 0, scaling efficiency (tokens/s ÷ (gpus × one-GPU tokens/s)),
max per-step loss difference to the one-GPU run, and whether the saved adapter loads with peft.
NVLink multicast stays off in every launched process (NCCL_NVLS_ENABLE=0 and friends).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import yaml
from transformers import AutoModelForCausalLM

from finetune.model import load_adapter, load_base
from finetune.synthetic import random_model, save_model_dir, save_rtn_gptq, synthetic_text
from quant.formats.base import BaseSpec
from quant.formats.registry import base_format

REPO = Path(__file__).resolve().parents[2]

NO_MULTICAST = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}


def write_recipe(path: Path, model: Path, base: str, data: Path, out: Path, args, accumulation: int,
                 sharded: bool) -> Path:
    recipe = {
        "base": {"model": str(model), "quantization": base,
                 "compute_dtype": "float32" if args.cpu else "bfloat16",
                 **({"quant_storage": "auto"} if sharded else {})},
        "lora": {"r": 16, "alpha": 16, "dropout": 0.0},
        "data": {"train": str(data), "format": "text", "max_length": args.seq, "packing": True},
        "train": {"max_steps": args.steps, "micro_batch_size": args.batch, "gradient_accumulation": accumulation,
                  "learning_rate": 1e-4, "lr_scheduler": "constant", "gradient_checkpointing": True,
                  "log_every": 1, "save_every": 0},
        "output": {"dir": str(out)},
        "tracking": {"wandb": {"mode": "disabled"}},
    }
    path.write_text(yaml.safe_dump(recipe))
    return path


def launch(mode: str | None, processes: int, recipe: Path, cpu: bool) -> str:
    """Run `finetune sft`; for a launch, return its 'distributed: ...' line (a launcher can silently start one)."""
    env = {**os.environ, **NO_MULTICAST, "PYTHONPATH": str(REPO), "TOKENIZERS_PARALLELISM": "false"}
    if mode is None:
        cmd = [sys.executable, "-m", "finetune", "sft", str(recipe)]
    else:
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
               str(REPO / "recipes" / "accelerate" / f"{mode}.yaml"), "--num_processes", str(processes),
               "-m", "finetune", "sft", str(recipe)]
        if cpu:
            env.update(ACCELERATE_USE_CPU="true", OMP_NUM_THREADS="1")  # gloo; the config says MULTI_GPU
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[-6:])} failed:\n{proc.stderr[-3000:]}")
    line = next((x for x in (proc.stdout + proc.stderr).splitlines() if x.startswith("distributed: ")), "")
    if mode is not None and f"{processes} processes" not in line:
        raise RuntimeError(f"{mode}: expected {processes} processes, the run says {line or 'nothing'!r}")
    return line


def summary(run_dir: Path) -> dict:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "loss" in r and "tokens_per_s" in r]
    steady = steps[2:] or steps  # the first steps include allocator and kernel warm-up
    return {"losses": [r["loss"] for r in steps], "tok_s": sum(r["tokens_per_s"] for r in steady) / len(steady),
            "peak_gib": max(r["peak_mem_mb"] for r in steps) / 1024}


def adapter_loads(run_dir: Path, base_dir: Path, base: str) -> bool:
    """peft's PeftModel.from_pretrained on the base (the base the run recorded, for a stored-quantized base such
    as GPTQ; else the float checkpoint), on the CPU."""

    try:
        model = (load_base(BaseSpec.read(run_dir / "adapter"), torch.device("cpu")).model
                 if base_format(base).stored_quantized
                 else AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.bfloat16))
        load_adapter(model, run_dir / "adapter")
        return True
    except Exception as e:  # the table reports it; the run's own log has the detail
        print(f"adapter of {run_dir} does not load: {e}", flush=True)
        return False


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gpus", type=int, default=2)
    ap.add_argument("--runs", default="ddp-nf4,zero3-nf4,fsdp-nf4,ddp-gptq")
    ap.add_argument("--shape", default="llama-3.1-8b")
    ap.add_argument("--batch", type=int, default=2, help="micro-batch per process")
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--cpu", action="store_true", help="gloo processes on CPU (smoke test; FSDP is GPU-only)")
    args = ap.parse_args()
    if not args.cpu and torch.cuda.device_count() < args.gpus:
        raise SystemExit(f"--gpus {args.gpus} but {torch.cuda.device_count()} CUDA devices are visible")

    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench-multigpu-"))
    dev, dtype = ("cpu", torch.float32) if args.cpu else ("cuda", torch.bfloat16)
    model = random_model(args.shape, dtype=dtype, device=dev)
    bases = {run.partition("-")[2] for run in args.runs.split(",")}
    # A base quantized while loading trains from the float checkpoint; a stored-quantized one (GPTQ) from an
    # RTN GPTQ copy of it.
    stored = {b for b in bases if base_format(b, f"--runs base {b!r}").stored_quantized}
    float_dir = save_model_dir(model, work / "bf16")
    quantized_dir = save_rtn_gptq(model, work / "gptq", group_size=32 if args.shape == "tiny" else 128) \
        if stored else None
    dirs = {b: quantized_dir if b in stored else float_dir for b in bases}
    del model
    if not args.cpu:
        torch.cuda.empty_cache()
    data = synthetic_text(work / "text.jsonl", rows=args.steps * args.batch * args.gpus * 2 + 16, chars=args.seq + 64)

    rows, single = [], {}
    for run in args.runs.split(","):
        mode, _, base = run.partition("-")
        if base not in dirs or not (REPO / "recipes" / "accelerate" / f"{mode}.yaml").exists():
            raise SystemExit(f"unknown run {run!r}: MODE-BASE with MODE in ddp/zero2/zero3/fsdp, BASE nf4/gptq")
        sharded = mode in ("zero3", "fsdp")
        key = (base, sharded)
        if key not in single:  # one-GPU reference at the same global batch
            out = work / f"single-{base}{'-sharded' if sharded else ''}"
            launch(None, 1, write_recipe(work / f"{out.name}.yaml", dirs[base], base, data, out, args,
                                         args.gpus, sharded), args.cpu)
            single[key] = summary(out)
            print(f"1 process {base}{' (bf16 storage)' if sharded else ''}: {single[key]['tok_s']:.0f} tok/s, "
                  f"peak {single[key]['peak_gib']:.2f} GiB", flush=True)
        out = work / run
        setup = launch(mode, args.gpus, write_recipe(work / f"{run}.yaml", dirs[base], base, data, out, args, 1,
                                                     sharded), args.cpu)
        s, ref = summary(out), single[key]
        diff = max(abs(a - b) / abs(b) for a, b in zip(s["losses"], ref["losses"]))
        rows.append((run, s, ref, diff, adapter_loads(out, dirs[base], base)))
        print(f"{run} ({setup}): {s['tok_s']:.0f} tok/s, peak {s['peak_gib']:.2f} GiB, loss diff {diff:.2%}",
              flush=True)

    where = "CPU processes" if args.cpu else torch.cuda.get_device_name()
    print(f"\n{args.shape}, {args.gpus} x {where}, micro-batch {args.batch} x {args.seq} per process, {args.steps} steps")
    print("| run | tok/s | 1-process tok/s | scaling efficiency | peak GiB rank 0 | 1-process peak GiB | "
          "max rel. loss diff | adapter loads with peft |")
    print("|---|---|---|---|---|---|---|---|")
    for run, s, ref, diff, loads in rows:
        print(f"| {run} | {s['tok_s']:.0f} | {ref['tok_s']:.0f} | {s['tok_s'] / (args.gpus * ref['tok_s']):.0%} | "
              f"{s['peak_gib']:.2f} | {ref['peak_gib']:.2f} | {diff:.2%} | {'yes' if loads else 'NO'} |")


if __name__ == "__main__":
    main()
