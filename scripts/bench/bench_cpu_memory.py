"""Peak host memory and speed of CPU training variants of one recipe, each in its own process, in one run.

Each variant trains the recipe for a few steps (no eval, no samples, no tracking) in a fresh Python process
with `--set` overrides and optional environment variables, and reports the process's peak RSS (the kernel's
own high-water mark, so nothing is missed between samples), the seconds per optimizer step from step 2 on,
the CPU seconds the process used per step (user + system: far less disturbed than wall time when other work
shares the cores), and all three as ratios against the first variant, measured in the same run. Run it on an
otherwise idle machine for wall-time figures.

    python -m scripts.bench.bench_cpu_memory                       # recipes/quickstart.yaml, the default variants
    python -m scripts.bench.bench_cpu_memory --steps 6 --variant "gc:train.gradient_checkpointing=true"
    python -m scripts.bench.bench_cpu_memory --variant "mb1:train.micro_batch_size=1,train.gradient_accumulation=2"
    python -m scripts.bench.bench_cpu_memory --variant "arena2:env:MALLOC_ARENA_MAX=2"

A variant is `NAME:KEY=VALUE,...`; an item `env:NAME=VALUE` sets an environment variable instead.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

_CHILD = r"""
import json, resource, sys, time
from finetune.recipe import load_recipe
from finetune.train import loop
from finetune.train.strategy.base import Strategy

recipe = load_recipe(sys.argv[1], json.loads(sys.argv[2]))
stamps, cpu = [], []
real_step = Strategy.step
def timed_step(self, *a, **k):
    out = real_step(self, *a, **k)
    stamps.append(time.perf_counter())
    usage = resource.getrusage(resource.RUSAGE_SELF)
    cpu.append(usage.ru_utime + usage.ru_stime)
    return out
Strategy.step = timed_step
result = loop.train(recipe, echo=lambda *a, **k: None)
n = max(len(stamps) - 1, 1)
print("RESULT " + json.dumps({
    "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    "s_per_step": (stamps[-1] - stamps[0]) / n,
    "cpu_s_per_step": (cpu[-1] - cpu[0]) / n,
    "tokens_per_s": result.tokens_per_s,
    "train_loss_last": result.train_loss_last,
}))
"""

DEFAULT_VARIANTS = [
    "recipe:",
    "micro1xaccum2:train.micro_batch_size=1,train.gradient_accumulation=2",
    "checkpointing:train.gradient_checkpointing=true",
]


def parse_variant(text: str) -> tuple[str, list[str], dict]:
    name, _, body = text.partition(":")
    overrides, env = [], {}
    for item in filter(None, body.split(",")):
        if item.startswith("env:"):
            key, _, value = item[4:].partition("=")
            env[key] = value
        else:
            overrides.append(item)
    return name, overrides, env


def run_variant(recipe: str, steps: int, overrides: list[str], env: dict) -> dict:
    with tempfile.TemporaryDirectory(prefix="bench-cpu-mem-") as out:
        sets = [f"train.max_steps={steps}", "train.warmup_steps=0", "train.save_every=0", "train.eval_every=0",
                "data.eval=null", "data.eval_fraction=0", "samples.count=0", "tracking.wandb.mode=disabled",
                f"output.dir={out}/run", *overrides]
        proc = subprocess.run([sys.executable, "-c", _CHILD, recipe, json.dumps(sets)], cwd=REPO,
                              env={**os.environ, **env, "PYTHONPATH": str(REPO)}, capture_output=True, text=True)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise SystemExit(f"variant failed ({' '.join(overrides)} {env}):\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipe", default="recipes/quickstart.yaml")
    ap.add_argument("--steps", type=int, default=5, help="optimizer steps per variant (timed from step 2)")
    ap.add_argument("--variant", action="append", help="NAME:KEY=VALUE,...; repeatable (default: a set of three)")
    args = ap.parse_args()
    rows = []
    for text in args.variant or DEFAULT_VARIANTS:
        name, overrides, env = parse_variant(text)
        r = run_variant(args.recipe, args.steps, overrides, env)
        rows.append((name, r))
        print(f"{name}: {json.dumps(r)}", flush=True)
    base = rows[0][1]
    first = rows[0][0]
    print(f"\n| variant | peak RSS MiB | s/step | CPU s/step | RSS vs {first} | speed vs {first} | CPU time vs {first} |")
    print("|---|---|---|---|---|---|---|")
    for name, r in rows:
        print(f"| {name} | {r['peak_rss_mib']:.0f} | {r['s_per_step']:.2f} | {r['cpu_s_per_step']:.2f} | "
              f"{r['peak_rss_mib'] / base['peak_rss_mib']:.2f}x | {base['s_per_step'] / r['s_per_step']:.2f}x | "
              f"{r['cpu_s_per_step'] / base['cpu_s_per_step']:.2f}x |")


if __name__ == "__main__":
    main()
