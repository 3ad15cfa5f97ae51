"""The lock file (scripts/constraints.txt): the exact versions the test suite passed with.

    python scripts/lock.py check LOCK   # fail unless this environment holds exactly the locked versions
    python scripts/lock.py check --installed LOCK   # every installed package at its locked version, none
                                                    # unlocked; locked ones may be absent (extras not installed)
    python scripts/lock.py diff LOCK    # list packages whose version here differs from the lock (newest vs tested)
    python scripts/lock.py write LOCK   # write this environment's versions as the new lock

The lock is a pip constraints file: `pip install --constraint LOCK ...` installs those versions and nothing
else, while pyproject.toml keeps the wide ranges users install from. Local version labels (`+cpu`) are left
out, so `torch==2.13.0` matches the CPU wheel; this project itself is never locked.
"""

from __future__ import annotations

import datetime
import re
import sys
from importlib import metadata
from pathlib import Path

_SELF = "qlora-finetune"
_LINE = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s#]+)")


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def installed() -> dict[str, tuple[str, str]]:
    """{normalized name: (name as published, version without local label)} for this environment."""
    found = {}
    for dist in metadata.distributions():
        name = dist.metadata["Name"]
        if name and _norm(name) != _SELF:
            found[_norm(name)] = (name, dist.version.split("+", 1)[0])
    return found


def read_lock(path: Path) -> dict[str, tuple[str, str]]:
    locked = {}
    for number, line in enumerate(path.read_text().splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        match = _LINE.match(line)
        if not match:
            raise SystemExit(f"{path}:{number}: expected NAME==VERSION, got {line!r}")
        locked[_norm(match.group(1))] = (match.group(1), match.group(2))
    return locked


def check(path: Path, installed_only: bool = False) -> int:
    have, want = installed(), read_lock(path)
    wrong = [f"{name} {have[key][1] if key in have else '(missing)'} (locked {version})"
             for key, (name, version) in sorted(want.items())
             if have.get(key, (None, None))[1] != version and not (installed_only and key not in have)]
    extra = sorted(have[key][0] for key in have.keys() - want.keys())
    if wrong or extra:
        print(f"lock: this environment differs from {path}: " + "; ".join(
            wrong + ([f"not locked: {', '.join(extra)}"] if extra else [])), file=sys.stderr)
        return 1
    if installed_only:
        print(f"lock: {len(have)} installed packages exactly as in {path} ({len(want) - len(have)} locked ones "
              "belong to extras not installed here)")
    else:
        print(f"lock: {len(want)} packages exactly as in {path}")
    return 0


def diff(path: Path) -> int:
    have, want = installed(), read_lock(path)
    rows = [(name, version, have[key][1] if key in have else "-") for key, (name, version) in sorted(want.items())
            if have.get(key, (None, None))[1] != version]
    rows += [(have[key][0], "-", have[key][1]) for key in sorted(have.keys() - want.keys())]
    if not rows:
        print(f"lock: the newest releases are the locked ones ({len(want)} packages)")
        return 0
    width = max(len(r[0]) for r in rows)
    print(f"lock: {len(rows)} packages differ from {path}:")
    print(f"  {'package':<{width}}  {'locked':<12} here")
    for name, locked, here in rows:
        print(f"  {name:<{width}}  {locked:<12} {here}")
    return 0


def write(path: Path) -> int:
    have = installed()
    header = (f"# The exact versions the test suite passed with (scripts/setup.sh installs these).\n"
              f"# Written by `scripts/check_latest.sh --write-lock` (scripts/lock.py) on {datetime.date.today()},\n"
              f"# Python {sys.version.split()[0]}. pyproject.toml keeps the wide ranges users install from.\n")
    body = "".join(f"{name}=={version}\n" for name, version in sorted(have.values(), key=lambda nv: _norm(nv[0])))
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(header + body)
    tmp.replace(path)
    print(f"lock: wrote {len(have)} packages to {path}")
    return 0


def main(argv: list[str]) -> int:
    commands = {"check": check, "diff": diff, "write": write}
    installed_only = argv[:1] == ["check"] and "--installed" in argv
    argv = [a for a in argv if a != "--installed"] if installed_only else argv
    if len(argv) != 2 or argv[0] not in commands:
        print(__doc__.strip().splitlines()[0], "\nusage: lock.py check [--installed]|diff|write LOCK",
              file=sys.stderr)
        return 2
    path = Path(argv[1])
    if argv[0] != "write" and not path.is_file():
        print(f"lock: {path} not found", file=sys.stderr)
        return 2
    return check(path, installed_only) if argv[0] == "check" else commands[argv[0]](path)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
