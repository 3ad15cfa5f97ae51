"""Every file and directory the program writes (safetensors checkpoints themselves: quant.tensorfiles).

Writing an output so that nothing is ever lost (docs/outputs.md is the rule as users read it):
- `claim_output(final, overwrite, inputs=...)`: what every command that writes holds for its whole run
  (`finetune sft`'s output.dir aside, finetune.train.rundir, which applies the same rule), in this order:
  `check_target` (never an input, inside one, or above one: refused even with --overwrite), `exclusive(final)`,
  `recover(final)`, then the refusal of an existing `final` that is not empty unless `overwrite` (or unless it is
  ours and of the kind the command `replaces`: `finetune report` regenerates its own folder).
- "Ours": every output directory `staged` writes carries the marker file `MARKER` naming its kind (merge,
  report, run, output); `output_kind` reads it. Never a file name a user might also have (config.json,
  metrics.jsonl): that is how an unrelated folder once lost its files. Single-file outputs (a .gguf, a JSONL)
  carry none and are replaced only with --overwrite; temporaries carry the marker in their name (quant.replace).
- `exclusive(path, what)`: one writer per output: an flock (filelock) on the sibling file `.<name>.lock`, which
  records the holder's pid. Another process is refused at once with one line naming that pid. The kernel drops
  the lock when its holder exits, however it dies, so a killed run never blocks the next one. The lock file stays
  after release (filelock's Unix design: unlinking it would let two processes lock two different inodes).
- `staged(final)`: the one temp-then-rename helper. Work happens under a hidden temporary name next to `final`
  (`.tmp-<name>-<pid>-<8 hex>.<check>`), put in place when the block completes and removed when it fails. An
  existing `final` is replaced only then, and atomically: at every instant `final` holds the old or the new version
  (a swap by renameat2 RENAME_EXCHANGE; quant.replace says how, why, and the fallback where the system lacks it).
  A full disk becomes one UserError line, "no space left writing PATH; N MiB free, about M needed", with nothing
  left behind.
- `recover(final)` (quant.replace): undoes what killed writers of `final` left, never touching an entry of a
  live process, nor one without our marker.
"""

from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import shutil
from pathlib import Path
from typing import Callable, Iterable, Iterator


from quant.errors import UserError
from quant.replace import TMP_PREFIX, exists, new_tmp, plain, put_in_place, recover, remove, tmp_name
from quant.tensorfiles import DEFAULT_SHARD_BYTES

__all__ = ["TMP_PREFIX", "MARKER", "staged", "write_text", "exclusive", "check_target", "check_output",
           "claim_output", "write_output", "output_kind", "write_marker", "recover", "disk_needed"]

_NO_SPACE = (errno.ENOSPC, errno.EDQUOT)
MARKER = ".qlora-finetune.json"  # in every output directory this project writes; its content names the kind
_WRITTEN_BY = "qlora-finetune"


# ------------------------------------------------------------------------------------------ staged writes


def _no_space(e: BaseException | None) -> bool:
    """A full disk or quota, also as the text of a Rust library's error (tokenizers, safetensors)."""
    while e is not None:
        if (isinstance(e, OSError) and e.errno in _NO_SPACE) or "No space left on device" in str(e):
            return True
        e = e.__cause__ or e.__context__
    return False


def _bytes_under(path: Path) -> int:
    files = [path] if not path.is_dir() else [p for p in path.rglob("*") if p.is_file()]
    return sum(p.lstat().st_size for p in files if exists(p))


def _no_space_message(final: Path, need: int | Callable[[], int | None] | None, written: int) -> str:
    free = shutil.disk_usage(next(p for p in final.absolute().parents if p.exists())).free
    expected = need() if callable(need) else need
    needed = f"about {_mib(expected)} MiB needed" if expected else f"at least {_mib(written)} MiB needed"
    return f"no space left writing {final}; {free // 2**20} MiB free, {needed}"


def _mib(n: int) -> int:
    return max(1, math.ceil(n / 2**20))


def disk_needed(total_bytes: int, max_shard_bytes: int = DEFAULT_SHARD_BYTES) -> int:
    """Peak disk use of writing `total_bytes` of tensors through ShardWriter: each shard's data is copied once
    behind its header, so the largest shard is on disk twice for a moment."""
    return total_bytes + min(total_bytes, max_shard_bytes)


