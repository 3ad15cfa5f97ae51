"""Each output format is what it claims: bf16 reproduces the adapter model, bitsandbytes outputs load through
transformers + bitsandbytes, GPTQ outputs follow docs/quantized-formats.md A and load through our loader."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from finetune.merge.adapter import read_adapter
from quant.tensorfiles import Checkpoint
from quant.formats.base import BaseSpec
from quant.formats.bnb_lib import rebuild_4bit
from quant.packed import read_state
from support import quiet_merge

CPU = torch.device("cpu")
IDS = torch.randint(3, 250, (2, 24), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="session")
def nf4_adapter(nf4_run):
    """The NF4 run's adapter model and its expected merged weights, built once."""
    model = _adapter_model(nf4_run, "nf4")
    return model, _expected_merged(model)


def _adapter_model(run: Path, quantization: str):
    """The adapter on its quantized base, exactly as training built it (from the base record it saved)."""
    from finetune.model import load_adapter, load_base

    spec = BaseSpec.read(run / "adapter")
    assert spec.format == quantization and spec.compute_dtype == "float32"
    return load_adapter(load_base(spec, CPU).model, run / "adapter").eval()


def _expected_merged(model) -> dict[str, torch.Tensor]:
    """dequantized trained weight + peft's own scaling * B @ A, read from the live peft model."""
    import bitsandbytes.functional as bnbf

    out = {}
    for name, m in model.named_modules():
        if not hasattr(m, "lora_A") or "default" not in m.lora_A:
            continue
        base = m.base_layer
        if hasattr(base, "dequantize"):  # QuantLinear
            W = base.dequantize(torch.float32)
        else:
            W = bnbf.dequantize_4bit(base.weight.data, base.weight.quant_state).float()
        delta = m.scaling["default"] * m.lora_B["default"].weight @ m.lora_A["default"].weight
        out[name.removeprefix("base_model.model.")] = W + delta
    return out


def test_bf16_merge_reproduces_the_adapter_model(nf4_run, nf4_adapter, tmp_path):
    from transformers import AutoModelForCausalLM

    result = quiet_merge(nf4_run, tmp_path / "bf16", "bf16", max_shard_bytes=60_000)
    out = result.out_dir
    assert (out / "model.safetensors.index.json").exists(), "small shards force a sharded checkpoint"
    assert {"config.json", "tokenizer.json", "merge_report.json", "generation_config.json"} <= \
        {p.name for p in out.iterdir()}
    model, expected = nf4_adapter
    assert len(expected) == result.modules_merged == 14
    written = read_state(out)
    for name, W in expected.items():  # merged weight = bf16(dequantized trained weight + delta), exactly
        assert written[f"{name}.weight"].dtype == torch.bfloat16
        assert torch.equal(written[f"{name}.weight"], W.to(torch.bfloat16)), name

    merged = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    with torch.no_grad():
        b, c = model(IDS).logits, merged(IDS).logits
        with model.disable_adapter():
            a = model(IDS).logits
    err, effect = (b - c).abs().max().item(), (b - a).abs().max().item()
    assert err < 2e-2 * b.abs().max().item(), "logits equal up to bf16 rounding of the weights"
    assert err < effect / 20, (err, effect)

    report = json.loads((out / "merge_report.json").read_text())
    f = report["fidelity"]
    assert f["loss_adapter"] < f["loss_base"]
    assert f["retention"] == pytest.approx(1.0, abs=0.01) and f["kl_adapter_merged"] < 1e-3
    assert report["base_quantization"] == "nf4" and report["memory"]["peak_rss_mb"] > 0


