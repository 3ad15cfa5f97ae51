"""Damaged checkpoints and a full disk, for scripts/robustness/fuzz_inputs.py.

A reference run (4 steps, a checkpoint every 2) is made once. Each damage case copies it, removes the final
adapter, damages the newest checkpoint and runs `--resume`: the run must fall back to the checkpoint before
(or start over when none is left) and end with exactly the reference adapter, or refuse in one line. Code
in a planted pickle must never run. The disk-full cases make the k-th checkpoint write fail with ENOSPC.
"""

from __future__ import annotations

import contextlib
import copy
import errno
import json
import os
import pickle
import shutil
import subprocess
from pathlib import Path

from safetensors.torch import load_file

from finetune.train import checkpoint, finish, setup, tracking
from finetune.train.checkpoint import checkpoint_problem, list_checkpoints, write_manifest
from scripts.robustness.fuzz_cases import Case, run_cli, write_recipe

STATE_FILES = ["adapter/adapter_model.safetensors", "adapter/adapter_config.json", "optimizer.safetensors",
               "rng.safetensors", "scheduler.json", "trainer_state.json", "manifest.json", "recipe.yaml"]
DAMAGE = ["truncated", "empty", "bit flip", "deleted", "pickle, manifest recomputed"]
CKPT_ARGS = ["--set", "train.max_steps=4", "--set", "train.save_every=2", "--set", "train.save_total_limit=3"]


