"""LoRA training on GPTQ bases: QuantLinear + LoRA autograd, loss falls, resume is exact, adapter reloads."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from support import gptq_base, tiny_recipe
from finetune.model import load_adapter, load_base
from finetune.recipe import recipe_from_dict
from finetune.train.loop import train
from quant.errors import UserError
from quant.gptq.model import load_gptq_model
from quant.gptq.nn import QuantLinear


@pytest.fixture(scope="module")
def gptq_dir(tmp_path_factory, tokenizer) -> Path:
    return gptq_base(tmp_path_factory.mktemp("tiny-gptq"), tokenizer)


def test_quantlinear_with_lora_matches_float_reference(gptq_dir):
    """Forward and input-gradient of QuantLinear + LoRA equal dequantized weight + F.linear + LoRA."""
    from peft import LoraConfig, get_peft_model

    from quant.peft_support import register_quantlinear

    model = load_gptq_model(gptq_dir)
    layer = model.model.layers[0].mlp.down_proj
    assert isinstance(layer, QuantLinear)
    peft_model = get_peft_model(model, register_quantlinear(LoraConfig(r=4, lora_alpha=8,
                                                                       target_modules=["down_proj"])))
    lora = peft_model.base_model.model.model.layers[0].mlp.down_proj
    assert lora.base_layer is layer
    torch.nn.init.normal_(lora.lora_B["default"].weight, std=0.1)

    x = torch.randn(3, 7, layer.in_features, requires_grad=True)
    y = lora(x)
    y.square().sum().backward()

    W = layer.dequantize(torch.float32)
    A, B = lora.lora_A["default"].weight, lora.lora_B["default"].weight
    x_ref = x.detach().clone().requires_grad_(True)
    y_ref = torch.nn.functional.linear(x_ref, W, layer.bias.float() if layer.bias is not None else None)
    y_ref = y_ref + (x_ref @ A.T @ B.T) * lora.scaling["default"]
    y_ref.square().sum().backward()
    torch.testing.assert_close(y, y_ref, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(x.grad, x_ref.grad, atol=1e-4, rtol=1e-4)


def test_gptq_base_trains_and_is_detected_automatically(tmp_path, gptq_dir, chat_files):
    recipe = recipe_from_dict(tiny_recipe(gptq_dir, *chat_files, tmp_path / "run", base={"quantization": "auto"},
                                          train={"max_steps": 12}))
    result = train(recipe, echo=lambda *a: None)
    base = json.loads((tmp_path / "run" / "adapter" / "base.json").read_text())
    assert (base["format"], base["asked_format"], base["settings"]["bits"]) == ("gptq", "auto", 4)
    losses = [json.loads(line)["loss"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
              if "loss" in json.loads(line)]
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.25, losses
    assert result.eval_loss_after < result.eval_loss_before

    config = json.loads((result.adapter_dir / "adapter_config.json").read_text())
    assert set(config["target_modules"]) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                             "down_proj"}
    assert config["base_model_name_or_path"] == str(gptq_dir)

    base = load_base(recipe.base, torch.device("cpu"))
    ids = torch.randint(0, 250, (1, 12))
    plain = base.model(ids).logits
    tuned = load_adapter(base.model, result.adapter_dir).eval()(ids).logits
    assert not torch.allclose(plain, tuned, atol=1e-4), "adapter had no effect on the GPTQ base"


def test_gptq_resume_equals_uninterrupted(tmp_path, gptq_dir, chat_files):
    sections = dict(base={"quantization": "gptq"}, train={"max_steps": 6, "save_every": 3, "micro_batch_size": 2})
    straight = recipe_from_dict(tiny_recipe(gptq_dir, *chat_files, tmp_path / "a", **sections))
    train(straight, echo=lambda *a: None)
    first_half = recipe_from_dict(tiny_recipe(gptq_dir, *chat_files, tmp_path / "b",
                                              **{**sections, "train": {**sections["train"], "max_steps": 6}}))
    # Stop after checkpoint-3 by removing everything later, as a crash right after the save would leave it.
    train(first_half, echo=lambda *a: None)
    for later in ("checkpoint-6", "adapter"):
        import shutil

        shutil.rmtree(tmp_path / "b" / later)
    train(first_half, resume=True, echo=lambda *a: None)
    a = load_file(str(tmp_path / "a" / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "b" / "adapter" / "adapter_model.safetensors"))
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=1e-5)


def test_gptq_quantization_on_a_float_base_is_a_user_error(tmp_path, tiny_model_dir, gptq_dir, chat_files):
    recipe = recipe_from_dict(tiny_recipe(tiny_model_dir, *chat_files, tmp_path / "r", base={"quantization": "gptq"}))
    with pytest.raises(UserError, match="has no GPTQ quantization_config"):
        train(recipe, echo=lambda *a: None)
    recipe = recipe_from_dict(tiny_recipe(gptq_dir, *chat_files, tmp_path / "s", base={"quantization": "nf4"}))
    with pytest.raises(UserError, match="is a GPTQ checkpoint; use 'gptq' or 'auto'"):
        train(recipe, echo=lambda *a: None)


def test_gptq_base_reports_the_float_models_parameter_count(gptq_dir, tiny_model_dir):
    from transformers import AutoModelForCausalLM

    from finetune.model import count_parameters

    gptq_total = count_parameters(load_gptq_model(gptq_dir))[1]
    float_total = sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(tiny_model_dir).parameters())
    assert gptq_total == float_total