@pytest.mark.parametrize("fmt", ["nf4", "int8"])
def test_bitsandbytes_outputs_load_with_transformers(nf4_run, nf4_adapter, tmp_path, fmt):
    import bitsandbytes as bnb
    import bitsandbytes.functional as bnbf
    from transformers import AutoModelForCausalLM

    out = quiet_merge(nf4_run, tmp_path / fmt, fmt, report=fmt == "nf4").out_dir
    tensors = read_state(out)
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    name = "model.layers.1.mlp.down_proj"
    if fmt == "nf4":
        assert qc["load_in_4bit"] and qc["bnb_4bit_quant_type"] == "nf4" and qc["bnb_4bit_use_double_quant"]
        assert tensors[f"{name}.weight"].dtype == torch.uint8
        for part in ("absmax", "quant_map", "nested_absmax", "nested_quant_map"):
            assert f"{name}.weight.{part}" in tensors
        state = json.loads(bytes(tensors[f"{name}.weight.quant_state.bitsandbytes__nf4"].tolist()))
        assert list(state)[:4] == ["quant_type", "blocksize", "dtype", "shape"]
        assert state["quant_type"] == "nf4" and state["blocksize"] == 64 and state["shape"] == [64, 128]
        assert json.loads((out / "merge_report.json").read_text())["fidelity"]["retention"] > 0.9
    else:
        assert qc["load_in_8bit"]
        assert tensors[f"{name}.weight"].dtype == torch.int8 and tensors[f"{name}.SCB"].dtype == torch.float32
        assert tensors[f"{name}.weight_format"].item() == 0
    assert "lm_head.weight" in tensors and tensors["lm_head.weight"].dtype == torch.bfloat16

    loaded = AutoModelForCausalLM.from_pretrained(str(out), device_map="cpu").eval()
    kind = bnb.nn.Linear4bit if fmt == "nf4" else bnb.nn.Linear8bitLt
    layer = loaded.get_submodule(name)
    assert isinstance(layer, kind) and not isinstance(loaded.lm_head, kind)
    if fmt == "nf4":
        got = bnbf.dequantize_4bit(layer.weight.data, layer.weight.quant_state).float()
    else:
        got = bnbf.int8_vectorwise_dequant(layer.weight.data, layer.weight.SCB)
    want = nf4_adapter[1][name]
    rel = ((got - want).norm() / want.norm()).item()
    assert rel < (0.15 if fmt == "nf4" else 0.01), rel
    with torch.no_grad():
        assert torch.isfinite(loaded(IDS).logits).all()


