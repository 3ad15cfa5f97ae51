"""The fidelity report: the printed table, --eval overrides, and the offline W&B run it logs to."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

from support import chat_rows, quiet_merge, write_jsonl


def _wandb_summary(run_dir: Path) -> dict:
    """Summary of an offline W&B run, through W&B's own reader of its .wandb file."""
    exe = Path(sys.executable).with_name("wandb")
    out = subprocess.run([str(exe), "leet", "inspect", "--json", str(run_dir)], capture_output=True, text=True,
                         check=True, timeout=120).stdout
    summary = {}
    for line in out.splitlines():
        if line.startswith("{") and json.loads(line)["type"] == "summary":
            summary.update(json.loads(line)["summary"]["update"])
    return summary


def test_report_table_eval_override_and_wandb(nf4_run, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_SILENT", "true")
    run = tmp_path / "run"
    shutil.copytree(nf4_run, run)
    recipe_file = run / "adapter" / "recipe.yaml"  # the resolved recipe the adapter carries
    recipe = yaml.safe_load(recipe_file.read_text())
    recipe["tracking"] = {"wandb": {"project": "merge-tests", "name": "tiny", "mode": "offline",
                                    "dir": str(tmp_path / "wb")}}
    recipe_file.write_text(yaml.safe_dump(recipe))
    held_out = write_jsonl(tmp_path / "held_out.jsonl", chat_rows(12, seed=7))

    printed = []
    result = quiet_merge(run, tmp_path / "out", "int8", eval_data=str(held_out), eval_max_batches=2,
                         echo=printed.append)
    f = result.fidelity
    assert f["eval_data"] == f"--eval {held_out}" and f["eval_examples"] == 8  # 2 batches of 4
    assert f["label_tokens"] > 0 and f["loss_adapter"] < f["loss_base"]
    table = printed[-1].splitlines()
    assert table[0].split() == ["model", "loss", "ppl", "KL(b||c)"]
    assert table[1].startswith("(a) base (nf4)") and table[3].startswith("(c) merged (int8)")
    assert table[4] == f"retention (a-c)/(a-b): {f['retention']:.4f}"

    report = json.loads((tmp_path / "out" / "merge_report.json").read_text())
    assert report["fidelity"] == f
    runs = list((tmp_path / "wb" / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    summary = _wandb_summary(runs[0])
    assert summary["merge/retention"] == f["retention"]
    assert summary["merge/kl_adapter_merged"] == f["kl_adapter_merged"]
