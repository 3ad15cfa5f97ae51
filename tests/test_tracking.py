"""Metrics reach metrics.jsonl and an offline W&B run, and can be read back from both."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from support import tiny_recipe
from finetune.recipe import recipe_from_dict
from finetune.train.loop import train


def _wandb_history(run_dir: Path) -> tuple[dict, list[dict]]:
    """(config, history rows) of an offline run, through W&B's own reader of its .wandb file."""
    exe = Path(sys.executable).with_name("wandb")
    out = subprocess.run([str(exe), "leet", "inspect", "--json", str(run_dir)], capture_output=True, text=True,
                         check=True, timeout=120).stdout
    records = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    config = next(r["run"]["config"]["update"] for r in records if r["type"] == "run")
    history = [r["history"]["item"] for r in records if r["type"] == "history"]
    return config, history


def test_offline_wandb_run_holds_the_logged_metrics(tmp_path, tiny_model_dir, chat_files, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    out = tmp_path / "run"
    recipe = recipe_from_dict(tiny_recipe(tiny_model_dir, *chat_files, out, train={"max_steps": 4},
                                          tracking={"wandb": {"project": "qlora-tests", "name": "tiny",
                                                              "mode": "offline"}}))
    train(recipe, echo=lambda *a: None)

    local = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in local if "loss" in r]
    assert [r["step"] for r in train_rows] == [1, 2, 3, 4]
    for key in ("loss", "lr", "grad_norm", "tokens_per_s", "peak_mem_mb"):
        assert all(isinstance(r[key], (int, float)) for r in train_rows), key
    assert any("eval_loss" in r for r in local)

    runs = list((out / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    config, history = _wandb_history(runs[0])
    assert config["lora"]["r"] == 8 and config["train"]["max_steps"] == 4
    logged = {row["_step"]: row for row in history if "loss" in row}
    assert sorted(logged) == [1, 2, 3, 4]
    for r in train_rows:
        assert abs(logged[r["step"]]["loss"] - r["loss"]) < 1e-6
    assert any("eval_loss" in row for row in history)
