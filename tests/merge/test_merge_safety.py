"""`finetune merge --out`: one writer per --out, a full disk is one line, a killed --overwrite loses nothing."""

from __future__ import annotations

import errno
import json
import re
from types import SimpleNamespace

from kill_points import run_killed
from support import assert_refused_while_taken, error_line

from finetune.cli import main
from finetune.merge.pipeline import _OutputSize
from quant import tensorfiles
from quant.files import disk_needed
def _merge(run, out, capsys, fmt: str, *flags: str) -> tuple[int, str]:
    code = main(["merge", str(run), "--out", str(out), "--format", fmt, "--no-report", "-q", *flags])
    return code, capsys.readouterr().err


def _dtype(out) -> str:
    return json.loads((out / "config.json").read_text())["dtype"]


def test_a_second_merge_into_the_same_out_is_refused_at_once(nf4_run, tmp_path, capsys, monkeypatch):
    out = tmp_path / "out"
    assert_refused_while_taken(out, lambda: _merge(nf4_run, out, capsys, "bf16"), monkeypatch,
                               "finetune.merge.pipeline.read_adapter", "adapter")


def test_a_full_disk_is_one_line_and_keeps_the_previous_model(nf4_run, tmp_path, capsys, monkeypatch):
    out = tmp_path / "out"
    assert _merge(nf4_run, out, capsys, "bf16")[0] == 0
    before = (out / "model.safetensors").read_bytes()
    real_add = tensorfiles._Shard.add

    def full_at_layer_1(self, name, t):
        if name.startswith("model.layers.1."):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_add(self, name, t)

    monkeypatch.setattr(tensorfiles._Shard, "add", full_at_layer_1)
    code, err = _merge(nf4_run, out, capsys, "fp16", "--overwrite")
    assert code == 2 and re.fullmatch(rf"error: no space left writing {re.escape(str(out))}; \d+ MiB free, about "
                                      r"1 MiB needed", error_line(err))
    assert (out / "model.safetensors").read_bytes() == before and _dtype(out) == "bfloat16"
    assert sorted(p.name for p in tmp_path.iterdir()) == [".out.lock", "out"]


def test_the_size_needed_is_extrapolated_from_the_layers_written():
    size = _OutputSize(n_units=1 + 4, max_shard_bytes=2**40)
    size.writer = SimpleNamespace(total=0)
    for total in (100, 130):  # embeddings/head 100 bytes, then layer 0 of 30
        size.writer.total = total
        size.unit_done()
    assert size() == disk_needed(100 + 4 * 30, 2**40) == 2 * 220
    assert _OutputSize(5, 2**40)() is None, "no estimate before a layer is written"


def test_killed_between_the_renames_of_overwrite_the_next_merge_puts_the_old_model_back(nf4_run, tmp_path, capsys):
    """A real SIGKILL with the old --out moved aside and the new one not yet renamed in (the fallback scheme's one
    moment without --out); every kill point of both schemes is in tests/quant/test_files.py."""
    out = tmp_path / "out"
    assert _merge(nf4_run, out, capsys, "bf16")[0] == 0
    argv = ["merge", str(nf4_run), "--out", str(out), "--format", "fp16", "--no-report", "-q", "--overwrite"]
    assert run_killed("finetune.cli", argv, n=1, aside=True) == -9
    left = sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".tmp-"))
    assert not out.exists() and len(left) == 2 and left[1].rpartition(".")[0].endswith("-old"), left
    assert _merge(nf4_run, out, capsys, "fp16")[0] == 2, "refused: the old model is back"
    assert _dtype(out) == "bfloat16" and sorted(p.name for p in tmp_path.iterdir()) == [".out.lock", "out"]
    assert _merge(nf4_run, out, capsys, "fp16", "--overwrite")[0] == 0
    assert _dtype(out) == "float16" and sorted(p.name for p in tmp_path.iterdir()) == [".out.lock", "out"]
