"""4-bit layers stay in bitsandbytes' reference layout: an eval pass never changes what training computes.

The whole suite runs with bitsandbytes believing the CPU has AVX512-BF16 (conftest), the condition under which
bitsandbytes >= 0.49 converts a Linear4bit's weight in place to a bf16 CPU layout on an eval-mode forward and
never converts it back (quant/formats/bnb.py). These tests pin the consequences a user relies on.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from support import tiny_recipe
from finetune.model import attach_lora, load_base
from finetune.recipe import BaseConfig, LoraConfig, recipe_from_dict
from finetune.train.loop import train
from quant.formats.bnb_lib import is_cpu_packed, keep_reference_layout

CPU = torch.device("cpu")


def _four_bit_layers(model):
    import bitsandbytes as bnb

    return [(n, m) for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)]


def test_the_session_forces_the_cpu_capability_that_triggers_the_conversion():
    """Without this, a machine lacking AVX512-BF16 would hide every test below."""
    import bitsandbytes as bnb

    layer = bnb.nn.Linear4bit(64, 64, bias=False, compute_dtype=torch.float32, quant_type="nf4")
    layer.weight = bnb.nn.Params4bit(torch.randn(64, 64), requires_grad=False, quant_type="nf4")
    layer = layer.to("cpu").eval()
    assert layer.support_avx512bf16_for_cpu
    with torch.no_grad():
        layer(torch.randn(2, 64))
    assert is_cpu_packed(layer), "bitsandbytes no longer converts on eval: revisit quant/formats/bnb_lib.py"
    with pytest.raises(RuntimeError, match="already converted"):
        keep_reference_layout(torch.nn.Sequential(layer))


@pytest.mark.parametrize("quantization", ["nf4", "fp4"])
def test_eval_mode_forward_keeps_fp32_compute_and_the_layout(tiny_model_dir, quantization):
    import bitsandbytes.functional as bnbf

    base = load_base(BaseConfig(model=str(tiny_model_dir), quantization=quantization, compute_dtype="float32"), CPU)
    model = base.model.eval()
    with torch.no_grad():
        model(torch.randint(0, 250, (2, 12)))
        for name, layer in _four_bit_layers(model):
            assert not is_cpu_packed(layer), name
            x = torch.randn(3, layer.in_features)
            W = bnbf.dequantize_4bit(layer.weight.data, layer.weight.quant_state)
            assert W.dtype == torch.float32
            ref = x @ W.T
            # fp32 all the way: a bf16 kernel is off by ~0.5 %, the reference layout by float rounding only.
            assert (layer(x) - ref).abs().max() <= 1e-5 * ref.abs().max(), name


def _grads_after(tiny_model_dir, eval_first: bool) -> tuple[dict, torch.Tensor]:
    torch.manual_seed(0)
    base = load_base(BaseConfig(model=str(tiny_model_dir), quantization="nf4", compute_dtype="float32"), CPU)
    model = attach_lora(base.model, LoraConfig(r=4, alpha=8, dropout=0.0), gradient_checkpointing=False)
    ids = torch.randint(0, 250, (2, 16), generator=torch.Generator().manual_seed(1))
    if eval_first:
        model.eval()
        with torch.no_grad():
            model(input_ids=ids)
    model.train()
    embeds = model.get_input_embeddings()(ids).detach().requires_grad_()
    loss = model(inputs_embeds=embeds, labels=ids).loss
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return grads, embeds.grad


def test_an_eval_pass_before_training_changes_no_gradient(tiny_model_dir):
    plain, plain_input = _grads_after(tiny_model_dir, eval_first=False)
    after_eval, after_eval_input = _grads_after(tiny_model_dir, eval_first=True)
    assert plain.keys() == after_eval.keys() and plain
    for name in plain:
        assert torch.equal(plain[name], after_eval[name]), name
    # The input gradient flows through every frozen 4-bit layer's backward.
    assert torch.equal(plain_input, after_eval_input)


def test_training_with_an_eval_before_ends_with_the_same_adapter_as_without(tmp_path, tiny_model_dir, chat_files):
    """The loop evaluates before training when there is eval data; that must not touch the base it trains on."""
    train_file, eval_file = chat_files
    runs = {}
    for name, eval_data in (("with-eval", eval_file), ("without-eval", None)):
        recipe = recipe_from_dict(tiny_recipe(tiny_model_dir, train_file, eval_data, tmp_path / name,
                                              train={"max_steps": 4}))
        result = train(recipe, echo=lambda *a: None)
        runs[name] = load_file(str(result.adapter_dir / "adapter_model.safetensors"))
    rows = [json.loads(line) for line in (tmp_path / "with-eval" / "metrics.jsonl").read_text().splitlines()]
    assert any("eval_loss" in r for r in rows), "the first run must really evaluate before training"
    a, b = runs["with-eval"], runs["without-eval"]
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
