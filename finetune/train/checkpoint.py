"""Checkpoints: adapter + optimizer + scheduler + RNG + data position, as data, all or nothing; resume; rotation.

A checkpoint directory is complete exactly when it exists under its final name `checkpoint-<step>` with a
`manifest.json` (every file's size and sha256) that matches its files. Everything is written into a hidden
temporary directory first, the manifest last, and the directory is renamed in one step, so a kill at any
point leaves either the previous checkpoints or the new one at their final names, plus at most a `.tmp-` or
`.trash-` directory that the next run removes. A complete checkpoint is never modified: pruning renames it
to a `.trash-` name before deleting it, and a directory that is replaced (the final adapter) is swapped with
its successor atomically.

No file of a checkpoint is a pickle: optimizer and RNG states are safetensors (+ their structure as JSON, see
state_io), the scheduler and training position JSON, so loading a checkpoint someone hands you runs no code.
"""

from __future__ import annotations

import ctypes
import errno
import hashlib
import json
import os
import random
import re
import shutil
import sys
from contextlib import contextmanager
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
import torch
import yaml
from peft import set_peft_model_state_dict
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file

from finetune.train.state_io import (StateFormatError, load_json_tree, load_tree, save_json_tree, save_tree)
from quant.errors import UserError
from quant.replace import is_marked, marked, new_tmp, tmp_name

_NAME = re.compile(r"^checkpoint-(\d+)$")
MANIFEST = "manifest.json"
FORMAT = "finetune-checkpoint/2"
TEMP_PREFIXES = (".tmp-", ".trash-")
# What the pickle-based format of earlier versions wrote; recognised only to refuse it with a clear line.
LEGACY_FILES = ("optimizer.pt", "scheduler.pt", "rng.pt", "rng-0.pt")
REQUIRED = ("adapter/adapter_model.safetensors", "adapter/adapter_config.json", "scheduler.json",
            "trainer_state.json")


@dataclass
class TrainState:
    step: int = 0  # optimizer steps completed
    epoch: int = 0  # epoch of the next micro-batch
    batch_offset: int = 0  # micro-batches of `epoch` already consumed (global order, all ranks together)
    tokens_seen: int = 0
    world_size: int = 1
    data_sha256: str = ""  # fingerprint of the training sequences, so --resume can tell the data changed


# ---------------------------------------------------------------------------------------------- directories


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically (Linux renameat2 RENAME_EXCHANGE); False where the OS cannot."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    if fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def replace_dir(tmp: Path, final: Path) -> None:
    """Put the finished directory `tmp` at `final`. An existing `final` is swapped out atomically where the OS
    can (so some complete version is always at `final`), else renamed to a `.trash-` name first; the old
    version is deleted only after the new one is in place."""
    if not final.exists():
        os.replace(tmp, final)
        return
    if _exchange(tmp, final):
        shutil.rmtree(tmp, ignore_errors=True)  # tmp now holds the old version
        return
    trash = final.with_name(marked(f".trash-{final.name}-{os.getpid()}"))
    os.replace(final, trash)
    os.replace(tmp, final)
    shutil.rmtree(trash, ignore_errors=True)


