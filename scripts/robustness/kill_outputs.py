"""Kill `finetune merge` and `quant gptq` with --overwrite at random moments (a real SIGKILL from outside) on a
tiny model, and count what the kills cost: data-loss cases and leftover temporary entries, goal 0 for both.

Built once in --work: a tiny random Llama with a byte tokenizer and a LoRA run trained on it for 2 steps. Each
command alternates between two settings whose outputs differ (merge: bf16 / fp16; quant: RTN 4 / 8 bits), so
`--out` always holds one of two known complete models; their fingerprints (every file's sha256; the timing logs
merge_report.json and quant_log.json are only checked to be whole JSON) come from one uninterrupted run each.

A trial starts the command over the current --out with the other setting, waits until it starts writing (its
driver prints phase markers), SIGKILLs it after a random delay drawn uniformly from 1.1 x that command's
measured time from there until the new model is in place (earlier kills find nothing written, later ones the
finished model), then does what the next run for --out does first (quant.files.exclusive + recover) and checks:
- data loss: --out is not one of the two complete models afterwards (goal 0);
- leftovers: temporary entries of --out still there afterwards (goal 0);
- missing at the kill: --out absent at the moment of the kill (0 with RENAME_EXCHANGE; the fallback scheme has
  one such moment between its two renames, which recover undoes).
Half the trials force the fallback (a filesystem without RENAME_EXCHANGE). The driver sleeps --slow seconds
before each rename/exchange/rmdir of the replacement and before its first unlink (removing the old model), so
that random kills land there too.

    PYTHONPATH=. python -m scripts.robustness.kill_outputs --kills 20 --json /tmp/kill_outputs.json    # 20 per command
"""

from __future__ import annotations

import argparse
import collections
import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from finetune.recipe import recipe_from_dict
from finetune.synthetic import byte_tokenizer, random_model
from finetune.train.loop import train
from quant.files import exclusive, recover
from quant.replace import temporaries

ROOT = Path(__file__).resolve().parents[2]
TIMING_LOGS = {"merge_report.json", "quant_log.json"}

# Runs the CLI module argv[3] in the child: marks phases on stdout, slows the replacement, may force the fallback.
DRIVER = r"""
import os, sys, time
import quant.files as files, quant.replace as replace
slow, scheme, module, argv = float(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4:]
mark = lambda what: print(what, flush=True)
placing, unlinks = [False], [0]
def slowed(fn, name):
    def step(*a, **k):
        if placing[0] and (name != "unlink" or unlinks[0] == 0):  # the first unlink only: the others are alike
            mark("step " + name)
            time.sleep(slow)
        unlinks[0] += placing[0] and name == "unlink"
        return fn(*a, **k)
    return step
os.replace, os.unlink, os.rmdir = slowed(os.replace, "rename"), slowed(os.unlink, "unlink"), slowed(os.rmdir, "rmdir")
replace.exchange = (lambda a, b: False) if scheme == "aside" else slowed(replace.exchange, "exchange")
real_exclusive, real_staged, real_put = files.exclusive, files.staged, files.put_in_place
def exclusive(*a, **k):
    with real_exclusive(*a, **k) as path:
        mark("claimed")
        yield path
def staged(*a, **k):
    mark("writing")
    with real_staged(*a, **k) as tmp:
        yield tmp
def put(tmp, final):
    placing[0] = True
    mark("replacing")
    real_put(tmp, final)
    placing[0] = False
    mark("finishing")
import contextlib
files.exclusive, files.staged = contextlib.contextmanager(exclusive), contextlib.contextmanager(staged)
files.put_in_place = put
import importlib
sys.exit(importlib.import_module(module).main(argv))
"""


def build(work: Path) -> tuple[Path, Path]:
    """The tiny model directory and a LoRA run trained on it (once)."""

    model, run = work / "model", work / "run"
    if not (model / "config.json").exists():
        tok = byte_tokenizer()
        random_model("tiny", vocab_size=len(tok)).save_pretrained(model)
        tok.save_pretrained(model)
    if not (run / "adapter").exists():
        rows = [{"messages": [{"role": "user", "content": f"count to {i}"},
                              {"role": "assistant", "content": " ".join(map(str, range(i)))}]} for i in range(32)]
        data = work / "train.jsonl"
        data.write_text("".join(json.dumps(r) + "\n" for r in rows))
        recipe = {"base": {"model": str(model), "quantization": "none", "compute_dtype": "float32"},
                  "lora": {"r": 8, "alpha": 16, "dropout": 0.0},
                  "data": {"train": str(data), "max_length": 64, "packing": True},
                  "train": {"max_steps": 2, "micro_batch_size": 4, "learning_rate": 1e-2, "lr_scheduler": "constant",
                            "gradient_checkpointing": False, "log_every": 100, "seed": 0},
                  "output": {"dir": str(run)}, "tracking": {"wandb": {"mode": "disabled"}}}
        train(recipe_from_dict(recipe), echo=lambda *a, **k: None)
    return model, run


def commands(model: Path, run: Path, out: Path) -> dict[str, tuple[str, list[list[str]]]]:
    """command -> (CLI module, argv of its two settings)."""
    merge = ["merge", str(run), "--out", str(out / "merged"), "--no-report", "-q", "--overwrite", "--format"]
    quant = ["--threads", "1", "--log-level", "WARNING", "gptq", str(model), "--out", str(out / "quantized"),
             "--method", "rtn", "--group-size", "32", "--no-progress", "--overwrite", "--bits"]
    return {"merge": ("finetune.cli", [merge + ["bf16"], merge + ["fp16"]]),
            "quant": ("quant.cli", [quant + ["4"], quant + ["8"]])}


