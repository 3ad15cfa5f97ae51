"""Make bitsandbytes' 4-bit layers believe the CPU has AVX512-BF16, in this process and in launched ones.

On such a CPU bitsandbytes >= 0.49 converts a Linear4bit's weight in place to a bf16 CPU layout on its first
eval-mode forward without grad (quant/formats/bnb.py says why that breaks training). Most machines lack the
instruction set, so a suite that trusted the machine would never take that path. The test session forces it:
conftest calls `force()`, and this directory is put first on PYTHONPATH, so Python imports this file as
`sitecustomize` in every subprocess the tests start (accelerate launches, CLI runs) and forces it there too.
Where the CPU really lacks the kernel, a converted layer computes garbage, so any forward through that path
fails its test loudly.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import sys

_MODULE = "bitsandbytes.nn.modules"


def _patch(module) -> None:
    # Linear4bit.__init__ reads the capability through this module-level name into support_avx512bf16_for_cpu.
    if not hasattr(module, "has_avx512bf16"):
        raise RuntimeError(f"{_MODULE} has no has_avx512bf16 any more: update tests/avx512bf16/sitecustomize.py")
    module.has_avx512bf16 = lambda: True


class _PatchOnImport(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name != _MODULE:
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        run = spec.loader.exec_module

        def exec_module(module):
            run(module)
            _patch(module)

        spec.loader.exec_module = exec_module
        return spec


def force() -> None:
    if _MODULE in sys.modules:
        _patch(sys.modules[_MODULE])
    elif not any(isinstance(f, _PatchOnImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _PatchOnImport())


force()
