"""`finetune sft` end to end on tiny random Llamas: every base kind learns, resume is exact, outputs load."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from support import Crash, crashing_optimizer, tiny_recipe
from finetune.recipe import recipe_from_dict
from finetune.train import setup
from finetune.train.loop import train
from quant.errors import UserError


def _losses(out_dir: Path) -> list[float]:
    rows = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if "loss" in r]


@pytest.mark.parametrize("quantization", ["nf4", "fp4", "int8", "none"])
def test_each_base_kind_trains_with_decreasing_loss(tmp_path, tiny_model_dir, chat_files, quantization):
    recipe = recipe_from_dict(tiny_recipe(tiny_model_dir, *chat_files, tmp_path / "run",
                                          base={"quantization": quantization}, train={"max_steps": 12}))
    result = train(recipe, echo=lambda *a: None)
    losses = _losses(tmp_path / "run")
    assert len(losses) == 12
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.25, losses  # nats; ln(vocab) = 5.56 at the start
    assert result.eval_loss_after < result.eval_loss_before
    assert (result.adapter_dir / "adapter_config.json").exists()
    assert (result.adapter_dir / "adapter_model.safetensors").exists()


def test_adapter_loads_with_peft_and_reproduces_the_trained_model(tmp_path, tiny_model_dir, chat_files):
    from peft import PeftModel

    from finetune.model import load_base

    recipe = recipe_from_dict(tiny_recipe(tiny_model_dir, *chat_files, tmp_path / "run", train={"max_steps": 4}))
    result = train(recipe, echo=lambda *a: None)
    config = json.loads((result.adapter_dir / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(tiny_model_dir)
    assert (result.adapter_dir / "tokenizer_config.json").exists() and (result.adapter_dir / "recipe.yaml").exists()

    ids = torch.randint(0, 250, (2, 16))
    base = load_base(recipe.base, torch.device("cpu")).model
    plain = base(ids).logits
    model = PeftModel.from_pretrained(base, result.adapter_dir).eval()
    tuned = model(ids).logits
    assert not torch.allclose(plain, tuned, atol=1e-4), "adapter had no effect"
    weights = load_file(str(result.adapter_dir / "adapter_model.safetensors"))
    assert any("lora_B" in k and v.abs().sum() > 0 for k, v in weights.items())


def test_resume_after_a_crash_ends_with_the_same_adapter(tmp_path, tiny_model_dir, chat_files, monkeypatch):
    sections = dict(train={"max_steps": 8, "save_every": 3, "save_total_limit": 2, "lr_scheduler": "cosine",
                           "warmup_steps": 2, "gradient_accumulation": 2, "micro_batch_size": 2},
                    lora={"dropout": 0.1})  # dropout: the RNG state must be restored too
    straight = recipe_from_dict(tiny_recipe(tiny_model_dir, *chat_files, tmp_path / "straight", **sections))
    train(straight, echo=lambda *a: None)

    crashed = recipe_from_dict(tiny_recipe(tiny_model_dir, *chat_files, tmp_path / "crashed", **sections))
    real_build = setup.build_optimizer
    # Dies inside step 5: checkpoint-3 is the newest complete one.
    monkeypatch.setattr(setup, "build_optimizer", crashing_optimizer(real_build, at_step=5))
    with pytest.raises(Crash):
        train(crashed, echo=lambda *a: None)
    assert sorted(p.name for p in (tmp_path / "crashed").glob("checkpoint-*")) == ["checkpoint-3"]
    assert not (tmp_path / "crashed" / "adapter").exists()
    monkeypatch.setattr(setup, "build_optimizer", real_build)

    with pytest.raises(UserError, match="pass --resume"):
        train(crashed, echo=lambda *a: None)
    train(crashed, resume=True, echo=lambda *a: None)

    a = load_file(str(tmp_path / "straight" / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "crashed" / "adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=1e-5)
    steps = [json.loads(line)["step"] for line in (tmp_path / "crashed" / "metrics.jsonl").read_text().splitlines()
             if "loss" in json.loads(line)]
    assert steps == list(range(1, 9)), "each step is logged exactly once across the crash"
    assert _losses(tmp_path / "straight") == pytest.approx(_losses(tmp_path / "crashed"), rel=1e-5)
    # save_total_limit=2 keeps the newest two; no temporary directories are left behind.
    names = sorted(p.name for p in (tmp_path / "crashed").iterdir() if p.name.startswith((".tmp", "checkpoint")))
    assert names == ["checkpoint-6", "checkpoint-8"]


def test_gradient_accumulation_matches_a_larger_micro_batch(tmp_path, tiny_model_dir, chat_files):
    """Loss is normalised by the label tokens of the whole step, so 2x2 accumulates to the same update as 1x4."""
    common = dict(lora={"dropout": 0.0}, base={"quantization": "none"})
    one = recipe_from_dict(tiny_recipe(tiny_model_dir, *chat_files, tmp_path / "a",
                                       train={"max_steps": 3, "micro_batch_size": 4, "gradient_accumulation": 1},
                                       **common))
    two = recipe_from_dict(tiny_recipe(tiny_model_dir, *chat_files, tmp_path / "b",
                                       train={"max_steps": 3, "micro_batch_size": 2, "gradient_accumulation": 2},
                                       **common))
    train(one, echo=lambda *a: None)
    train(two, echo=lambda *a: None)
    assert _losses(tmp_path / "a") == pytest.approx(_losses(tmp_path / "b"), rel=1e-4)
    a = load_file(str(tmp_path / "a" / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "b" / "adapter" / "adapter_model.safetensors"))
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("optimizer", ["adamw_8bit", "paged_adamw_32bit"])
def test_bitsandbytes_optimizers_train(tmp_path, tiny_model_dir, chat_files, optimizer):
    recipe = recipe_from_dict(tiny_recipe(tiny_model_dir, *chat_files, tmp_path / "run",
                                          train={"max_steps": 10, "optimizer": optimizer}))
    result = train(recipe, echo=lambda *a: None)
    assert result.eval_loss_after < result.eval_loss_before


def test_unknown_target_module_is_a_user_error(tmp_path, tiny_model_dir, chat_files):
    recipe = recipe_from_dict(tiny_recipe(tiny_model_dir, *chat_files, tmp_path / "run",
                                          lora={"target_modules": ["q_proj", "qkv"]}))
    with pytest.raises(UserError, match=r"lora.target_modules: \['qkv'\] not found in the model; its linear layers"):
        train(recipe, echo=lambda *a: None)
