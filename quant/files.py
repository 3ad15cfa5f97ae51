"""Model directories appear whole or not at all: written under a temporary name, renamed into place."""

from __future__ import annotations

import os
import shutil
from pathlib import Path


def publish(tmp: Path, out: Path) -> None:
    """Rename the finished temporary directory to `out`, replacing an existing `out` only at the very end.

    Files are made world-readable (safetensors creates them 0600; a model directory is meant to be shared).
    """
    tmp.chmod(0o755)
    for f in tmp.iterdir():
        if f.is_file():
            f.chmod(0o644)
    if out.exists():
        old = out.with_name(f".{out.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out)


def write_text_atomic(path: Path, text: str) -> None:
    """Write `text` to `path` through a temporary file in the same directory, renamed when complete."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
