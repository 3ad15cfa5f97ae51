"""`quant gptq --out`: an existing model is replaced only when asked and never lost, one writer per --out, a full
disk is one line."""

from __future__ import annotations

import errno
import json
import re

from kill_points import run_killed
from support import assert_refused_while_taken, error_line

from quant import tensorfiles
from quant.cli import main


def _quant(model_dir, out, capsys, *flags: str) -> tuple[int, str]:
    """`quant gptq` (RTN, fast) in this process: exit code and stderr."""
    code = 0
    try:
        main(["--log-level", "WARNING", "gptq", str(model_dir), "--out", str(out), "--method", "rtn",
              "--group-size", "32", "--no-progress", *flags])
    except SystemExit as e:
        code = e.code
    return code, capsys.readouterr().err


def _bits(out) -> int:
    return json.loads((out / "quantize_config.json").read_text())["bits"]


def test_a_non_empty_out_is_refused_without_overwrite(tmp_path, tiny_model_dir, capsys):
    out = tmp_path / "q"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    code, err = _quant(tiny_model_dir, out, capsys)
    assert code == 2 and error_line(err) == (f"error: --out {out} already exists; pass --overwrite to replace it "
                                             "(only after a successful quantization)")
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]
    assert _quant(tiny_model_dir, out, capsys, "--overwrite")[0] == 0
    assert _bits(out) == 4 and not (out / "notes.txt").exists()
    assert _quant(tiny_model_dir, out, capsys, "--bits", "8")[0] == 2 and _bits(out) == 4


def test_a_second_writer_is_refused_before_any_model_loads(tmp_path, tiny_model_dir, capsys, monkeypatch):
    out = tmp_path / "q"
    assert_refused_while_taken(out, lambda: _quant(tiny_model_dir, out, capsys), monkeypatch,
                               "quant.loading.load_float_model", "model")


def test_a_full_disk_is_one_line_and_keeps_the_previous_model(tmp_path, tiny_model_dir, capsys, monkeypatch):
    out = tmp_path / "q"
    assert _quant(tiny_model_dir, out, capsys, "--bits", "8")[0] == 0
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.name != "quant_log.json"}

    def full(self, name, t):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(tensorfiles._Shard, "add", full)
    code, err = _quant(tiny_model_dir, out, capsys, "--overwrite")
    assert code == 2 and re.fullmatch(rf"error: no space left writing {re.escape(str(out))}; \d+ MiB free, about "
                                      r"\d+ MiB needed", error_line(err))
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.name != "quant_log.json"} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == [".q.lock", "q"]


def test_killed_between_the_renames_of_overwrite_the_next_run_puts_the_old_model_back(tmp_path, tiny_model_dir,
                                                                                     capsys):
    """A real SIGKILL at the worst point: the fallback scheme (no RENAME_EXCHANGE) with the old model moved aside
    and the new one not yet renamed in, the one moment without --out. The next run for --out puts the old one back
    and removes the dead run's temporary directories. (Every kill point of both schemes: tests/quant/test_files.py.)
    """
    out = tmp_path / "q"
    assert _quant(tiny_model_dir, out, capsys, "--bits", "8")[0] == 0
    argv = ["--log-level", "WARNING", "--threads", "1", "gptq", str(tiny_model_dir), "--out", str(out), "--method",
            "rtn", "--group-size", "32", "--no-progress", "--overwrite"]
    assert run_killed("quant.cli", argv, n=1, aside=True) == -9
    left = sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".tmp-"))
    assert not out.exists() and len(left) == 2 and left[1].rpartition(".")[0].endswith("-old"), left
    assert _quant(tiny_model_dir, out, capsys)[0] == 2, "refused: the old model is back"
    assert _bits(out) == 8 and sorted(p.name for p in tmp_path.iterdir()) == [".q.lock", "q"]
    assert _quant(tiny_model_dir, out, capsys, "--overwrite")[0] == 0
    assert _bits(out) == 4 and sorted(p.name for p in tmp_path.iterdir()) == [".q.lock", "q"]
