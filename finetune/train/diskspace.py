"""A full disk is the user's to fix: one line naming what was being written, the free space and about how
much the write needs, instead of a traceback from deep inside safetensors or torch."""

from __future__ import annotations

import errno
import shutil
from contextlib import contextmanager
from pathlib import Path

import torch

from quant.errors import UserError

_CODES = (errno.ENOSPC, errno.EDQUOT)


def is_no_space(e: BaseException) -> bool:
    """ENOSPC/EDQUOT as an OSError, or as the text of a library's own error (safetensors wraps the OS error
    in a SafetensorError: "... No space left on device (os error 28)")."""
    if isinstance(e, OSError) and e.errno in _CODES:
        return True
    text = str(e)
    return "No space left on device" in text or "Disk quota exceeded" in text or "os error 28" in text


def free_bytes(where: Path) -> int:
    probe = Path(where)
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    return shutil.disk_usage(probe).free


def _mib(n: float) -> str:
    mib = n / 2**20
    return f"{mib:.0f} MiB" if mib >= 10 else f"{max(mib, 0.01):.2f} MiB"


def no_space_message(where: Path, needed_bytes: int | None = None) -> str:
    need = f", about {_mib(needed_bytes)} needed" if needed_bytes else ""
    return f"no space left writing {where}; {_mib(free_bytes(where))} free{need} (free some space, then --resume)"


@contextmanager
def disk_space_guard(where: Path, needed_bytes: int | None = None):
    """Around a write of about `needed_bytes` to `where`: a full disk becomes one UserError line. Some writers
    (torch.save) report a full disk only as a failed write; when free space is below what the write needs,
    that is what it was."""
    try:
        yield
    except UserError:
        raise
    except Exception as e:  # noqa: BLE001 - re-raised unless the disk is full
        full = is_no_space(e) or (needed_bytes is not None and isinstance(e, (OSError, RuntimeError))
                                  and free_bytes(where) < needed_bytes)
        if not full:
            raise
        raise UserError(no_space_message(where, needed_bytes)) from None


def tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))
