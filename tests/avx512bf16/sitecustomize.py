"""Make bitsandbytes' 4-bit layers believe the CPU has AVX512-BF16, in this process and in launched ones.

On such a CPU bitsandbytes >= 0.49 converts a Linear4bit's weight in place to a bf16 CPU layout on its first
eval-mode forward without grad (quant/formats/bnb.py says why that breaks training). Most machines lack the
instruction set, so a suite that trusted the machine would never take that path. The test session forces it:
conftest calls `force()`, and this directory is put first on PYTHONPATH, so Python imports this file as
`sitecustomize` in every subprocess the tests start (accelerate launches, CLI runs) and forces it there too.
Where the CPU really lacks the kernel, a converted layer computes garbage, so any forward through that path
fails its test loudly.

With QLORA_TEST_BNB_IMPORT_AS_AVX512BF16=1 bitsandbytes' import also takes its AVX512-BF16 branch (it then
registers that CPU kernel and tries to fetch a hub kernel, warning when it cannot): for the console test only,
since a converted layer would then call the real AVX512 kernel, which a CPU without it cannot execute.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import os
import sys

# Linear4bit.__init__ reads the capability through bitsandbytes.nn.modules' own name into
# support_avx512bf16_for_cpu; the CPU backend reads bitsandbytes.functional's at import.
_MODULES = {"bitsandbytes.nn.modules"}
if os.environ.get("QLORA_TEST_BNB_IMPORT_AS_AVX512BF16") == "1":
    _MODULES.add("bitsandbytes.functional")


def _patch(module) -> None:
    if not hasattr(module, "has_avx512bf16"):
        raise RuntimeError(f"{module.__name__} has no has_avx512bf16 any more: update {__file__}")
    module.has_avx512bf16 = lambda: True


class _PatchOnImport(importlib.abc.MetaPathFinder):
    def __init__(self, names: set[str]):
        self.names = set(names)

    def find_spec(self, name, path=None, target=None):
        if name not in self.names:
            return None
        self.names.discard(name)
        if not self.names:
            sys.meta_path.remove(self)
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        run = spec.loader.exec_module

        def exec_module(module):
            run(module)
            _patch(module)

        spec.loader.exec_module = exec_module
        return spec


def force() -> None:
    pending = set()
    for name in _MODULES:
        if name in sys.modules:
            _patch(sys.modules[name])
        else:
            pending.add(name)
    if pending and not any(isinstance(f, _PatchOnImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _PatchOnImport(pending))


force()
