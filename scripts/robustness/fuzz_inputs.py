"""Try many bad inputs on the command lines (tiny random model, CPU) and count how each one ends.

    python -m scripts.robustness.fuzz_inputs [--quick] [--only GROUP] [--json OUT.json]

Every case runs the real CLI entry point (`finetune.cli.main`, or `quant.cli.main`) in this process, from a
scratch working directory, and is classified as
- clean:      exit 2 with one `error: ...` line on stderr (or argparse's usage error), no traceback;
- traceback:  any exception escaping the CLI, or any other exit status;
- accepted:   exit 0 and a sound result (finite adapter, finite logged losses, nothing written outside
              output.dir); or, for checkpoint damage, a resumed run that ends with the reference adapter;
- silent:     exit 0 although the case must be refused, or a broken result (NaN adapter, `null` losses,
              files outside output.dir, a resumed adapter that differs from the uninterrupted one);
- hang:       still running after --hang-seconds (stopped by SIGALRM, which interrupts Python code);
- refused:    a clean refusal of an input that is valid and must be accepted (a chat file as --calib);
and, whatever the outcome, files lost: a file of the case's directory or of the shared inputs (the model, the
data, the reference run) that changed or vanished, other than what the case allows the command to replace.
Groups: recipe values (every key x a list of bad values), recipe files, base models, output dirs, data
rows, damaged checkpoints, a full disk, flags (sft; fuzz_cases, fuzz_checkpoints), and where every command
writes, adapters, model configs, GGUF headers, chat templates, run files, pkg specs, first-hour mistakes
(fuzz_outputs, fuzz_files). Goal: 0 tracebacks, 0 silent, 0 hangs, 0 files lost.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import shutil
import signal
import sys
import tempfile
from collections import Counter
from pathlib import Path

# Before anything imports transformers / huggingface_hub / wandb: they read these once, at import.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_SILENT", "true")

import torch  # noqa: E402
import yaml  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from finetune.synthetic import save_random_model  # noqa: E402
from scripts.robustness.fuzz_cases import (Case, data_cases, file_cases, model_cases, outdir_cases,  # noqa: E402
                                          run_cli, value_cases)
from scripts.robustness.fuzz_checkpoints import checkpoint_cases  # noqa: E402
from scripts.robustness.fuzz_files import (adapter_cases, config_cases, gguf_cases, run_file_cases,  # noqa: E402
                                          template_cases)
from scripts.robustness.fuzz_outputs import first_hour_cases, output_cases, pkg_cases  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
MARKERS = ("CODE-RAN", "PICKLE-RAN")  # what a planted payload creates in env["root"] if it ever runs


class Hang(BaseException):
    """Raised by SIGALRM in a case that ran past --hang-seconds (a BaseException: no `except Exception` eats it)."""


def _files(*roots: Path) -> dict[str, tuple[int, int]]:
    """Every file under `roots` with its size and modification time (lock files, which claims create, aside)."""
    found = {}
    for root in roots:
        paths = [root] if root.is_file() else root.rglob("*") if root.is_dir() else []
        for p in paths:
            if not p.is_dir() and not p.name.endswith(".lock"):
                st = p.lstat()
                found[str(p)] = (st.st_size, st.st_mtime_ns)
    return found


def files_lost(before: dict, after: dict, allowed: list[Path]) -> list[str]:
    """Files of `before` that changed or vanished, outside the `allowed` entries."""
    return sorted(p for p, stat in before.items() if after.get(p) != stat
                  and not any(Path(p) == a or a in Path(p).parents for a in allowed))


def sound_result(out_dir: Path, cwd_before: set, cwd: Path) -> str | None:
    """Why an exit-0 run's result is broken, or None."""

    adapter = out_dir / "adapter" / "adapter_model.safetensors"
    if not adapter.exists():
        return "exit 0 without an adapter"
    if any(not bool(t.isfinite().all()) for t in load_file(str(adapter)).values()):
        return "adapter holds NaN/inf"
    for line in (out_dir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if "loss" in record and not (isinstance(record["loss"], float) and math.isfinite(record["loss"])):
            return f"logged loss {record['loss']!r}"
    stray = set(p.name for p in cwd.iterdir()) - cwd_before - {out_dir.name}
    if stray and not out_dir.resolve().is_relative_to(cwd.resolve()):
        return f"wrote outside output.dir: {sorted(stray)}"
    return None


def classify(case: Case, code, err: str, cause, out_dir: Path, cwd_before: set, cwd: Path) -> tuple[str, str]:
    if cause is not None:
        return "traceback", cause
    # Library progress bars and warnings may precede it; the error itself must be one line, and the last.
    lines = [ln for ln in err.splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith(("error: ", "finetune: error: "))]
    if code == 2:
        if "Traceback" not in err and len(errors) == 1 and lines[-1] == errors[0]:
            return ("refused", errors[0][:200]) if case.must_accept else ("clean", errors[0][:200])
        return "traceback", f"exit 2 without one error line: {err[-300:]!r}"
    if code != 0:
        return "traceback", f"exit {code}: {err[-300:]!r}"
    if case.must_refuse:
        return "silent", "exit 0 for input that must be refused"
    problem = case.verify(out_dir) if case.verify else sound_result(out_dir, cwd_before, cwd)
    return ("silent", problem) if problem else ("accepted", "")


def _alarm(signum, frame):
    raise Hang


def run_case(case: Case, env: dict, scratch: Path, hang_seconds: int) -> tuple[str, str, list[str]]:
    """(outcome, detail, files lost) of one case."""
    cwd = Path(tempfile.mkdtemp(dir=scratch, prefix="case-"))
    try:
        argv = case.prepare(cwd, env)
        out_dir = _out_dir(cwd) if case.out_dir is None else case.out_dir(cwd)
        before = set(p.name for p in cwd.iterdir())
        shared = [Path(env["model_dir"]), Path(env["train"]), env["root"] / "reference"]
        files_before = _files(cwd, *shared)
        with case.patch(cwd) if case.patch else contextlib.nullcontext():  # a mounted disk: judged mounted
            previous = signal.signal(signal.SIGALRM, _alarm)
            signal.alarm(hang_seconds)
            try:
                code, err, cause = run_cli(argv, cwd)
            except Hang:
                return "hang", f"still running after {hang_seconds} s", []
            finally:
                signal.alarm(0)
                signal.signal(signal.SIGALRM, previous)
            lost = files_lost(files_before, _files(cwd, *shared), [cwd / name for name in case.may_change])
            ran = [m for m in MARKERS if (env["root"] / m).exists()]
            if ran:
                return "silent", f"planted code ran ({ran})", lost
            outcome = classify(case, code, err, cause, out_dir, before, cwd)
            damaged = case.after(cwd, env) if case.after and outcome[0] != "traceback" else None
        return ("silent", damaged, lost) if damaged else (*outcome, lost)
    finally:
        shutil.rmtree(cwd, ignore_errors=True)


def _out_dir(cwd: Path) -> Path:
    """output.dir of the case's recipe (as written), relative to its working directory."""
    try:
        spec = yaml.safe_load((cwd / "r.yaml").read_text())["output"]["dir"]
    except Exception:  # noqa: BLE001 - no recipe, or no usable output.dir: the default
        spec = "runs/default"
    return cwd / str(spec) if isinstance(spec, str) else cwd / "runs/default"


def build_env(root: Path) -> dict:
    """The tiny model, a good data file and a good recipe dict the cases mutate."""

    model_dir = save_random_model("tiny", root / "tiny-model", num_hidden_layers=1)
    words = ["red", "blue", "green", "gold", "gray", "pink"]
    rows = [{"messages": [{"role": "user", "content": f"say {w}"}, {"role": "assistant", "content": w}]}
            for w in words * 4]
    train = root / "train.jsonl"
    train.write_text("".join(json.dumps(r) + "\n" for r in rows))
    recipe = {
        "base": {"model": str(model_dir), "quantization": "none", "compute_dtype": "float32"},
        "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
        "data": {"train": str(train), "max_length": 32, "packing": True},
        "train": {"max_steps": 2, "micro_batch_size": 2, "learning_rate": 1e-3, "lr_scheduler": "constant",
                  "gradient_checkpointing": False, "seed": 0},
        "output": {"dir": "run"},
        "tracking": {"wandb": {"mode": "disabled"}},
    }
    return {"root": root, "model_dir": model_dir, "train": train, "rows": rows, "recipe": recipe}


def _groups(env: dict, quick: bool) -> dict:
    return {"recipe values": lambda: value_cases(env, quick), "recipe files": lambda: file_cases(env),
            "base models": lambda: model_cases(env), "output dirs": lambda: outdir_cases(env),
            "data rows": lambda: data_cases(env), "checkpoints": lambda: checkpoint_cases(env),
            "outputs": lambda: output_cases(env), "adapters": lambda: adapter_cases(env),
            "model configs": lambda: config_cases(env), "gguf headers": lambda: gguf_cases(env),
            "templates": lambda: template_cases(env), "run files": lambda: run_file_cases(env),
            "pkg specs": lambda: pkg_cases(env), "first hour": lambda: first_hour_cases(env)}


def _line(name: str, counts: Counter, lost: int) -> str:
    return (f"{name:14s} {sum(counts.values()):5d} tried: clean {counts['clean']}, accepted {counts['accepted']}, "
            f"tracebacks {counts['traceback']}, silent {counts['silent']}, hangs {counts['hang']}, files lost {lost}"
            + (f", wrongly refused {counts['refused']}" if counts["refused"] else ""))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="a sample of the recipe-value cases (about 1/4)")
    ap.add_argument("--json", help="write the counts and every non-clean case here")
    ap.add_argument("--only", help="run only groups whose name contains this (comma-separated: any of these)")
    ap.add_argument("--hang-seconds", type=int, default=120, help="a case running longer hangs (default 120)")
    ap.add_argument("-v", "--verbose", action="store_true", help="print every case's outcome and message")
    args = ap.parse_args()

    logging.disable(logging.WARNING)
    torch.set_num_threads(1)
    root = Path(tempfile.mkdtemp(prefix="fuzz-inputs-"))
    try:
        env = build_env(root)
        totals, lost_total, report = Counter(), 0, {}
        for name, cases in _groups(env, args.quick).items():
            if args.only and not any(part.strip() and part.strip() in name for part in args.only.split(",")):
                continue
            counts, notes, lost_here = Counter(), [], 0
            for case in cases():
                outcome, detail, lost = run_case(case, env, root, args.hang_seconds)
                counts[outcome] += 1
                lost_here += bool(lost)
                if args.verbose:
                    print(f"  {outcome:9s} {case.name}: {detail}" + (f" LOST {lost[:3]}" if lost else ""))
                if outcome in ("traceback", "silent", "hang", "refused"):
                    notes.append(f"{outcome}: {case.name}: {detail}")
                if lost:
                    notes.append(f"files lost: {case.name}: {lost[:5]}")
            totals.update(counts)
            lost_total += lost_here
            report[name] = {"counts": dict(counts), "files_lost": lost_here, "problems": notes}
            print(_line(name, counts, lost_here), flush=True)
            for note in notes:
                print("    " + note)
        print(_line("total", totals, lost_total))
        if args.json:
            Path(args.json).write_text(json.dumps({"totals": dict(totals), "files_lost": lost_total,
                                                   "groups": report}, indent=1))
        faults = totals["traceback"] + totals["silent"] + totals["hang"] + totals["refused"] + lost_total
        return 0 if not faults else 1
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