def _check_gptq_layout(out: Path, bits: int, group_size: int, desc_act: bool) -> dict:
    """docs/quantized-formats.md A1/A6/A7 on a written checkpoint."""
    config = json.loads((out / "config.json").read_text())
    qc = config["quantization_config"]
    assert qc == json.loads((out / "quantize_config.json").read_text())
    assert (qc["quant_method"], qc["bits"], qc["group_size"], qc["desc_act"], qc["sym"]) == \
        ("gptq", bits, group_size, desc_act, True)
    assert qc["checkpoint_format"] == qc["format"] == "gptq" and qc["pack_dtype"] == "int32"
    assert (out / "model.safetensors").exists()
    tensors = read_state(out)
    ckpt = Checkpoint(out)
    assert ckpt.config["dtype"] == "float16"
    K, N = 128, 64  # down_proj of the tiny model
    name = "model.layers.0.mlp.down_proj"
    assert f"{name}.weight" not in tensors
    assert tensors[f"{name}.qweight"].dtype == torch.int32
    assert tuple(tensors[f"{name}.qweight"].shape) == (K * bits // 32, N)
    G = K // group_size
    assert tuple(tensors[f"{name}.qzeros"].shape) == (G, N * bits // 32)
    assert tensors[f"{name}.scales"].dtype == torch.float16 and tuple(tensors[f"{name}.scales"].shape) == (G, N)
    assert tensors[f"{name}.g_idx"].dtype == torch.int32 and tensors[f"{name}.g_idx"].shape == (K,)
    if bits == 4:  # symmetric v1: every stored zero is 7 (doc A3)
        assert (tensors[f"{name}.qzeros"] == 0x77777777).all()
    monotone = bool((tensors[f"{name}.g_idx"].diff() >= 0).all())
    assert monotone == (not desc_act), "act-order stores g_idx in original channel order (doc A4)"
    assert tensors["model.embed_tokens.weight"].dtype == torch.float16
    assert tensors["model.norm.weight"].dtype == torch.float16
    return tensors


def test_gptq_output_follows_the_format_doc_and_loads(nf4_run, nf4_adapter, chat_files, tmp_path):
    from quant.gptq.model import load_gptq_model
    from quant.gptq.nn import QuantLinear

    result = quiet_merge(nf4_run, tmp_path / "gptq", "gptq", calib=str(chat_files[0]),
                         options={"group_size": 32}, calib_samples=8, calib_seqlen=64)
    out = result.out_dir
    _check_gptq_layout(out, 4, 32, True)  # act-order: from a bnb base the merge takes quant gptq's defaults
    report = json.loads((out / "merge_report.json").read_text())
    assert report["gptq"]["method"] == "gptq" and report["gptq"]["calib_samples"] == 8
    assert report["fidelity"]["retention"] > 0.9
    log = json.loads((out / "quant_log.json").read_text())
    assert len(log["layers"]) == 14 and log["mean_rel_error"] < 0.1

    model = load_gptq_model(out)
    for name, W in nf4_adapter[1].items():
        layer = model.get_submodule(name)
        assert isinstance(layer, QuantLinear)
        # GPTQ minimises output error, not weight error: its weight error runs above RTN's ~0.1 at 4 bits.
        assert ((layer.dequantize() - W).norm() / W.norm()).item() < 0.25, name

    rtn = quiet_merge(nf4_run, tmp_path / "rtn", "gptq", options={"method": "rtn", "group_size": 32},
                      report=False).out_dir
    _check_gptq_layout(rtn, 4, 32, False)
    assert json.loads((rtn / "config.json").read_text())["quantization_config"]["meta"]["method"] == "rtn"
    with torch.no_grad():
        assert torch.isfinite(load_gptq_model(rtn)(IDS).logits).all()


def test_gptq_base_adapter_merges_to_bf16_and_requantizes_with_the_base_settings(gptq_run, chat_files, tmp_path):
    from transformers import AutoModelForCausalLM

    out = quiet_merge(gptq_run, tmp_path / "bf16", "bf16", report=False).out_dir
    model = _adapter_model(gptq_run, "gptq")
    written = read_state(out)
    for name, W in _expected_merged(model).items():
        assert torch.equal(written[f"{name}.weight"], W.to(torch.bfloat16)), name
    merged = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    with torch.no_grad():
        b, c = model(IDS).logits, merged(IDS).logits
    assert (b - c).abs().max() < 2e-2 * b.abs().max()

    # Requantized to GPTQ: by default the base's own bits, group size and act-order.
    result = quiet_merge(gptq_run, tmp_path / "gptq", "gptq", calib=str(chat_files[0]), calib_samples=8,
                         calib_seqlen=64)
    _check_gptq_layout(result.out_dir, 4, 32, True)
    assert result.fidelity["retention"] > 0.8


def test_checkpoint_dir_and_original_weights(nf4_run, tiny_model_dir, tmp_path):
    """A checkpoint-N/ merges like the final adapter (its base comes from the run's recipe.yaml); merging
    into the original weights adds the same delta to the unquantized checkpoint instead."""
    final = read_state(quiet_merge(nf4_run, tmp_path / "final", "bf16", report=False).out_dir)
    ckpt = sorted(nf4_run.glob("checkpoint-*"))[-1]
    from_ckpt = quiet_merge(ckpt, tmp_path / "ckpt", "bf16", report=False).out_dir
    assert (from_ckpt / "tokenizer.json").exists()
    assert all(torch.equal(final[k], v) for k, v in read_state(from_ckpt).items())

    original = read_state(quiet_merge(nf4_run, tmp_path / "orig", "bf16", merge_into="original",
                                    report=False).out_dir)
    module = "model.layers.0.self_attn.q_proj"
    W = Checkpoint(tiny_model_dir).get(f"{module}.weight")
    delta = read_adapter(nf4_run).loras[module].delta()
    assert torch.equal(original[f"{module}.weight"], (W + delta).to(torch.bfloat16))
    rebuilt = rebuild_4bit(W, "nf4", True, torch.float32)
    assert torch.equal(final[f"{module}.weight"], (rebuilt + delta).to(torch.bfloat16))


def test_auto_merges_into_the_originals_when_requantizing_onto_the_base_grid(nf4_run, tiny_model_dir, tmp_path):
    """A delta far below half an NF4 step, added to the dequantized NF4 weights, rounds back to the very codes it
    started from: the adapter vanishes. 'auto' therefore rounds original + delta for nf4 -> nf4, which keeps the
    delta in expectation. (The quickstart's deltas are ~20x below the NF4 error; the tiny run's are not, so the
    adapter is scaled down to that regime.)"""
    import bitsandbytes.functional as bnbf
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM

    run = tmp_path / "run"
    shutil.copytree(nf4_run, run)
    name = "model.layers.1.mlp.down_proj"
    W = Checkpoint(tiny_model_dir).get(f"{name}.weight")
    W_deq = rebuild_4bit(W, "nf4", True, torch.float32)
    delta = read_adapter(run).loras[name].delta()
    shrink = 0.05 * (W - W_deq).pow(2).mean().sqrt() / delta.pow(2).mean().sqrt()
    weights_file = run / "adapter" / "adapter_model.safetensors"
    weights = load_file(str(weights_file))
    save_file({k: v * shrink if "lora_B" in k else v for k, v in weights.items()}, str(weights_file))
    delta = read_adapter(run).loras[name].delta()

    def kept(result) -> float:
        """How much of the delta the written weights realise: <Wq - W_deq, delta> / |delta|^2."""
        layer = AutoModelForCausalLM.from_pretrained(str(result.out_dir), device_map="cpu").get_submodule(name)
        Wq = bnbf.dequantize_4bit(layer.weight.data, layer.weight.quant_state).float()
        return (((Wq - W_deq) * delta).sum() / delta.pow(2).sum()).item()

    rounded_back = quiet_merge(run, tmp_path / "deq", "nf4", merge_into="dequantized", report=False)
    auto = quiet_merge(run, tmp_path / "auto", "nf4", report=False)
    assert auto.merge_into == "original" and auto.report["merge_into_reason"].startswith("auto:")
    assert abs(kept(rounded_back)) < 0.1
    assert 0.6 < kept(auto) < 1.4
    assert quiet_merge(run, tmp_path / "bf16", "bf16", report=False).merge_into == "dequantized"
