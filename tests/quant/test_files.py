"""quant.files: a write appears whole or not at all, a kill at any point loses nothing, one writer per output, a full
disk is one line."""

from __future__ import annotations

import errno
import itertools
import json
import os
import re
import shutil
import signal
import subprocess
import time

import pytest
import torch
from kill_points import arm
from safetensors import safe_open

from quant.errors import UserError
from quant.files import MARKER, claim_output, exclusive, output_kind, recover, staged, write_text
from quant.tensorfiles import ShardWriter
from quant.replace import marked


class _Boom(Exception):
    pass


def test_a_directory_appears_only_when_complete_and_replaces_the_old_one_only_then(tmp_path):
    final = tmp_path / "model"
    with staged(final, kind="merge") as tmp:
        assert tmp.parent == tmp_path and tmp.name.startswith(".tmp-model-") and not final.exists()
        (tmp / "a.txt").write_text("one")
    assert (final / "a.txt").read_text() == "one" and final.stat().st_mode & 0o777 == 0o755
    assert output_kind(final) == "merge", "every output directory carries our marker"
    assert (final / "a.txt").stat().st_mode & 0o777 == 0o644

    with pytest.raises(_Boom):
        with staged(final) as tmp:
            (tmp / "a.txt").write_text("two")
            raise _Boom
    assert (final / "a.txt").read_text() == "one", "a failed write leaves the previous directory"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"], "and no temporary directory"

    with staged(final) as tmp:
        (tmp / "b.txt").write_text("three")
    assert sorted(p.name for p in final.iterdir()) == [MARKER, "b.txt"] and output_kind(final) == "output"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_files_and_shared_directories(tmp_path):
    path = tmp_path / "sub" / "metrics.jsonl"
    write_text(path, "a\n")
    with pytest.raises(_Boom):
        with staged(path, directory=False) as tmp:
            tmp.write_text("partial")
            raise _Boom
    assert path.read_text() == "a\n" and sorted(p.name for p in path.parent.iterdir()) == ["metrics.jsonl"]

    calls = []
    final = tmp_path / "checkpoint-3"
    with staged(final, shared=(True, lambda: calls.append("barrier"))) as tmp:
        assert tmp.name == marked(".tmp-checkpoint-3-shared") and calls == ["barrier"]
        (tmp / "rng-0.pt").write_bytes(b"x")
    assert calls == ["barrier", "barrier"] and (final / "rng-0.pt").exists() and not tmp.exists()


# ------------------------------------------------------------------------------------------ kills, locks, full disks


def _fork(fn) -> int:
    """Run fn() in a forked child, which exits 0, or 1 if fn raised; returns its pid."""
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            fn()
            code = 0
        finally:
            os._exit(code)
    return pid


def _in_child(fn) -> int:
    """fn() in a forked child; its exit code, or minus the signal that killed it."""
    _, status = os.waitpid(_fork(fn), 0)
    return -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)


def _write_model(final, version: str) -> None:
    with staged(final) as tmp:
        writer = ShardWriter(tmp)
        for i in range(3):
            writer.add({f"w{i}": torch.full((64,), float(len(version) + i))})
        writer.close()
        (tmp / "config.json").write_text(json.dumps({"version": version}))


def _version(final) -> str | None:
    """'old' or 'new' for a complete model directory, None when there is none; fails on anything else."""
    if not final.exists():
        return None
    version = json.loads((final / "config.json").read_text())["version"]
    with safe_open(str(final / "model.safetensors"), "pt") as f:
        assert [f.get_tensor(f"w{i}")[0].item() for i in range(3)] == [len(version) + i for i in range(3)]
    return version


@pytest.mark.parametrize("aside", [False, True], ids=["exchange", "move-aside"])
def test_a_kill_at_any_point_of_an_overwrite_leaves_the_old_or_the_new_model(tmp_path, aside):
    final = tmp_path / "model"
    _write_model(final, "old")
    seen = []
    for n in itertools.count(-1):
        status = _in_child(lambda: (arm(n, aside), _write_model(final, "new")))
        if status == 0:
            break
        assert status == -signal.SIGKILL
        at_kill = _version(final)
        assert at_kill in (("old", "new") if not aside else ("old", "new", None)), f"kill point {n}"
        assert len(recover(final)) >= 1, "what the killed process left is removed"
        after = _version(final)
        assert after == (at_kill or "old"), "the old model is put back when the kill fell between the renames"
        assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]
        seen.append(at_kill)
        if after == "new":
            _write_model(final, "old")
    assert _version(final) == "new" and sorted(p.name for p in tmp_path.iterdir()) == ["model"]
    assert {"old", "new"} <= set(seen) and len(seen) >= 5, seen  # before and after the swap, and while removing
    assert (None in seen) == aside, "only the fallback has a moment without the model (recovered above)"