@contextlib.contextmanager
def staged(final: str | os.PathLike, directory: bool = True,
           shared: tuple[bool, Callable[[], None]] | None = None,
           need: int | Callable[[], int | None] | None = None, kind: str = "output") -> Iterator[Path]:
    """Yield a temporary directory (or, with `directory=False`, a file path) next to `final`; put it in place
    when the block completes, replacing an existing `final` only then; remove it if the block fails. A full disk
    raises UserError; `need` (bytes, or a function estimating them when asked) is the size it reports needed.
    A directory carries our marker of `kind` from the start (`output_kind`).

    `shared=(is_main, barrier)`: several processes write into one directory of a fixed temporary name; the main
    process creates it, every rank writes, and the main process renames it once all ranks left the block (every
    rank must enter and leave it). A failed shared write is left for the next write of `final` to remove: other
    ranks may still be writing into it.
    """
    final = plain(final)
    if shared is not None:
        is_main, barrier = shared
        tmp = tmp_name(final, "shared")
        if is_main:
            final.parent.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir()
            write_marker(tmp, kind)
        barrier()
        yield tmp
        barrier()
        if is_main:
            put_in_place(tmp, final)
        return
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = new_tmp(final, directory)
    try:
        if directory:
            write_marker(tmp, kind)
        yield tmp
    except BaseException as e:
        full = _no_space(e)
        written = _bytes_under(tmp) if full else 0
        remove(tmp)
        if full:
            raise UserError(_no_space_message(final, need, written)) from None
        raise
    try:
        put_in_place(tmp, final)
    except BaseException:
        remove(tmp)  # the new version, or the old one once swapped out
        raise


def write_text(path: str | os.PathLike, text: str) -> None:
    """Write a whole text file through `staged`: readers see the old file or the new one, never a part."""
    with staged(path, directory=False) as tmp:
        tmp.write_text(text)


# ------------------------------------------------------------------------------------------ ours


def write_marker(directory: str | os.PathLike, kind: str) -> None:
    """Mark `directory` as an output of this project of `kind` (merge, report, run, output)."""
    (Path(directory) / MARKER).write_text(json.dumps({"written_by": _WRITTEN_BY, "kind": kind}) + "\n")


