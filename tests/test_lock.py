"""scripts/lock.py, which scripts/setup.sh ends with: the set-up installs a subset of the lock (no test extras), so
`check --installed` accepts locked packages that are absent but never an installed one off the lock."""

from __future__ import annotations

from scripts import lock


def _write(path, pairs) -> None:
    path.write_text("# a lock\n" + "".join(f"{name}=={version}\n" for name, version in pairs))


def test_check_installed_allows_absent_extras_but_not_unlocked_or_other_versions(tmp_path, capsys):
    have = sorted(lock.installed().values())
    exact = tmp_path / "exact.txt"
    _write(exact, have)
    assert lock.main(["check", str(exact)]) == 0 and lock.main(["check", "--installed", str(exact)]) == 0
    more = tmp_path / "more.txt"
    _write(more, have + [("not-installed-extra", "1.0")])
    assert lock.main(["check", str(more)]) == 1  # the full check wants every locked package
    assert "not-installed-extra (missing) (locked 1.0)" in capsys.readouterr().err
    assert lock.main(["check", "--installed", str(more)]) == 0
    assert f"lock: {len(have)} installed packages exactly as in {more} (1 locked ones" in capsys.readouterr().out
    fewer = tmp_path / "fewer.txt"
    _write(fewer, have[1:])
    assert lock.main(["check", "--installed", str(fewer)]) == 1
    assert f"not locked: {have[0][0]}" in capsys.readouterr().err
    other = tmp_path / "other.txt"
    _write(other, [(have[0][0], "0.0.0-other"), *have[1:]])
    assert lock.main(["check", "--installed", str(other)]) == 1
    assert f"{have[0][0]} {have[0][1]} (locked 0.0.0-other)" in capsys.readouterr().err
    assert lock.main(["check", "--frobnicate", str(exact)]) == 2
