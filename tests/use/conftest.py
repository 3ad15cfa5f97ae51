"""Fixtures for the report/chat/generate/eval tests: tiny runs really trained by `finetune sft` (one with an
offline W&B run) and a real merge of one of them under RUN/merges/, shared by the session."""

from __future__ import annotations

from pathlib import Path

import pytest

from finetune.recipe import recipe_from_dict
from finetune.train.loop import train
from support import quiet_merge, single_thread, tiny_recipe


@pytest.fixture(scope="session", autouse=True)
def one_thread():
    with single_thread():
        yield


def _train(out: Path, model_dir: Path, chat_files, **sections) -> Path:
    recipe = tiny_recipe(model_dir, *chat_files, out, **sections)
    train(recipe_from_dict(recipe), echo=lambda *a: None)
    return out


@pytest.fixture(scope="session")
def wandb_run(tmp_path_factory, tiny_model_dir, chat_files) -> Path:
    """NF4 base, 8 steps with eval every 4, an offline W&B run, and a bf16 merge in RUN/merges/bf16."""
    out = tmp_path_factory.mktemp("use") / "run-a"
    _train(out, tiny_model_dir, chat_files, train={"gradient_checkpointing": False, "eval_every": 4},
           tracking={"wandb": {"project": "qlora-tests", "name": "report-a", "mode": "offline"}})
    quiet_merge(out, out / "merges" / "bf16", "bf16", device="cpu")
    return out


@pytest.fixture(scope="session")
def plain_run(tmp_path_factory, tiny_model_dir, chat_files) -> Path:
    """Like wandb_run with another learning rate and LoRA rank, without W&B or merges."""
    out = tmp_path_factory.mktemp("use") / "run-b"
    return _train(out, tiny_model_dir, chat_files, lora={"r": 4, "alpha": 8},
                  train={"gradient_checkpointing": False, "eval_every": 4, "learning_rate": 3e-3})
