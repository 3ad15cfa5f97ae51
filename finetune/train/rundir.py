"""The output directory of one run, settled before any model loads.

- refused if it cannot be right: a file or device, not creatable, equal to, inside or above an input (the base
  model, the data files; quant.files.check_target), or an existing folder that is not a run (docs/outputs.md);
- marked as ours (quant.files.MARKER, kind "run"), so that a later command recognises it by the marker, never by
  file names a user's folder may also hold;
- locked for the whole run (`.lock`, held by the main process with filelock; the holder's pid is in
  `.lock.owner`), so a second run on the same directory is refused at once instead of mixing checkpoints;
- cleaned of the temporary and half-deleted directories killed runs left (safe: the lock says none is live);
- for --resume, the newest checkpoint that verifies against its manifest, with a one-line warning for each
  newer one that does not (moved aside to `checkpoint-N.invalid`), and the recipe checked against it; --resume
  where no run ever started (no marker, checkpoint or adapter: usually a mistyped output.dir) is refused naming
  the directory, rather than silently training from step 0.
"""

from __future__ import annotations

import json
import os
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path

from finetune.recipe import Recipe
from finetune.train import checkpoint as ckpt
from finetune.train.diskspace import disk_space_guard
from finetune.train.resume import check_changes
from quant.errors import UserError
from quant.files import check_target, output_kind, write_marker
from quant.loading import local_path

LOCK = ".lock"
RUN_KIND = "run"
OWNER = ".lock.owner"


def check_output_dir(recipe: Recipe) -> Path:
    """Create output.dir and mark it ours, or say in one line why it cannot be the run's directory."""
    spec = recipe.output.dir
    if not spec.strip():
        raise UserError("output.dir is empty; name the run's directory, e.g. runs/my-run")
    out = Path(spec).expanduser()
    if out.exists() and not out.is_dir():
        raise UserError(f"output.dir = '{spec}' exists and is not a directory")
    inputs = [(local_path(recipe.base.model), "the base model"), (recipe.data.train, "data.train"),
              (recipe.data.eval, "data.eval")]
    check_target(out, inputs, "output.dir", shown=f"output.dir = '{spec}'")
    if out.is_dir() and not is_run_dir(out) and any(out.iterdir()):
        names = sorted(p.name for p in out.iterdir())
        raise UserError(f"output.dir = '{spec}' holds files that are not a finetune run ({', '.join(names[:3])}"
                        f"{', ...' if len(names) > 3 else ''}); choose a new or empty directory: a run never "
                        "writes into another folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".tmp-probe-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
        if output_kind(out) != RUN_KIND:
            write_marker(out, RUN_KIND)
    except OSError as e:
        raise UserError(f"output.dir = '{spec}' is not a writable directory ({e.strerror or e})") from None
    return out


def is_run_dir(path: Path) -> bool:
    """A `finetune sft` output directory: our marker, or (runs of versions before it) a checkpoint with its
    manifest or a final adapter."""
    if output_kind(path) == RUN_KIND:
        return True
    return (path / "adapter" / "adapter_config.json").is_file() or \
        any((p / ckpt.MANIFEST).is_file() for p in ckpt.list_checkpoints(path))


class RunLock:
    """An exclusive lock on the output directory for the life of the run (released at exit, even by a kill)."""

    def __init__(self, out_dir: Path):
        self.out_dir = Path(out_dir)
        self._lock = None

    def acquire(self) -> "RunLock":
        from filelock import FileLock, Timeout

        lock = FileLock(str(self.out_dir / LOCK), timeout=0)
        try:
            lock.acquire()
        except Timeout:
            raise UserError(f"output.dir = '{self.out_dir}' is in use by another run ({self._holder()}); "
                            "wait for it to finish, or choose another output.dir") from None
        except OSError as e:
            raise UserError(f"output.dir = '{self.out_dir}': cannot create its lock file "
                            f"({e.strerror or e})") from None
        self._lock = lock
        owner = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}
        tmp = self.out_dir / f".tmp-lock-owner-{os.getpid()}"
        try:
            with disk_space_guard(self.out_dir / OWNER, 4096):
                tmp.write_text(json.dumps(owner))
                os.replace(tmp, self.out_dir / OWNER)
        except BaseException:
            self.release()
            raise
        return self

    def _holder(self) -> str:
        try:
            owner = json.loads((self.out_dir / OWNER).read_text())
            return f"pid {owner['pid']} on {owner['host']}, started {owner['started']}"
        except (OSError, ValueError, KeyError, TypeError):
            return "pid unknown: it is still starting"

    def release(self) -> None:
        if self._lock is not None:
            (self.out_dir / OWNER).unlink(missing_ok=True)
            self._lock.release()
            self._lock = None


