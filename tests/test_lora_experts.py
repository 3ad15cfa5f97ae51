"""LoRA on a mixture of experts' experts (finetune.lora_experts): peft's adapter layout, loads both ways, the router
never adapted, switched off with the other adapters; the grouped path equals the per-expert one."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from arch_models import MOE, save_tiny
from expert_checks import check_grouped_experts
from safetensors.torch import load_file
from support import run_in_triton_interpreter

from finetune.model import attach_lora, load_adapter
from finetune.recipe import LoraConfig
from quant.arch import describe
from quant.errors import UserError
from quant.formats import registry as formats

gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
IDS = torch.tensor([[5, 80, 17, 200, 3, 99, 41, 7, 150, 23, 64, 9]])


def _base(model_dir, quantization):
    spec = formats.resolve_base(str(model_dir), str(model_dir), quantization, compute_dtype=torch.float32)
    model = formats.format_of(spec).load(spec, torch.device("cpu"))
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def _train(model, steps=3):
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-2)
    model.train()
    losses = []
    for _ in range(steps):
        loss = model(input_ids=IDS, labels=IDS).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return model.eval(), losses


@pytest.mark.parametrize("family", MOE)
def test_adapter_is_peft_layout_and_peft_loads_it_on_the_16_bit_model(family, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    d = save_tiny(family, tmp_path / "m")
    model, losses = _train(attach_lora(_base(d, "nf4"), LoraConfig(r=4, alpha=8, dropout=0.0), False))
    assert losses[-1] < losses[0]
    model.save_pretrained(tmp_path / "a")
    config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert config["target_parameters"] == ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
    keys = load_file(str(tmp_path / "a" / "adapter_model.safetensors"))
    part = describe(model.config).family
    assert not any(f".{part.router.path}." in k for k in keys)  # never the router
    E, H = 4, 64
    inter = describe(model.config).expert_intermediate
    gate_up_B = keys["base_model.model.model.layers.0.mlp.experts.base_layer.lora_B.weight"]
    down_A = keys["base_model.model.model.layers.0.mlp.experts.lora_A.weight"]
    assert gate_up_B.shape == (2 * inter, 4 * E) and down_A.shape == (4 * E, inter)
    assert keys["base_model.model.model.layers.0.mlp.experts.base_layer.lora_A.weight"].shape == (4 * E, H)

    ours = load_adapter(_base(d, "none"), tmp_path / "a")
    theirs = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32), tmp_path / "a")
    with torch.no_grad():
        a, b = ours(input_ids=IDS).logits, theirs(input_ids=IDS).logits
        with ours.disable_adapter():
            off = ours(input_ids=IDS).logits
    assert torch.allclose(a, b, atol=1e-5, rtol=0), (a - b).abs().max()
    assert (a - off).abs().max() > 1e-3  # the expert adapters changed the logits: the comparison can fail


def test_reloaded_adapter_and_disable_adapter_on_the_nf4_base(tmp_path):
    d = save_tiny("gpt_oss", tmp_path / "m")
    base = _base(d, "nf4")
    with torch.no_grad():
        plain = base(input_ids=IDS).logits
    model, _ = _train(attach_lora(base, LoraConfig(r=4, alpha=8, dropout=0.0), False))
    model.save_pretrained(tmp_path / "a")
    again = load_adapter(_base(d, "nf4"), tmp_path / "a")
    assert not any(p.requires_grad for p in again.parameters())
    with torch.no_grad():
        a, b = model(input_ids=IDS).logits, again(input_ids=IDS).logits
        with again.disable_adapter():
            off = again(input_ids=IDS).logits
    assert torch.equal(a, b)
    assert torch.equal(off, plain)  # disable_adapter switches the expert adapters off too


def test_target_names(tmp_path):
    d = save_tiny("mixtral", tmp_path / "m")
    base = _base(d, "nf4")
    with pytest.raises(UserError, match="router, which is never a LoRA target"):
        attach_lora(base, LoraConfig(r=4, alpha=8, target_modules=["q_proj", "gate"]), False)
    with pytest.raises(UserError, match="gate and up share one adapter"):
        attach_lora(base, LoraConfig(r=4, alpha=8, target_modules=["q_proj", "w1"]), False)
    model = attach_lora(base, LoraConfig(r=4, alpha=8, target_modules=["q_proj", "w2"]), False)
    cfg = model.peft_config["default"]
    assert cfg.target_parameters == ["mlp.experts.down_proj"]
    adapted = {n for n, _ in model.named_modules() if n.endswith(".lora_A")}
    assert any("q_proj" in n for n in adapted) and not any("k_proj" in n for n in adapted)


@pytest.mark.parametrize("family", MOE)
def test_grouped_path_equals_the_per_expert_loop_cpu(family):
    check_grouped_experts("cpu", torch.float32, family, tokens=60)


def test_grouped_kernels_in_interpreter():
    """The Triton source runs on CPU under TRITON_INTERPRET=1 (only where triton is installed)."""
    run_in_triton_interpreter(Path(__file__).resolve().parent / "expert_checks.py", "EXPERT-CHECKS-OK")


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("family", MOE)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_grouped_kernels_gpu(family, dtype):
    check_grouped_experts("cuda", dtype, family, tokens=4096, r=16)