@contextmanager
def atomic_dir(final: Path):
    """Yield a temporary directory next to `final`; it replaces `final` only if the block completes."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = new_tmp(final, directory=True)
    try:
        yield tmp
        tmp.chmod(0o755)
        replace_dir(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextmanager
def shared_atomic_dir(final: Path, is_main: bool, barrier, seal=None):
    """`atomic_dir` for a checkpoint that several processes write into: the main process makes a temporary
    directory of a fixed name (the run lock makes it this run's own), every rank writes its files there, and
    once all ranks are done the main process calls `seal(tmp)` (the manifest) and renames it. Every rank must
    enter and leave the block."""
    tmp = tmp_name(final, "shared")
    if is_main:
        final.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    barrier()
    try:
        yield tmp
        barrier()
        if is_main:
            if seal is not None:
                seal(tmp)
            tmp.chmod(0o755)
            replace_dir(tmp, final)
    except BaseException:
        if is_main:
            shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_text_atomic(path: Path, text: str) -> None:
    """Replace a small file whole: written next to it, then renamed over it."""
    tmp = tmp_name(path, str(os.getpid()))
    tmp.write_text(text)
    os.replace(tmp, path)


def list_checkpoints(out_dir: Path) -> list[Path]:
    """Checkpoint directories by name (complete or not: see `checkpoint_problem`), oldest first."""
    if not Path(out_dir).is_dir():
        return []
    found = [(int(m.group(1)), p) for p in Path(out_dir).iterdir() if (m := _NAME.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found)]


def prune_checkpoints(out_dir: Path, keep: int) -> None:
    """Delete all but the newest `keep` checkpoints; each is renamed away from its final name first, so a kill
    mid-delete leaves only a `.trash-` directory, never a half-deleted checkpoint under its own name."""
    for old in list_checkpoints(out_dir)[:-keep]:
        trash = old.with_name(marked(f".trash-{old.name}-{os.getpid()}"))
        os.replace(old, trash)
        shutil.rmtree(trash, ignore_errors=True)


def remove_stale(out_dir: Path) -> list[str]:
    """Remove temporary and half-deleted directories left by killed runs: entries named with our marker
    (quant.replace.marked), never a look-alike of the user's. Only call this holding the run lock: then no live
    process owns any of them."""
    removed = []
    if Path(out_dir).is_dir():
        for p in Path(out_dir).iterdir():
            if p.name.startswith(TEMP_PREFIXES) and is_marked(p.name):
                shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
                removed.append(p.name)
    return sorted(removed)


def quarantine(path: Path) -> Path:
    """Move an unusable checkpoint out of the way (kept for inspection), so a new one can take its name."""
    target, k = path.with_name(f"{path.name}.invalid"), 1
    while target.exists():
        k += 1
        target = path.with_name(f"{path.name}.invalid-{k}")
    os.replace(path, target)
    return target


# ---------------------------------------------------------------------------------------------- manifest


def _sha256(path: Path, sync: bool = False) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
        if sync:
            os.fsync(f.fileno())  # the bytes the manifest vouches for are on disk before the rename
    return h.hexdigest()


def _files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file() and p.name != MANIFEST)


def write_manifest(tmp: Path, step: int) -> None:
    """Written last: the checkpoint's files, sizes and hashes. A directory without a matching manifest is
    not a checkpoint."""
    entries = {str(p.relative_to(tmp)): {"bytes": p.stat().st_size, "sha256": _sha256(p, sync=True)}
               for p in _files(tmp)}
    (tmp / MANIFEST).write_text(json.dumps({"format": FORMAT, "step": step, "files": entries}, indent=1))
    fd = os.open(tmp, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def is_legacy(path: Path) -> bool:
    """A checkpoint of the older pickle-based format (no manifest, *.pt state files)."""
    return not (path / MANIFEST).exists() and any((path / name).exists() for name in LEGACY_FILES)


def checkpoint_problem(path: Path) -> str | None:
    """Why `path` is not a complete checkpoint as this version writes them, or None when it is."""
    path = Path(path)
    try:
        manifest = json.loads((path / MANIFEST).read_text(encoding="utf-8"))
    except FileNotFoundError:
        return "no manifest.json (the write never finished)"
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        return f"manifest.json is unreadable ({type(e).__name__})"
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT or not isinstance(
            manifest.get("files"), dict):
        return "manifest.json is not a finetune checkpoint manifest"
    m = _NAME.match(path.name)
    if m and manifest.get("step") != int(m.group(1)):
        return f"manifest.json is for step {manifest.get('step')!r}, not {m.group(1)}"
    for name in REQUIRED:
        if name not in manifest["files"]:
            return f"manifest.json lists no {name}"
    for name, entry in manifest["files"].items():
        if not isinstance(entry, dict) or ".." in Path(str(name)).parts:
            return f"manifest.json has a bad entry for {name!r}"
        file = path / name
        if not file.is_file():
            return f"{name} is missing"
        if file.stat().st_size != entry.get("bytes"):
            return f"{name} is {file.stat().st_size} bytes, the manifest says {entry.get('bytes')}"
        if _sha256(file) != entry.get("sha256"):
            return f"{name} does not match its sha256 in the manifest (changed after it was written)"
        problem = _parse_problem(file)
        if problem:
            return f"{name} {problem}"
    return None


def _parse_problem(file: Path) -> str | None:
    """Cheap structural check of one file (headers only), so a checkpoint whose manifest was recomputed over
    foreign files is refused here, where --resume can still fall back."""
    try:
        if file.suffix == ".json":
            json.loads(file.read_text(encoding="utf-8"))
        elif file.suffix == ".yaml":
            yaml.safe_load(file.read_text(encoding="utf-8"))
        elif file.suffix == ".safetensors":
            with safe_open(str(file), framework="pt") as f:
                meta = f.metadata() or {}
            if file.parent.name != "adapter" and "format" not in meta:
                return "was not written by finetune (no state metadata)"
    except (SafetensorError, OSError, UnicodeDecodeError, ValueError, RecursionError, yaml.YAMLError) as e:
        return f"is not valid ({type(e).__name__})"
    return None


# ---------------------------------------------------------------------------------------------- state files


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def rng_file(rank: int, world_size: int) -> str:
    # Each rank draws its own dropout masks, so each rank's generators are saved for an exact resume.
    return "rng.safetensors" if world_size == 1 else f"rng-{rank}.safetensors"


def write_rng(tmp: Path, rank: int, world_size: int) -> None:
    save_tree(rng_state(), tmp / rng_file(rank, world_size))


def write_state_files(tmp: Path, model, optimizer_state: dict | None, scheduler, state: TrainState,
                      adapter_state: dict | None = None, recipe_text: str | None = None) -> None:
    """The main process's part of a checkpoint. `adapter_state`: full LoRA tensors gathered from sharded
    parameters (ZeRO-3/FSDP), where the model's own tensors are only this rank's shards; `optimizer_state`
    None: the optimizer state is sharded and each rank writes its own part. `recipe_text`: the resolved
    recipe, which --resume compares against."""
    model.save_pretrained(tmp / "adapter", state_dict=adapter_state)
    if optimizer_state is not None:
        save_tree(optimizer_state, tmp / "optimizer.safetensors")
    save_json_tree(scheduler.state_dict(), tmp / "scheduler.json")
    (tmp / "trainer_state.json").write_text(json.dumps(asdict(state), indent=2))
    if recipe_text is not None:
        (tmp / "recipe.yaml").write_text(recipe_text)


def read_train_state(path: Path) -> TrainState:
    try:
        data = json.loads((Path(path) / "trainer_state.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{path}: trainer_state.json is unreadable ({type(e).__name__})") from None
    known = {f.name for f in fields(TrainState)}
    if not isinstance(data, dict) or not all(isinstance(data.get(k, 0), (int, str)) for k in known):
        raise UserError(f"{path}: trainer_state.json is not a training position")
    return TrainState(**{k: v for k, v in data.items() if k in known})


def check_world_size(path: Path, world_size: int) -> None:
    """Per-rank state (RNG, ZeRO partitions) resumes only into as many processes as wrote it."""
    saved = read_train_state(path).world_size
    if saved != world_size:
        raise UserError(f"{path} was written by {saved} processes; resume it with the same number "
                        f"(this run has {world_size})")


def load_optimizer_state(path: Path) -> dict:
    return _load(load_tree, Path(path) / "optimizer.safetensors")


def _load(reader, file: Path):
    try:
        return reader(file)
    except StateFormatError as e:
        raise UserError(f"{file.parent}: {e}") from None


def load_checkpoint(path: Path, model, optimizer, scheduler, rank: int = 0) -> TrainState:
    """Restore adapter weights, optimizer, scheduler and RNG from `path`; return the training position.

    `model`/`optimizer` None: their state lives in per-rank shards that the caller restores itself.
    """
    path = Path(path)
    if model is not None:
        adapter = path / "adapter"
        weights = load_file(str(adapter / "adapter_model.safetensors"))
        result = set_peft_model_state_dict(model, weights)
        unexpected = getattr(result, "unexpected_keys", None)
        if unexpected:
            raise UserError(f"{adapter}: adapter keys do not match the model: {unexpected[:3]}")
    if optimizer is not None:
        optimizer.load_state_dict(load_optimizer_state(path))
    scheduler.load_state_dict(_load(load_json_tree, path / "scheduler.json"))
    own = path / f"rng-{rank}.safetensors"
    set_rng_state(_load(load_tree, own if own.exists() else path / "rng.safetensors"))
    return read_train_state(path)
