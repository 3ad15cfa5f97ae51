"""`finetune merge` checks what it reads before any model loads (#26): at the branch point a merge without eval
data failed only after ~50 s of loading."""

from __future__ import annotations

import shutil

import yaml
from support import error_line

from finetune.cli import main


def test_merge_checks_eval_and_calibration_data_before_any_model_loads(nf4_run, tmp_path, capsys, monkeypatch):
    def no_load(*a, **k):
        raise AssertionError("the adapter and its base were read before the merge's inputs were checked")

    monkeypatch.setattr("finetune.merge.pipeline.read_adapter", no_load)
    run = shutil.copytree(nf4_run, tmp_path / "run", ignore=shutil.ignore_patterns("merges", "report"))
    for recipe in (run / "recipe.yaml", run / "adapter" / "recipe.yaml"):
        data = yaml.safe_load(recipe.read_text())
        data["data"]["eval"] = None
        recipe.write_text(yaml.safe_dump(data))
    out = ["--out", str(tmp_path / "m"), "-q"]
    assert main(["merge", str(run), "--format", "bf16", *out]) == 2
    assert error_line(capsys.readouterr().err) == ("error: no eval data for the fidelity report: the run's recipe has "
                                                   "no data.eval; pass --eval FILE or --no-report")
    assert main(["merge", str(run), "--format", "bf16", "--eval", str(tmp_path / "gone.jsonl"), *out]) == 2
    assert error_line(capsys.readouterr().err) == f"error: --eval {tmp_path / 'gone.jsonl'}: no such file"
    assert main(["merge", str(run), "--format", "gptq", "--calib", str(tmp_path / "gone.jsonl"), "--no-report",
                 *out]) == 2
    assert error_line(capsys.readouterr().err) == f"error: --calib {tmp_path / 'gone.jsonl'}: no such file"