def select_checkpoint(out_dir: Path, warn) -> Path | None:
    """The newest checkpoint that verifies against its manifest; newer broken ones are moved aside."""
    for path in reversed(ckpt.list_checkpoints(out_dir)):
        if ckpt.is_legacy(path):
            raise UserError(f"{path} is in the pickle format of an earlier version, which --resume does not load "
                            "(unpickling a file can run code); finish that run with the version that started "
                            "it, or start a new run in another output.dir")
        problem = ckpt.checkpoint_problem(path)
        if problem is None:
            return path
        moved = ckpt.quarantine(path)
        warn(f"warning: --resume: {path.name} is not usable ({problem}); moved it to {moved.name} and "
             "fell back to the previous checkpoint")
    return None


@dataclass
class RunStart:
    out_dir: Path
    checkpoint: Path | None = None  # what to resume from
    forced: list[str] = field(default_factory=list)  # recipe keys changed under --resume --force
    lock: RunLock | None = None
    closers: list = field(default_factory=list)  # run at the end, also on an error (progress bars)

    def close(self) -> None:
        for fn in reversed(self.closers):
            fn()  # a progress bar ends its line before the error message is printed
        if self.lock is not None:
            self.lock.release()


def _main_part(recipe: Recipe, resume: bool, force: bool, world_size: int, say) -> RunStart:
    if resume and not is_run_dir(Path(recipe.output.dir).expanduser()):  # before check_output_dir marks it
        raise UserError(f"--resume: no run ever started in output.dir = '{recipe.output.dir}' (no checkpoint, "
                        "adapter or run marker); check the directory, drop --resume to start a new run, or use "
                        "--resume-if-present to continue a run only where there is one")
    out = check_output_dir(recipe)
    start = RunStart(out, lock=RunLock(out).acquire())
    try:
        removed = ckpt.remove_stale(out)
        if removed:
            say(f"removed {len(removed)} temporary director{'y' if len(removed) == 1 else 'ies'} left by an "
                f"interrupted run: {', '.join(removed[:4])}{' ...' if len(removed) > 4 else ''}")
        if not resume:
            if ckpt.list_checkpoints(out) or (out / "adapter").exists():
                raise UserError(f"output.dir = '{out}' already holds a run; pass --resume to continue it, "
                                "or choose another output.dir")
            return start
        start.checkpoint = select_checkpoint(out, say)
        if start.checkpoint is None:
            say(f"--resume: no complete checkpoint in {out}; starting from step 0")
        else:
            ckpt.check_world_size(start.checkpoint, world_size)  # before the recipe: the more basic mismatch
            start.forced = check_changes(start.checkpoint, recipe, force, say)
        return start
    except BaseException:
        start.close()
        raise


def prepare_run(recipe: Recipe, rt, resume: bool, force: bool, say) -> RunStart:
    """Everything above, done by the main process; the other ranks learn the outcome (and the checkpoint)."""
    start, error = None, None
    if rt.is_main:
        try:
            start = _main_part(recipe, resume, force, rt.world_size, say)
        except UserError as e:
            error = e
    if rt.from_main(int(error is not None)):
        if error is not None:
            raise error
        raise UserError("the main process refused this run (see its message)")
    chosen = start.checkpoint if start is not None else None
    step = rt.from_main(int(chosen.name.split("-")[1]) + 1 if chosen is not None else 0)
    if start is None:  # another rank: same directory, same checkpoint, same forced keys
        out = Path(recipe.output.dir).expanduser()
        chosen = out / f"checkpoint-{step - 1}" if step else None
        forced = check_changes(chosen, recipe, force, lambda *a: None) if chosen is not None else []
        start = RunStart(out, chosen, forced)
    return start
