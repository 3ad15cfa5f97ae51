"""On one GPU: ZeRO-2/ZeRO-3/FSDP2 with world size 1 against plain training on the same batches.

    python tests/gpu_sharded_world1.py [--steps 8] [--keep DIR]

Builds a random small Llama (byte tokenizer, no hub), an NF4 recipe with base.quant_storage auto (the 4-bit
weights stored in the compute dtype, bf16 here, so ZeRO-3/FSDP shard them) and runs `finetune sft` once
plainly and once per accelerate config in recipes/accelerate/ with --num_processes 1. Each accelerate run is
then repeated from its half-way checkpoint with --resume (as if it had died there), which must end with the
same adapter. Prints one table; the DeepSpeed rows need deepspeed installed. Not collected by pytest.
--cpu: a quick check of the script itself on a CPU box (tiny model, fp32; FSDP is refused there).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def chat_rows(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    words = ["red", "blue", "green", "gold", "gray", "pink", "teal", "navy"]
    rows = []
    for _ in range(n):
        picked = rng.sample(words, 4)
        rows.append({"messages": [{"role": "user", "content": "reverse: " + " ".join(picked)},
                                  {"role": "assistant", "content": " ".join(reversed(picked)) + " #ok"}]})
    return rows


def run(mode: str, recipe: Path, *extra: str) -> tuple[float, str]:
    # Keep any PYTHONPATH the caller set (wheels carried to a GPU box live there), with the repo first.
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p),
           "TOKENIZERS_PARALLELISM": "false"}
    if not torch.cuda.is_available() and mode == "ddp":
        env["ACCELERATE_USE_CPU"] = "true"
    if mode == "plain":
        cmd = [sys.executable, "-m", "finetune", "sft", str(recipe), *extra]
    else:
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
               str(REPO / "recipes" / "accelerate" / f"{mode}.yaml"), "--num_processes", "1",
               "--main_process_port", "0", "-m", "finetune", "sft", str(recipe), *extra]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=REPO)
    if proc.returncode != 0:
        lines = proc.stderr.strip().splitlines() or ["failed"]
        why = next((x for x in lines if x.startswith("error:")), None)
        why = why or next((x for x in reversed(lines) if "Error" in x), lines[-1])
        return time.perf_counter() - t0, why.replace("[rank0]: ", "")[:160]
    return time.perf_counter() - t0, ""


def metrics(out: Path) -> tuple[list[float], float]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if "loss" in r]
    return losses, max((r.get("peak_mem_mb") or 0) for r in rows)


def adapter_diff(a: Path, b: Path) -> float:
    x, y = load_file(str(a / "adapter_model.safetensors")), load_file(str(b / "adapter_model.safetensors"))
    return max(float((x[k].float() - y[k].float()).abs().max()) for k in x)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--keep", help="work directory to keep (default: a temporary one)")
    ap.add_argument("--cpu", action="store_true", help="dry run of this script on CPU")
    args = ap.parse_args()
    assert torch.cuda.is_available() or args.cpu, "needs a CUDA GPU (or --cpu for a dry run)"
    from finetune.synthetic import save_random_model

    work = Path(args.keep or tempfile.mkdtemp(prefix="sharded-world1-"))
    work.mkdir(parents=True, exist_ok=True)
    shape = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2) if args.cpu else dict(
        hidden_size=1024, intermediate_size=2816, num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=4)
    model_dir = save_random_model("tiny", work / "model", **shape)
    for name, n, seed in (("train", 256, 1), ("eval", 32, 2)):
        (work / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in chat_rows(n, seed)))
    half = args.steps // 2
    recipe = {
        "base": {"model": str(model_dir), "quantization": "nf4", "quant_storage": "auto", "compute_dtype": "auto"},
        "lora": {"r": 16, "alpha": 32, "dropout": 0.0},
        "data": {"train": str(work / "train.jsonl"), "eval": str(work / "eval.jsonl"), "max_length": 128},
        "train": {"max_steps": args.steps, "micro_batch_size": 2 if args.cpu else 8, "gradient_accumulation": 2,
                  "learning_rate": 1e-3,
                  "lr_scheduler": "cosine", "warmup_steps": 1, "save_every": half, "save_total_limit": 5,
                  "gradient_checkpointing": True, "seed": 0},
        "tracking": {"wandb": {"mode": "disabled"}},
    }
    has_ds = importlib.util.find_spec("deepspeed") is not None
    results = {}
    for mode in ("plain", "ddp", "zero2", "zero3", "fsdp"):
        out = work / mode
        shutil.rmtree(out, ignore_errors=True)
        path = work / f"{mode}.yaml"
        path.write_text(yaml.safe_dump({**recipe, "output": {"dir": str(out)}}))
        if mode.startswith("zero") and not has_ds:
            results[mode] = {"error": "skipped: deepspeed not installed"}
            continue
        wall, err = run(mode, path)
        if err:
            results[mode] = {"error": err}
            continue
        losses, peak = metrics(out)
        row = {"wall": wall, "losses": losses, "peak": peak}
        if mode != "plain":
            # Continue from the half-way checkpoint as if the run had died there.
            resumed = work / f"{mode}-resumed"
            shutil.rmtree(resumed, ignore_errors=True)
            shutil.copytree(out, resumed)
            shutil.rmtree(resumed / "adapter")
            for late in resumed.glob("checkpoint-*"):
                if int(late.name.split("-")[1]) > half:
                    shutil.rmtree(late)
            path2 = work / f"{mode}-resumed.yaml"
            path2.write_text(yaml.safe_dump({**recipe, "output": {"dir": str(resumed)}}))
            _, err2 = run(mode, path2, "--resume")
            row["resume"] = err2 or adapter_diff(out / "adapter", resumed / "adapter")
        results[mode] = row

    plain = results["plain"]
    dtype = "fp32" if args.cpu else "bf16"
    print(f"\nNF4 (quant_storage = compute dtype), {dtype} compute, {args.steps} steps, world size 1, same batches")
    print(f"{'setup':7} {'loss@1':>8} {'loss@end':>9} {'max|dloss|':>11} {'max|dadapter|':>14} {'resume dadapter':>16} "
          f"{'peak MiB':>9} {'wall s':>7}")
    for mode, r in results.items():
        if "error" in r:
            print(f"{mode:7} {r['error']}")
            continue
        dloss = max(abs(a - b) for a, b in zip(r["losses"], plain["losses"])) if "losses" in plain else float("nan")
        dad = adapter_diff(work / mode / "adapter", work / "plain" / "adapter") if "losses" in plain else float("nan")
        res = r.get("resume", "")
        res = f"{res:.2e}" if isinstance(res, float) else (res[:16] if res else "-")
        print(f"{mode:7} {r['losses'][0]:8.4f} {r['losses'][-1]:9.4f} {dloss:11.2e} {dad:14.2e} {res:>16} "
              f"{r['peak']:9.0f} {r['wall']:7.1f}")
    print(f"(work directory: {work})")


if __name__ == "__main__":
    main()
