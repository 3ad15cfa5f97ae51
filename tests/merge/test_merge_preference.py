"""`finetune merge` on a DPO-trained adapter works exactly as on an SFT one; its fidelity report measures the chosen
answers of held-out pairs (losses of base, adapter and merged model, KL, retention) and the reward accuracy of the
adapter and of the merged model on those pairs."""

from __future__ import annotations

from pathlib import Path

import pytest

from finetune.recipe import recipe_from_dict
from finetune.train.loop import train
from support import quiet_merge, tiny_recipe


def _dpo(out: Path, model_dir: Path, files, quantization: str) -> Path:
    recipe = tiny_recipe(model_dir, *files, out, base={"quantization": quantization},
                         train={"max_steps": 8, "gradient_checkpointing": False, "log_every": 100})
    recipe["preference"] = {"objective": "dpo"}
    train(recipe_from_dict(recipe), echo=lambda *a: None)
    return out


@pytest.fixture(scope="module")
def dpo_run(tmp_path_factory, tiny_model_dir, preference_files) -> Path:
    return _dpo(tmp_path_factory.mktemp("merge") / "dpo-run", tiny_model_dir, preference_files, "nf4")


def test_a_dpo_adapter_merges_and_its_report_adds_reward_accuracy(dpo_run, tmp_path):
    printed = []
    result = quiet_merge(dpo_run, tmp_path / "bf16", "bf16", echo=printed.append)
    f = result.fidelity
    assert f["eval_data"].endswith("chosen answers") and "eval.jsonl" in f["eval_data"] and f["eval_pairs"] == 12
    assert f["eval_examples"] == 12 and f["label_tokens"] > 100  # the chosen answers of the 12 held-out pairs
    assert f["loss_adapter"] < f["loss_base"]  # DPO made the chosen answers likelier
    assert f["reward_accuracy_adapter"] >= 0.75 and f["reward_margin_adapter"] > 0
    # bf16 rounds the merged weights only: the same preferences, the same rewards to a few thousandths of a nat.
    assert f["reward_accuracy_merged"] == f["reward_accuracy_adapter"]
    assert f["reward_margin_merged"] == pytest.approx(f["reward_margin_adapter"], abs=0.05)
    assert f["retention"] == pytest.approx(1.0, abs=0.02)
    assert any("reward accuracy on 12 held-out pairs: (b)" in line for line in printed)


def test_held_out_sft_data_scores_a_dpo_adapter_as_sft_does(dpo_run, chat_files, tmp_path):
    """--eval with chat rows: losses on their answers, no pairs to compare."""
    result = quiet_merge(dpo_run, tmp_path / "bf16", "bf16", eval_data=str(chat_files[1]))
    assert result.fidelity["eval_data"] == f"--eval {chat_files[1]}" and "reward_accuracy_adapter" not in \
        result.fidelity


def test_a_dpo_adapter_on_a_gptq_base_merges_back_to_gptq(tmp_path, gptq_base_dir, preference_files):
    run = _dpo(tmp_path / "run", gptq_base_dir, preference_files, "gptq")
    result = quiet_merge(run, tmp_path / "gptq", "gptq", calib=[str(preference_files[0])], calib_samples=8,
                         calib_seqlen=64)
    f = result.fidelity
    assert result.base_quantization == "gptq" and f["reward_accuracy_merged"] >= 0.5 and f["retention"] > 0.5
