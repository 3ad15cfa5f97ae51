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


# ---------------------------------------------------------------------------------- long work, visible and bounded


def test_on_cpu_the_report_scores_a_stated_number_of_batches_and_names_the_rows(nf4_run, tmp_path):
    from finetune.merge.report import CPU_EVAL_MAX_BATCHES

    held_out = write_jsonl(tmp_path / "held_out.jsonl", chat_rows(4 * CPU_EVAL_MAX_BATCHES + 6, seed=8))
    printed = []
    f = quiet_merge(nf4_run, tmp_path / "out", "bf16", eval_data=str(held_out), device="cpu",
                    echo=printed.append).fidelity
    assert (f["eval_batches"], f["eval_batch_size"]) == (CPU_EVAL_MAX_BATCHES, 4)  # the run's micro-batch
    assert (f["eval_examples"], f["eval_examples_total"]) == (4 * CPU_EVAL_MAX_BATCHES, 4 * CPU_EVAL_MAX_BATCHES + 6)
    text = "\n".join(printed)
    assert f"on the first {CPU_EVAL_MAX_BATCHES} batches of the held-out data (the CPU default" in text
    assert (f"of the first {4 * CPU_EVAL_MAX_BATCHES} of {4 * CPU_EVAL_MAX_BATCHES + 6} examples from --eval "
            f"{held_out} ({CPU_EVAL_MAX_BATCHES} batches of 4, one row per sequence; --eval-max-batches N") in text
    everything = quiet_merge(nf4_run, tmp_path / "all", "bf16", eval_data=str(held_out), device="cpu",
                             eval_max_batches=100).fidelity
    assert everything["eval_examples"] == everything["eval_examples_total"] == 4 * CPU_EVAL_MAX_BATCHES + 6


def test_the_report_says_what_trainings_eval_loss_was_computed_on(nf4_run, tmp_path):
    printed = []
    f = quiet_merge(nf4_run, tmp_path / "out", "bf16", device="cpu", echo=printed.append).fidelity
    assert f["training_eval"] == "all batches of the same held-out rows, packed several rows to a sequence"
    assert "training's eval loss used all batches of the same held-out rows, packed" in printed[-1]


def test_the_model_is_in_place_before_scoring_and_a_low_retention_says_what_else_to_try(nf4_run, tmp_path,
                                                                                     monkeypatch, caplog):
    from finetune.merge import report as fidelity_report

    out = tmp_path / "out"
    seen = {}

    def scored_later(source, out_dir, fmt, device, eval_data=None, max_batches=None, progress=False):
        seen["files"] = sorted(p.name for p in out_dir.iterdir())
        seen["report"] = json.loads((out_dir / "merge_report.json").read_text())
        return {"eval_data": "x", "eval_examples": 4, "label_tokens": 10, "loss_base": 2.0, "loss_adapter": 1.0,
                "loss_merged": 1.8, "ppl_base": 7.4, "ppl_adapter": 2.7, "ppl_merged": 6.0,
                "kl_adapter_merged": 0.05, "retention": 0.2}

    monkeypatch.setattr(fidelity_report, "fidelity", scored_later)
    printed = []
    with caplog.at_level("WARNING"):
        result = quiet_merge(nf4_run, out, "bf16", device="cpu", echo=printed.append)
    assert out_dir_ok(seen["files"]) and "fidelity" not in seen["report"]  # the model first, its score after
    assert printed[0].endswith(f"; wrote {out}") and printed[1].startswith("scoring the merge's fidelity")
    assert json.loads((out / "merge_report.json").read_text())["fidelity"]["retention"] == 0.2 == \
        result.fidelity["retention"]
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and warnings[0].startswith("the bf16 merge keeps 20% of the fine-tune's improvement")
    assert "Q6_K" in warnings[0] and "--calib" in warnings[0] and "--merge-into original" in warnings[0]
    assert fidelity_report.retention_warning({"retention": 0.5, "kl_adapter_merged": 0.0}, "gguf") is None
    assert fidelity_report.retention_warning({"retention": None, "kl_adapter_merged": 0.0}, "gguf") is None


def out_dir_ok(files: list[str]) -> bool:
    return "config.json" in files and "merge_report.json" in files and any(f.endswith(".safetensors") for f in files)