def output_kind(path: str | os.PathLike) -> str | None:
    """The kind our marker records in directory `path`; None for anything that is not ours (a file, a directory
    without the marker, a marker that does not read as ours)."""
    marker = Path(path) / MARKER
    try:
        if not marker.is_file() or marker.stat().st_size > 4096:
            return None
        data = json.loads(marker.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if isinstance(data, dict) and data.get("written_by") == _WRITTEN_BY and isinstance(data.get("kind"), str):
        return data["kind"]
    return None


# ------------------------------------------------------------------------------------------ one writer


def _holder(lock_file: Path) -> str:
    try:
        return f" (pid {int(lock_file.read_text().strip())})"
    except (OSError, ValueError):
        return ""


@contextlib.contextmanager
def exclusive(path: str | os.PathLike, what: str = "--out") -> Iterator[Path]:
    """Hold the one-writer lock of `path` for the block (module docstring); yields `path`. Held elsewhere ->
    UserError at once, naming `what`, `path` and the holder's pid. One `exclusive` per path per process: a second
    one in the same process is refused like another process's."""
    from filelock import FileLock, Timeout

    path = plain(path)
    lock_file = path.with_name(f".{path.name}.lock")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        lock = FileLock(lock_file, timeout=0)
        lock.acquire()
    except Timeout:
        raise UserError(f"{what} {path} is being written by another process{_holder(lock_file)}; wait for it "
                        f"to finish or choose another {what}") from None
    except OSError as e:
        raise UserError(f"{what} {path}: cannot create the lock file {lock_file} ({e.strerror})") from None
    try:
        with contextlib.suppress(OSError):  # the pid is for the refusal message only
            lock_file.write_text(f"{os.getpid()}\n")
        yield path
    finally:
        lock.release()


_HERE = ("the current directory", "your home directory")  # never replaced; outputs inside them are fine


def _real(path: str | os.PathLike) -> Path:
    """`path` with `~`, `..` and every symlink of its existing part resolved: where a write would really go."""
    return Path(os.path.realpath(Path(path).expanduser()))


def check_target(final: str | os.PathLike, inputs: Iterable[tuple[str | os.PathLike | None, str]] = (),
                 what: str = "--out", inside_ok: Iterable[str | os.PathLike] = (), shown: str | None = None) -> Path:
    """Refuse, even with --overwrite, a target whose replacement would touch what the command reads or where the
    user stands: equal to an input, inside one, or above one (its parent: replacing it deletes the input and its
    siblings); also the current directory, the home directory and their ancestors. `inputs`: (path, role) pairs,
    role as the message names it ("the base model"); those not on this machine (hub ids) are skipped. Symlinks
    are resolved on both sides. `inside_ok`: places inside an input meant for outputs (a run's merges/ and
    report/ folders), where the target may be. `shown`: how the message names the target (default
    "`what` `final`"). Returns `final` as a Path."""
    shown = shown or f"{what} {final}"
    target = _real(final)
    if target == Path(target.anchor):
        raise UserError(f"{shown} is the root of the filesystem; choose another {what}")
    allowed = [_real(p) for p in inside_ok]
    here = [(Path.cwd(), _HERE[0])]
    with contextlib.suppress(RuntimeError):  # no home directory to protect
        here.append((Path.home(), _HERE[1]))
    found = [(_real(Path(spec).expanduser()), role, spec) for spec, role in [*inputs, *here]
             if spec is not None and str(spec).strip() and exists(Path(spec).expanduser())]
    for src, role, spec in found:  # the most direct statement first: equal, then above, then inside
        if target == src:
            raise UserError(f"{shown} is {_named(role, spec, final)}; writing there would replace it; choose "
                            f"another {what}")
    for src, role, spec in sorted(found, key=lambda f: len(f[0].parts)):  # the outermost input it holds
        if target in src.parents:
            raise UserError(f"{shown} contains {_named(role, spec, final)}; replacing it would delete that too; "
                            f"choose another {what}, outside it")
    for src, role, spec in sorted(found, key=lambda f: -len(f[0].parts)):  # the innermost input it is in
        if role not in _HERE and src in target.parents and not any(target == a or a in target.parents for a in allowed):
            raise UserError(f"{shown} is inside {_named(role, spec, final)}; outputs never go into what a "
                            f"command reads; choose another {what}, outside it")
    return Path(final)


def _named(role: str, spec, final) -> str:
    return role if str(spec) == str(final) else f"{role} ({spec})"


def check_output(final: str | os.PathLike, overwrite: bool, what: str = "--out", action: str = "write",
                 inputs: Iterable[tuple[str | os.PathLike | None, str]] = (), inside_ok: Iterable = (),
                 replaces: str | None = None, file: bool = False) -> Path:
    """The refusals of `claim_output` without taking the lock: for a command to check its output before it
    loads anything, then claim it when it writes. Returns `final` as a Path."""
    check_target(final, inputs, what, inside_ok)
    path = plain(final)
    if file and path.is_dir():
        raise UserError(f"{what} {path} is a directory; {what} names the file to write")
    taken = exists(path) and (not path.is_dir() or any(path.iterdir()))
    if taken and not overwrite and not (replaces and output_kind(path) == replaces):
        raise UserError(f"{what} {path} already exists; pass --overwrite to replace it (only after a "
                        f"successful {action})")
    return path


@contextlib.contextmanager
def claim_output(final: str | os.PathLike, overwrite: bool, what: str = "--out", action: str = "write",
                 inputs: Iterable[tuple[str | os.PathLike | None, str]] = (), inside_ok: Iterable = (),
                 replaces: str | None = None, file: bool = False) -> Iterator[Path]:
    """Hold `final` for a command that writes it (module docstring): `check_target`, lock, recover, and refuse an
    existing file or non-empty directory unless `overwrite` (which `staged` honours by replacing it only once
    complete) or unless it is our output of kind `replaces`. `file`: the output is one file, so an existing
    directory there is refused even with `overwrite`."""
    check_target(final, inputs, what, inside_ok)
    with exclusive(final, what) as path:
        recover(path)
        check_output(path, overwrite, what, action, replaces=replaces, file=file)
        yield path


def write_output(final: str | os.PathLike, text: str, overwrite: bool, what: str = "--out",
                 inputs: Iterable[tuple[str | os.PathLike | None, str]] = ()) -> None:
    """A whole text file written as a command's output: claimed (`claim_output`), then `write_text`."""
    with claim_output(final, overwrite, what, inputs=inputs, file=True) as path:
        write_text(path, text)
