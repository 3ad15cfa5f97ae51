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


def test_a_dpo_run_logs_its_rewards_per_step_and_per_eval_to_wandb(tmp_path, tiny_model_dir, preference_files,
                                                                    monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    out = tmp_path / "run"
    recipe = tiny_recipe(tiny_model_dir, *preference_files, out, train={"max_steps": 2, "eval_every": 1},
                         tracking={"wandb": {"project": "qlora-tests", "name": "dpo", "mode": "offline"}})
    recipe["preference"] = {"objective": "dpo", "beta": 0.2}
    train(recipe_from_dict(recipe), echo=lambda *a: None)
    config, history = _wandb_history(next((out / "wandb").glob("offline-run-*")))
    assert config["preference"]["objective"] == "dpo" and config["preference"]["beta"] == 0.2
    local = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    for name in ("rewards/chosen", "rewards/rejected", "rewards/margin", "rewards/accuracy"):
        steps = {r["step"]: r[name] for r in local if name in r}
        evals = {r["step"]: r[f"eval_{name}"] for r in local if f"eval_{name}" in r}
        assert sorted(steps) == [1, 2] and sorted(evals) == [0, 1, 2], name
        logged = {row["_step"]: row for row in history}
        assert all(abs(logged[s][name] - v) < 1e-6 for s, v in steps.items()), name
        assert all(abs(logged[s][f"eval_{name}"] - v) < 1e-6 for s, v in evals.items()), name