def fingerprint(path: Path) -> dict | None:
    """sha256 of every file (the timing logs: only that they are whole JSON); None when there is no directory."""
    if not path.is_dir():
        return None
    found = {}
    for f in sorted(path.iterdir()):
        if f.name in TIMING_LOGS:
            json.loads(f.read_text())
            found[f.name] = "json"
        else:
            found[f.name] = hashlib.sha256(f.read_bytes()).hexdigest()
    return found


class Child:
    """The CLI under the driver, its phase markers collected from stdout as they come."""

    def __init__(self, module: str, argv: list[str], slow: float, scheme: str):
        env = dict(os.environ, PYTHONPATH=str(ROOT), TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1")
        self.proc = subprocess.Popen([sys.executable, "-c", DRIVER, str(slow), scheme, module, *argv], cwd=ROOT,
                                     env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.marks: list[tuple[float, str]] = []
        self.stderr: list[str] = []
        self.writing = threading.Event()
        threading.Thread(target=self._read, daemon=True).start()
        threading.Thread(target=lambda: self.stderr.extend(self.proc.stderr), daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.marks.append((time.perf_counter(), line.strip()))
            if line.strip() == "writing":
                self.writing.set()

    def phase(self) -> str:
        phases = [m for _, m in self.marks if m in ("claimed", "writing", "replacing", "finishing")
                  or m.startswith("step ")]
        return phases[-1] if phases else "starting"


def reference(module: str, argv: list[str], slow: float, scheme: str) -> tuple[dict, float]:
    """Fingerprint of an uninterrupted run, and its time from the start of writing until the model was in place."""
    child = Child(module, argv, slow, scheme)
    child.proc.wait()
    if child.proc.returncode != 0:
        raise SystemExit(f"reference run failed: {' '.join(argv)}\n{''.join(child.stderr)}")
    at = {m: t for t, m in child.marks}
    out = Path(argv[argv.index("--out") + 1])
    return fingerprint(out), at["finishing"] - at["writing"]


def recover_like_the_next_run(out: Path) -> list[Path]:
    with exclusive(out):
        recover(out)
    return [p for p, _, _ in temporaries(out)]


def trials(name: str, module: str, settings: list[list[str]], kills: int, slow: float, rng: random.Random) -> dict:
    out = Path(settings[0][settings[0].index("--out") + 1])
    schemes = ("exchange", "aside")
    reference(module, settings[1], slow, "exchange")  # so that every measured run below replaces a model
    # Each setting under each scheme (the fallback has more steps); leaves --out holding setting 1's model.
    refs = {(i, scheme): reference(module, argv, slow, scheme) for scheme in schemes for i, argv in enumerate(settings)}
    prints = [refs[i, "exchange"][0] for i in range(2)]
    assert all(refs[i, "aside"][0] == prints[i] for i in range(2)), "both schemes write the same model"
    current, stats = 1, collections.Counter()
    phases = collections.Counter()
    for i in range(kills):
        scheme = schemes[i % 2]
        new = 1 - current
        child = Child(module, settings[new], slow, scheme)
        if not child.writing.wait(timeout=600):
            raise SystemExit(f"{name}: no marker from the child\n{''.join(child.stderr)}")
        time.sleep(rng.uniform(0, refs[new, scheme][1] * 1.1))
        phase = child.phase()
        child.proc.send_signal(signal.SIGKILL)
        child.proc.wait()
        at_kill = fingerprint(out)
        left = recover_like_the_next_run(out)
        after = fingerprint(out)
        killed = child.proc.returncode == -signal.SIGKILL
        stats["kills" if killed else "finished before the kill"] += 1
        phases[f"{scheme}: {phase if killed else 'exited'}"] += 1
        stats["missing at the kill"] += at_kill is None
        stats["data loss"] += after not in prints
        stats["leftover temporaries"] += len(left)
        stats["ended as the new model"] += after == prints[new]
        current = prints.index(after) if after in prints else current
        print(f"{name} #{i + 1:02d} {scheme:8s} killed in {phase if killed else 'exited':16s} -> "
              f"{'new' if after == prints[new] else 'old' if after == prints[1 - new] else 'LOST'}"
              f"{' (missing at the kill)' if at_kill is None else ''}{f', {len(left)} left over' if left else ''}",
              flush=True)
    return {"command": name, **stats, "phases": dict(sorted(phases.items())),
            "seconds_writing": {f"{settings[i][-1]} {scheme}": round(ref[1], 1) for (i, scheme), ref in refs.items()}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kills", type=int, default=20, help="kills per command (half of them with the fallback)")
    ap.add_argument("--slow", type=float, default=0.3, help="seconds before each step of the replacement")
    ap.add_argument("--work", type=Path, help="where the tiny model and run are built (default: a temp dir)")
    ap.add_argument("--commands", default="merge,quant")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path, help="also write the summary here")
    a = ap.parse_args()
    work = a.work or Path(tempfile.mkdtemp(prefix="kill-outputs-"))
    work.mkdir(parents=True, exist_ok=True)
    model, run = build(work)
    rng = random.Random(a.seed)
    summary = []
    for name, (module, settings) in commands(model, run, work / "out").items():
        if name in a.commands.split(","):
            summary.append(trials(name, module, settings, a.kills, a.slow, rng))
    print(json.dumps(summary, indent=1))
    if a.json:
        a.json.write_text(json.dumps(summary, indent=1) + "\n")


if __name__ == "__main__":
    main()