def test_recover_removes_our_temporaries_of_dead_processes_only(tmp_path):
    final = tmp_path / "out"
    final.mkdir()
    dead = subprocess.Popen(["true"])
    dead.wait()
    live = subprocess.Popen(["sleep", "60"])
    try:
        names = {"dead": marked(f".tmp-out-{dead.pid}-0123abcd"), "dead_aside": marked(f".tmp-out-{dead.pid}-old"),
                 "live": marked(f".tmp-out-{live.pid}-89abcdef"),
                 "other_output": marked(f".tmp-out-2-{dead.pid}-0123abcd"), "shared": marked(".tmp-out-shared"),
                 # look-alikes without our marker: a user's files, or an earlier version's temporaries
                 "unmarked": f".tmp-out-{dead.pid}-0123abcd", "unmarked_aside": f".tmp-out-{dead.pid}-old",
                 "forged": f".tmp-out-{dead.pid}-0123abcd.0123abcd"}
        for name in names.values():
            (tmp_path / name).mkdir()
            (tmp_path / name / "f").write_text("x")
        removed = recover(final)
        assert sorted(p.name for p in removed) == sorted(names[k] for k in ("dead", "dead_aside"))
        assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
            ["out"] + [v for k, v in names.items() if k not in ("dead", "dead_aside")])
    finally:
        live.kill()
        live.wait()


def test_one_writer_per_output_and_a_killed_holder_never_blocks(tmp_path):
    out = tmp_path / "out"
    ready_r, ready_w = os.pipe()

    def hold():
        with exclusive(out):
            os.write(ready_w, b"x")
            time.sleep(60)

    holder = _fork(hold)
    try:
        assert os.read(ready_r, 1) == b"x"
        with pytest.raises(UserError, match=rf"^--out {out} is being written by another process \(pid {holder}\); "
                                            "wait for it to finish or choose another --out$"):
            with exclusive(out):
                pass
    finally:
        os.kill(holder, signal.SIGKILL)
        os.waitpid(holder, 0)
    with exclusive(out):  # the kernel released the dead holder's lock
        pass


def test_claim_output_refuses_what_it_would_replace_without_overwrite(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    with claim_output(out, overwrite=False):  # an empty directory is fine
        pass
    (out / "model.safetensors").write_text("x")
    for path in (out, tmp_path / "file"):
        path.with_name("file").write_text("x")
        with pytest.raises(UserError, match=rf"^--out {path} already exists; pass --overwrite to replace it \(only "
                                            r"after a successful merge\)$"):
            with claim_output(path, overwrite=False, action="merge"):
                pass
        with claim_output(path, overwrite=True):
            pass
    assert (out / "model.safetensors").read_text() == "x"


def test_a_full_disk_is_one_line_and_leaves_nothing(tmp_path):
    final = tmp_path / "out"
    free = shutil.disk_usage(tmp_path).free // 2**20
    for need, error, expected in [
            (3 * 2**20 + 1, OSError(errno.ENOSPC, "No space left on device"), "about 4 MiB needed"),
            (None, OSError(errno.EDQUOT, "Disk quota exceeded"), "at least 2 MiB needed"),
            (lambda: 2**30, Exception("No space left on device (os error 28)"), "about 1024 MiB needed")]:
        with pytest.raises(UserError) as caught:
            with staged(final, need=need) as tmp:
                (tmp / "part").write_bytes(b"x" * (2**20 + 1))
                raise error
        m = re.fullmatch(rf"no space left writing {re.escape(str(final))}; (\d+) MiB free, {expected}",
                         str(caught.value))
        assert m and abs(int(m[1]) - free) < 512, str(caught.value)
        assert list(tmp_path.iterdir()) == []
