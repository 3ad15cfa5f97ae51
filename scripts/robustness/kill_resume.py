"""Kill `finetune sft` at random points, resume it, and compare the final adapter with an uninterrupted run.

    python -m scripts.robustness.kill_resume [--kills 20] [--seed 0] [--json OUT.json] [--objective dpo]

A tiny random Llama trains on CPU (LoRA dropout, cosine schedule with warm-up, gradient accumulation: every
piece of state a resume must restore), checkpointing every step and keeping two. Each trial starts a run in
a fresh directory and SIGKILLs it, again and again, until it has taken its share of the kills; then the run
is resumed to the end. Kill points are drawn at random from three kinds:
- `time`:       a uniform random moment of the run (start-up, training, saving);
- `checkpoint`: a random few milliseconds after a checkpoint's temporary directory appears (mid-write,
                mid-manifest, mid-rename, mid-prune);
- `adapter`:    likewise for the final adapter's temporary directory.
After every kill the directory is checked: each `checkpoint-N` under its final name must verify against its
manifest, the newest valid step must never go backwards, and an `adapter/` must be complete (data loss
otherwise). The final adapters are compared with the uninterrupted run's: max |delta| (goal 0 on CPU).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml
from safetensors.torch import load_file

from finetune.synthetic import save_random_model
from finetune.train.checkpoint import checkpoint_problem, list_checkpoints

REPO = Path(__file__).resolve().parents[2]

STEPS = 8


def make_inputs(root: Path, objective: str = "sft") -> Path:
    """Tiny model, data and recipe under `root`; returns the recipe path (output.dir: root/run). A preference
    objective trains on pairs (the right answer against the words as given) with its reference precomputed, the
    pass a resumed run makes again."""

    model = save_random_model("tiny", root / "model", num_hidden_layers=1)
    words = ["red", "blue", "green", "gold", "gray", "pink", "teal", "plum"]
    rows = [{"messages": [{"role": "user", "content": f"say {a} {b}"}, {"role": "assistant", "content": f"{b} {a}"}]}
            for a in words for b in words[:4]]
    if objective != "sft":
        rows = [{"prompt": r["messages"][:1], "chosen": r["messages"][1:],
                 "rejected": [{"role": "assistant", "content": r["messages"][0]["content"][4:]}]} for r in rows]
    (root / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    recipe = {
        "base": {"model": str(model), "quantization": "nf4", "compute_dtype": "float32"},
        "lora": {"r": 4, "alpha": 8, "dropout": 0.1},
        "data": {"train": str(root / "train.jsonl"), "max_length": 48, "packing": True},
        "train": {"max_steps": STEPS, "micro_batch_size": 2, "gradient_accumulation": 2, "learning_rate": 5e-3,
                  "lr_scheduler": "cosine", "warmup_steps": 2, "gradient_checkpointing": True, "seed": 3,
                  "save_every": 1, "save_total_limit": 2},
        "output": {"dir": "run"},
        "tracking": {"wandb": {"mode": "disabled"}},
    }
    if objective != "sft":
        recipe["preference"] = {"objective": objective, "reference": "precomputed"}
    path = root / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def _env() -> dict:
    pythonpath = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)
    return {**os.environ, "PYTHONPATH": pythonpath, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
            "TOKENIZERS_PARALLELISM": "false", "WANDB_SILENT": "true"}


def start(recipe: Path, cwd: Path, resume: bool) -> subprocess.Popen:
    command = (yaml.safe_load(recipe.read_text()).get("preference") or {}).get("objective", "sft")
    # --resume-if-present: a kill before the run marked its directory leaves nothing to resume, as a script meets it.
    cmd = [sys.executable, "-m", "finetune", command, str(recipe), "-q", *(["--resume-if-present"] if resume else [])]
    return subprocess.Popen(cmd, cwd=cwd, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def finish(proc: subprocess.Popen) -> None:
    _, err = proc.communicate(timeout=900)
    if proc.returncode != 0:
        raise RuntimeError(f"run failed with exit {proc.returncode}: {err[-2000:]}")


def _names(run: Path, prefix: str) -> set[str]:
    try:
        return {e.name for e in os.scandir(run) if e.name.startswith(prefix)}
    except FileNotFoundError:
        return set()


def _temp_entries(run: Path, prefix: str) -> bool:
    return bool(_names(run, prefix))


def kill_at(proc: subprocess.Popen, run: Path, kind: str, rng: random.Random, duration: float) -> str | None:
    """SIGKILL `proc` at a point of `kind`; returns what was in progress, or None if it finished first."""
    if kind == "time":
        deadline = time.monotonic() + rng.uniform(0.2, duration)
        while time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.005)
    else:
        # The n-th checkpoint this process writes (a random one of its first three), or the adapter, a random few
        # milliseconds after its temporary directory appears. The process is stopped (SIGSTOP) before we look, so
        # what we see is what the kill interrupts; a write that finished inside the jitter sends us to the next one.
        prefix, nth = (".tmp-checkpoint-", rng.randint(1, 3)) if kind == "checkpoint" else (".tmp-adapter-", 1)
        busy = (prefix, ".trash-") if kind == "checkpoint" else (prefix,)
        seen, jitter = set(), rng.uniform(0, 0.03)
        while proc.poll() is None:
            seen |= _names(run, prefix)
            if len(seen) < nth:
                time.sleep(0.0005)
                continue
            time.sleep(jitter)
            proc.send_signal(signal.SIGSTOP)
            if any(_temp_entries(run, p) for p in busy) or proc.poll() is not None:
                break
            proc.send_signal(signal.SIGCONT)
            nth, jitter = len(seen) + 1, 0.0
    if proc.poll() is not None:
        return None
    during = ("checkpoint write" if _temp_entries(run, ".tmp-checkpoint-") else
              "adapter write" if _temp_entries(run, ".tmp-adapter-") else
              "prune" if _temp_entries(run, ".trash-") else "training or start-up")
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    return during


def damage_after_kill(run: Path, newest_before: int) -> tuple[list[str], int]:
    """Problems found in `run` after a kill (data loss), and the newest valid checkpoint step."""

    problems, newest = [], 0
    for ckpt in list_checkpoints(run):
        problem = checkpoint_problem(ckpt)
        if problem:
            problems.append(f"{ckpt.name}: {problem}")
        else:
            newest = max(newest, int(ckpt.name.split("-")[1]))
    if newest < newest_before:
        problems.append(f"newest valid checkpoint went back from {newest_before} to {newest}")
    adapter = run / "adapter"
    if adapter.exists() and not ((adapter / "adapter_config.json").is_file()
                                 and (adapter / "adapter_model.safetensors").is_file()):
        problems.append("adapter/ incomplete under its final name")
    return problems, max(newest, newest_before)


def max_delta(a_dir: Path, b_dir: Path) -> float:
    a = load_file(str(a_dir / "adapter_model.safetensors"))
    b = load_file(str(b_dir / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def trial(recipe: Path, cwd: Path, kills: int, rng: random.Random, duration: float, log) -> dict:
    """One run directory killed `kills` times, then resumed to the end."""
    run = cwd / "run"
    points, lost, newest, first = [], [], 0, True
    while len(points) < kills:
        kind = rng.choice(["time", "checkpoint", "checkpoint", "adapter"] if points else ["time", "checkpoint"])
        proc = start(recipe, cwd, resume=not first)
        first = False
        during = kill_at(proc, run, kind, rng, duration)
        if during is None:  # finished before the kill point: this trial is over
            finish(proc)
            break
        problems, newest = damage_after_kill(run, newest)
        points.append(f"{kind}: {during}")
        lost += problems
        log(f"  kill {len(points)} ({kind}) during {during}; newest valid checkpoint {newest}"
            + (f"; LOST: {problems}" if problems else ""))
    finish(start(recipe, cwd, resume=True))  # to the end (or, if it had finished, once more: same adapter)
    return {"kills": points, "data_loss": lost, "run": run}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kills", type=int, default=20, help="kills in total (default 20)")
    ap.add_argument("--per-trial", type=int, default=4, help="kills per run directory (default 4)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", help="write the figures here")
    ap.add_argument("--objective", default="sft", choices=["sft", "dpo", "orpo", "kto"])
    args = ap.parse_args()
    rng = random.Random(args.seed)
    root = Path(tempfile.mkdtemp(prefix="kill-resume-"))
    try:
        recipe = make_inputs(root, args.objective)
        ref = root / "reference"
        ref.mkdir()
        t0 = time.monotonic()
        finish(start(recipe, ref, resume=False))
        duration = time.monotonic() - t0
        print(f"uninterrupted run: {duration:.1f} s")
        results, k = [], 0
        while k < args.kills:
            cwd = root / f"trial-{len(results)}"
            cwd.mkdir()
            print(f"trial {len(results)}:")
            result = trial(recipe, cwd, min(args.per_trial, args.kills - k), rng, duration, print)
            result["max_delta"] = max_delta(ref / "run" / "adapter", result["run"] / "adapter")
            print(f"  final adapter vs uninterrupted: max |delta| = {result['max_delta']}")
            k += len(result["kills"])
            results.append(result)
        kinds = {}
        for r in results:
            for point in r["kills"]:
                kinds[point] = kinds.get(point, 0) + 1
        summary = {"kills": k, "trials": len(results), "kill_points": kinds,
                   "data_loss_cases": sum(len(r["data_loss"]) for r in results),
                   "max_abs_delta": max(r["max_delta"] for r in results)}
        print(json.dumps(summary, indent=1))
        if args.json:
            Path(args.json).write_text(json.dumps(summary, indent=1))
        return 0 if summary["data_loss_cases"] == 0 and summary["max_abs_delta"] == 0 else 1
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
