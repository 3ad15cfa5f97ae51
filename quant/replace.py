"""Putting a finished output in place, and undoing what a killed writer left (used by quant.files.staged).

Temporary names are `.tmp-<name>-<pid>-<8 hex>.<check>` next to the final path. The pid says whose an entry is, so
that `recover` removes the entries of processes that no longer run and never one of a live process. `<check>` is
our marker: 8 hex digits of a hash of the rest of the name under this project's key, so `recover` touches only
entries this project named, never a user's file that happens to look like a temporary (`.tmp-out-12-old` is not
ours; a prefix or a pattern alone would say it is). Output directories carry a marker file instead
(quant.files.MARKER), but a temporary file cannot hold one and a moved-aside old version is the user's directory,
so temporaries, files and directories alike, carry the marker in their name. Unmarked temporaries of earlier
versions are left alone (at worst a stale hidden directory to delete by hand).

Replacing an existing directory (`--overwrite`): `renameat2(RENAME_EXCHANGE)` swaps the complete new directory
and the old one in one atomic step, so at every instant the final name holds the old or the new version, never
nothing; the old one, now under the temporary name, is removed after. A kill before the swap leaves the old
version plus a stale temporary directory, a kill after it the new version plus a stale temporary directory (the
old one, perhaps half removed); the next `recover` removes either. Chosen over move-aside-then-recover because it
has no window at all: recovery only helps readers that go through this package, and transformers or vLLM
loading the directory meanwhile do not.

Where the exchange is unavailable (not Linux, glibc < 2.28, or a filesystem that lacks it, e.g. NFS, where it
fails with EINVAL and changes nothing) the old directory is renamed to `.tmp-<name>-<pid>-old.<check>` and the new one
renamed in. A kill between those two renames leaves no final name; the next `recover` (every
`quant.files.claim_output` starts with one) renames the old version back. A file is replaced by a single
rename, atomic everywhere.

Not covered: power loss (nothing is fsynced; a killed process's writes survive in the page cache, a power cut
may lose them).
"""

from __future__ import annotations

import ctypes
import errno
import functools
import hashlib
import logging
import os
import re
import secrets
import shutil
import sys
from pathlib import Path

log = logging.getLogger(__name__)

TMP_PREFIX = ".tmp-"  # every temporary name starts with `.tmp-<final name>-` (checkpoint pruning relies on it)
_KEY = b"qlora-finetune temporary\0"


def plain(path: str | os.PathLike) -> Path:
    """`path` with a real last component ('.', '..' resolved): temporary and lock names are built from it."""
    path = Path(path)
    return path.resolve() if path.name in ("", "..") else path


def exists(path: Path) -> bool:
    return path.exists() or path.is_symlink()


def marked(name: str) -> str:
    """`name` with our marker appended (see the module docstring)."""
    return f"{name}.{hashlib.sha256(_KEY + os.fsencode(name)).hexdigest()[:8]}"


def is_marked(name: str) -> bool:
    """Whether `name` carries the marker `marked` gives: an entry this project created."""
    stem, dot, check = name.rpartition(".")
    return bool(dot) and marked(stem) == name


def tmp_name(final: Path, tag: str) -> Path:
    return final.with_name(marked(f"{TMP_PREFIX}{final.name}-{tag}"))


def new_tmp(final: Path, directory: bool) -> Path:
    """A fresh `.tmp-<name>-<pid>-<8 hex>` directory (or empty file) next to `final`."""
    while True:
        tmp = tmp_name(final, f"{os.getpid()}-{secrets.token_hex(4)}")
        try:
            if directory:
                tmp.mkdir()
            else:
                os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
            return tmp
        except FileExistsError:
            continue


def remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _readable(path: Path) -> None:
    """Model directories are meant to be shared: safetensors and mkdtemp create 0600/0700 entries."""
    if path.is_dir():
        path.chmod(0o755)
        for f in path.iterdir():
            if f.is_file():
                f.chmod(0o644)
    else:
        path.chmod(0o644)


@functools.cache
def _renameat2():
    if not sys.platform.startswith("linux"):
        return None
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):  # a C library without it (glibc < 2.28)
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


_AT_FDCWD, _RENAME_EXCHANGE = -100, 2
_CANNOT_EXCHANGE = {errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP}


def exchange(a: Path, b: Path) -> bool:
    """Swap two existing paths atomically; False, having changed nothing, where the system cannot."""
    fn = _renameat2()
    if fn is None:
        return False
    if fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in _CANNOT_EXCHANGE:
        return False
    raise OSError(err, os.strerror(err), str(a), None, str(b))


def put_in_place(tmp: Path, final: Path) -> None:
    """Rename the complete `tmp` to `final`, swapping out an existing `final` directory (module docstring)."""
    _readable(tmp)
    if not tmp.is_dir() or not exists(final):
        os.replace(tmp, final)  # a file replaces a file atomically; a new name needs one rename
        return
    if exchange(tmp, final):
        remove(tmp)  # the old version, now under the temporary name
        return
    old = tmp_name(final, f"{os.getpid()}-old")
    os.replace(final, old)
    try:
        os.replace(tmp, final)
    except BaseException:
        if not exists(final):
            os.replace(old, final)
        raise
    remove(old)


def temporaries(final: Path) -> list[tuple[Path, int, str]]:
    """The temporary entries of `final` that carry our marker: (path, owner pid, tag 'old' or random). Unmarked
    look-alikes (a user's files, or the unmarked names of versions before the marker) are never listed."""
    pattern = re.compile(re.escape(f"{TMP_PREFIX}{final.name}-") + r"(\d+)-([0-9a-f]{8}|old)\.[0-9a-f]{8}")
    try:
        entries = list(final.parent.iterdir())
    except (FileNotFoundError, NotADirectoryError):
        return []
    return [(p, int(m[1]), m[2]) for p in entries if (m := pattern.fullmatch(p.name)) and is_marked(p.name)]


def alive(pid: int) -> bool:
    """Whether process `pid` may still run (a reused pid reads as alive: its entry is kept, never wrongly
    removed)."""
    if pid == os.getpid() or os.name != "posix":  # os.kill(pid, 0) is no probe on Windows
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another account's process
        return True
    return True


def recover(final: str | os.PathLike) -> list[Path]:
    """Undo what killed writers of `final` left: put back a version moved aside when `final` is missing, remove
    the temporary entries of processes that no longer run. Returns the entries removed. Call it holding
    `quant.files.exclusive(final)`, as `quant.files.claim_output` does."""
    final = plain(final)
    stale = [(p, tag) for p, pid, tag in temporaries(final) if not alive(pid)]
    olds = sorted((p for p, tag in stale if tag == "old"), key=lambda p: p.lstat().st_mtime)
    if olds and not exists(final):
        os.replace(olds[-1], final)
        log.warning("%s: put back the previous version, which an interrupted --overwrite had moved aside", final)
    removed = [p for p, _ in stale if exists(p)]
    for p in removed:
        remove(p)
    if removed:
        log.info("%s: removed %d temporary entries left by interrupted writes", final, len(removed))
    return removed
