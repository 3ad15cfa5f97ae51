"""Where the Triton kernels run: CUDA tensors when Triton imports, or anywhere under TRITON_INTERPRET=1.

The interpreter runs the same kernels on the CPU (slowly); the tests use it so the kernels' arithmetic is
checked on machines without a GPU. Every kernel has a plain-PyTorch twin that is used otherwise.
"""

from __future__ import annotations

import importlib.util
import os
from functools import lru_cache

import torch


@lru_cache(maxsize=1)
def triton_importable() -> bool:
    return importlib.util.find_spec("triton") is not None


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def use_triton(t: torch.Tensor) -> bool:
    """True when a Triton kernel can run on `t`'s device."""
    return triton_importable() and (t.is_cuda or interpreting())