class Payload:
    """Unpickling this creates a directory: proof that a load ran code."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def damage(kind: str, file: Path, marker: Path) -> None:
    data = file.read_bytes()
    if kind == "truncated":
        file.write_bytes(data[: len(data) // 2])
    elif kind == "empty":
        file.write_bytes(b"")
    elif kind == "bit flip":
        i = len(data) // 2
        file.write_bytes(data[:i] + bytes([data[i] ^ 0x10]) + data[i + 1:])
    elif kind == "deleted":
        file.unlink()
    elif kind == "pickle, manifest recomputed":

        file.write_bytes(pickle.dumps({"state": Payload(marker)}))
        ckpt = file.parent.parent if file.parent.name == "adapter" else file.parent
        (ckpt / "manifest.json").unlink(missing_ok=True)  # an attacker can hash their own files
        write_manifest(ckpt, int(ckpt.name.split("-")[1]))


def _reference(env: dict) -> Path:
    """The finished reference run (made on first use)."""

    ref = env["root"] / "reference"
    if not (ref / "run" / "adapter").exists():
        ref.mkdir(exist_ok=True)
        code, err, cause = run_cli(["sft", write_recipe(ref, env["recipe"]), *CKPT_ARGS], ref)
        assert code == 0 and cause is None, (code, err, cause)
    return ref / "run"


def _adapter(run: Path) -> dict:
    return load_file(str(run / "adapter" / "adapter_model.safetensors"))


def same_adapter(env: dict, run: Path) -> str | None:
    a, b = _adapter(_reference(env)), _adapter(run)
    diff = max(float((a[k] - b[k]).abs().max()) for k in a)
    return None if diff == 0 else f"resumed adapter differs from the uninterrupted one by {diff:.3g}"


def resume_case(name: str, spoil, must_refuse=False) -> Case:
    def prepare(cwd: Path, env: dict) -> list[str]:
        shutil.copytree(_reference(env), cwd / "run")
        shutil.rmtree(cwd / "run" / "adapter")
        spoil(cwd / "run", env)
        return ["sft", write_recipe(cwd, env["recipe"]), "--resume", *CKPT_ARGS]
    return Case(name, prepare, must_refuse, may_change=("run",))  # --resume continues (and rotates) the run


def _legacy(run: Path, env: dict) -> None:
    ckpt = run / "checkpoint-4"
    for name in ("optimizer.safetensors", "rng.safetensors", "scheduler.json", "manifest.json"):
        (ckpt / name).unlink()
    for name in ("optimizer.pt", "scheduler.pt", "rng.pt"):
        (ckpt / name).write_bytes(pickle.dumps(Payload(env["root"] / "PICKLE-RAN")))


def _retag(run: Path, edit) -> None:
    ckpt = run / "checkpoint-4"
    state = json.loads((ckpt / "trainer_state.json").read_text())
    edit(state)
    (ckpt / "trainer_state.json").write_text(json.dumps(state))
    (ckpt / "manifest.json").unlink()
    write_manifest(ckpt, 4)


def _other_seed(run: Path, env: dict) -> None:
    (run / "checkpoint-4" / "recipe.yaml").write_text(
        (run / "checkpoint-4" / "recipe.yaml").read_text().replace("seed: 0", "seed: 7"))
    _retag(run, lambda s: None)


def checkpoint_cases(env: dict) -> list[Case]:
    marker = env["root"] / "PICKLE-RAN"
    cases = []
    for file in STATE_FILES:
        for kind in DAMAGE:
            spoil = (lambda f, k: lambda run, e: damage(k, run / "checkpoint-4" / f, marker))(file, kind)
            cases.append(resume_case(f"checkpoint-4 {file} {kind}", spoil))
    both = lambda run, e: [damage("bit flip", run / c / "optimizer.safetensors", marker)  # noqa: E731
                           for c in ("checkpoint-2", "checkpoint-4")]
    cases += [
        resume_case("both checkpoints damaged (starts over)", both),
        resume_case("torn last line of metrics.jsonl", lambda run, e: open(run / "metrics.jsonl", "a").write(
            '{"step": 5, "lo')),
        resume_case("stale temp directories", lambda run, e: [(run / n).mkdir() for n in (
            ".tmp-checkpoint-6-123-abc", ".trash-checkpoint-1-99", ".tmp-checkpoint-4-shared")]),
        resume_case("checkpoint-4 of the pickle format", _legacy, must_refuse=True),
        resume_case("checkpoint of another seed", _other_seed, must_refuse=True),
        resume_case("checkpoint of 2 processes", lambda run, e: _retag(run, lambda s: s.update(world_size=2)),
                    must_refuse=True),
        resume_case("checkpoint of other data", lambda run, e: _retag(run, lambda s: s.update(data_sha256="0" * 64)),
                    must_refuse=True),
    ]
    for case in cases:
        case.verify = (lambda out: "a planted pickle ran" if marker.exists() else same_adapter(env, out))
    return cases + disk_full_cases(env) + real_disk_cases(env)


@contextlib.contextmanager
def _fail_on_call(module, name: str, k: int):
    """Make the k-th call of module.name raise ENOSPC (a disk that fills up at that write)."""
    real, calls = getattr(module, name), {"n": 0}

    def failing(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == k:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))  # as a failed write() reports it: no file name
        return real(*args, **kwargs)

    setattr(module, name, failing)
    try:
        yield
    finally:
        setattr(module, name, real)


def disk_full_cases(env: dict) -> list[Case]:
    targets = [(checkpoint, "save_tree", k) for k in (1, 2, 3, 4)] + [
        (checkpoint, "save_json_tree", 1), (checkpoint, "write_manifest", 2), (finish, "save_final_adapter", 1),
        (tracking.os, "fsync", 1), (setup, "write_text_atomic", 1)]
    cases = []
    for module, name, k in targets:
        def prepare(cwd: Path, env: dict) -> list[str]:
            recipe = copy.deepcopy(env["recipe"])
            recipe["train"].update(max_steps=3, save_every=1)
            return ["sft", write_recipe(cwd, recipe)]
        cases.append(Case(f"disk full at call {k} of {getattr(module, '__name__', module)}.{name}", prepare, True,
                          patch=(lambda m, n, kk: lambda cwd: _fail_on_call(m, n, kk))(module, name, k)))
    return cases



# ---------------------------------------------------------------------------------------------- a real full disk

DISK_SIZES_K = [16, 48, 96, 160, 224, 288, 352, 420]  # a tiny run needs about 300 KiB (checkpoints ~86 KiB)
DISK_ARGS = ["--set", "train.max_steps=3", "--set", "train.save_every=1", "--set", "output.dir=disk/run"]


def _mount(path: Path, size_k: int, remount: bool = False) -> bool:
    opts = f"{'remount,' if remount else ''}size={size_k}k"
    return subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(path)], capture_output=True).returncode == 0


def _after_full_disk(cwd: Path, env: dict) -> str | None:
    """Nothing complete may be damaged; with space freed, --resume must end with the uninterrupted adapter."""

    run = cwd / "disk" / "run"
    for ckpt in list_checkpoints(run):
        problem = checkpoint_problem(ckpt)
        if problem:
            return f"{ckpt.name} at its final name but not valid: {problem}"
    _mount(cwd / "disk", 8192, remount=True)
    code, err, cause = run_cli(["sft", "r.yaml", "--resume", *DISK_ARGS], cwd)
    if code != 0:
        return f"--resume after freeing space failed: {cause or err[-300:]}"
    reference = env["root"] / "disk-reference"
    if not (reference / "disk" / "run" / "adapter").exists():
        reference.mkdir(exist_ok=True)
        run_cli(["sft", write_recipe(reference, env["recipe"]), *DISK_ARGS], reference)
    a, b = _adapter(reference / "disk" / "run"), _adapter(run)
    diff = max(float((a[k] - b[k]).abs().max()) for k in a)
    return None if diff == 0 else f"adapter after the full disk differs by {diff:.3g}"


@contextlib.contextmanager
def _disk(cwd: Path, size_k: int):
    (cwd / "disk").mkdir()
    if not _mount(cwd / "disk", size_k):
        raise RuntimeError("mount tmpfs failed")
    try:
        yield
    finally:
        subprocess.run(["umount", str(cwd / "disk")], capture_output=True)


def real_disk_cases(env: dict) -> list[Case]:
    """output.dir on a tmpfs of each size: the run either fits or stops with the one-line message."""
    probe = env["root"] / "mount-probe"
    probe.mkdir(exist_ok=True)
    if not _mount(probe, 64):
        print("full disk: skipped (mounting a tmpfs needs root)")
        return []

    subprocess.run(["umount", str(probe)], capture_output=True)
    cases = []
    for size in DISK_SIZES_K:
        prepare = lambda cwd, env: ["sft", write_recipe(cwd, env["recipe"]), *DISK_ARGS]  # noqa: E731
        cases.append(Case(f"output.dir on a {size} KiB disk", prepare, out_dir=lambda cwd: cwd / "disk" / "run",
                          patch=(lambda k: lambda cwd: _disk(cwd, k))(size), after=_after_full_disk))
    return cases
