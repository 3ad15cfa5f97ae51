"""quant.files.staged, the one temp-then-rename helper: a write appears whole or not at all."""

from __future__ import annotations

import pytest

from quant.files import staged, write_text


class _Boom(Exception):
    pass


def test_a_directory_appears_only_when_complete_and_replaces_the_old_one_only_then(tmp_path):
    final = tmp_path / "model"
    with staged(final) as tmp:
        assert tmp.parent == tmp_path and tmp.name.startswith(".tmp-model-") and not final.exists()
        (tmp / "a.txt").write_text("one")
    assert (final / "a.txt").read_text() == "one" and final.stat().st_mode & 0o777 == 0o755
    assert (final / "a.txt").stat().st_mode & 0o777 == 0o644

    with pytest.raises(_Boom):
        with staged(final) as tmp:
            (tmp / "a.txt").write_text("two")
            raise _Boom
    assert (final / "a.txt").read_text() == "one", "a failed write leaves the previous directory"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"], "and no temporary directory"

    with staged(final) as tmp:
        (tmp / "b.txt").write_text("three")
    assert sorted(p.name for p in final.iterdir()) == ["b.txt"]
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
        assert tmp.name == ".tmp-checkpoint-3-shared" and calls == ["barrier"]
        (tmp / "rng-0.pt").write_bytes(b"x")
    assert calls == ["barrier", "barrier"] and (final / "rng-0.pt").exists() and not tmp.exists()
