"""Deterministic kill points for the output-safety tests: a process that SIGKILLs itself just before its n-th
file-system change while a staged output is put in place (quant.replace.put_in_place), so each point between
two renames can be hit on purpose, with no cleanup code running, exactly as a kill from outside would.

`arm` is called in a throwaway process only (a forked child, or the driver of `run_killed`): it patches `os`
process-wide.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def arm(n: int, aside: bool = False) -> None:
    """Kill this process just before its `n`-th (from 0) rename, exchange, unlink or rmdir inside put_in_place,
    with the new output complete under its temporary name; n < 0: while the output is being written (at the
    second tensor a ShardWriter adds). `aside`: behave like a filesystem without RENAME_EXCHANGE (the fallback)."""
    import quant.files as files
    import quant.replace as replace
    import quant.tensorfiles as tensorfiles

    state = {"active": False, "count": 0}

    def die():
        os.kill(os.getpid(), signal.SIGKILL)

    def step(fn):
        def wrapped(*args, **kwargs):
            if state["active"]:
                if state["count"] == n:
                    die()
                state["count"] += 1
            return fn(*args, **kwargs)
        return wrapped

    if n < 0:
        real_add, added = tensorfiles._Shard.add, []

        def add(self, name, t):
            added.append(name)
            if len(added) == 2:
                die()
            return real_add(self, name, t)

        tensorfiles._Shard.add = add
        return
    os.replace, os.unlink, os.rmdir = step(os.replace), step(os.unlink), step(os.rmdir)
    replace.exchange = (lambda a, b: False) if aside else step(replace.exchange)
    real_put = replace.put_in_place

    def put(tmp, final):
        state["active"] = True
        real_put(tmp, final)
        state["active"] = False

    files.put_in_place = put


_DRIVER = """
import sys
sys.path.insert(0, sys.argv[1])
from kill_points import arm
arm(int(sys.argv[2]), aside=sys.argv[3] == "aside")
import importlib
sys.exit(importlib.import_module(sys.argv[4]).main(sys.argv[5:]))
"""


def run_killed(module: str, argv: list[str], n: int, aside: bool = False, timeout: float = 300) -> int:
    """Run `python -c` `module.main(argv)` (e.g. quant.cli) armed with `arm(n, aside)`; returns its exit code
    (-9 when the kill point was reached)."""
    root = HERE.parent
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (str(root), os.environ.get("PYTHONPATH")) if p))
    cmd = [sys.executable, "-c", _DRIVER, str(HERE), str(n), "aside" if aside else "exchange", module, *argv]
    return subprocess.run(cmd, cwd=root, env=env, timeout=timeout, stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE).returncode
