"""Whole-model quantization, checkpoints written and read back, and GPTQModel-written checkpoints."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from quant_helpers import assert_reproduces_gptqmodel, calib_ids, tiny_llama
from safetensors.torch import load_file

from quant.blocks import QuantReport
from quant.errors import UserError
from quant.gptq.model import load_gptq_model, quantize_model, save_quantized
from quant.gptq.nn import QuantLinear
from quant.gptq.pack import convert_qzeros
from quant.gptq.solver import GPTQConfig

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "gptqmodel_tiny"
IDS = torch.randint(3, 128, (2, 24), generator=torch.Generator().manual_seed(5))


def fake_quant_copy(model):
    """The quantized model with every QuantLinear replaced by an nn.Linear holding its dequantized weight."""
    fq = copy.deepcopy(model)
    for name, mod in list(fq.named_modules()):
        if isinstance(mod, QuantLinear):
            lin = torch.nn.Linear(mod.in_features, mod.out_features, bias=mod.bias is not None)
            with torch.no_grad():
                lin.weight.copy_(mod.dequantize())
                if mod.bias is not None:
                    lin.bias.copy_(mod.bias.float())
            parent, _, child = name.rpartition(".")
            setattr(fq.get_submodule(parent), child, lin)
    return fq


@pytest.mark.parametrize("cfg,fmt", [
    (GPTQConfig(bits=4, group_size=32, desc_act=True), "gptq"),
    (GPTQConfig(bits=3, group_size=64, sym=False, true_sequential=False), "gptq_v2"),
    (GPTQConfig(bits=2, group_size=-1, static_groups=True, desc_act=True), "gptq"),
])
def test_save_load_round_trip_reproduces_fake_quant_logits(tmp_path, cfg, fmt):
    model = tiny_llama()
    report = quantize_model(model, calib_ids(8, 48), cfg, checkpoint_format=fmt, progress=False)
    assert isinstance(report, QuantReport) and len(report.layers) == 14
    assert all(e.rel_error is not None and e.rel_error < 1 for e in report.layers)
    assert sum(isinstance(m, QuantLinear) for m in model.modules()) == 14
    fq = fake_quant_copy(model)
    out = save_quantized(model, tmp_path / "ckpt", report=report)
    loaded = load_gptq_model(out)
    assert type(loaded.model.layers[0].mlp.up_proj) is QuantLinear
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight  # tied again after loading
    with torch.no_grad():
        ref = fq(IDS).logits
        torch.testing.assert_close(loaded(IDS).logits, ref, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(model(IDS).logits, ref, rtol=1e-5, atol=1e-5)
    log = json.loads((out / "quant_log.json").read_text())
    assert len(log["layers"]) == 14 and log["calib_samples"] == 8


def test_v1_and_v2_files_of_the_same_model_read_identically(tmp_path):
    model = tiny_llama()
    # asymmetric grids default to v2 ('auto'); ask for v1 explicitly so there is a v1 file to convert
    quantize_model(model, calib_ids(4, 32), GPTQConfig(bits=4, group_size=32, sym=False), checkpoint_format="gptq",
                   progress=False)
    v1 = save_quantized(model, tmp_path / "v1")
    # rewrite the same tensors as v2, the way another tool would
    tensors = load_file(str(v1 / "model.safetensors"))
    for k in [k for k in tensors if k.endswith(".qzeros")]:
        tensors[k] = convert_qzeros(tensors[k], 4, "gptq", "gptq_v2")
    v2 = tmp_path / "v2"
    v2.mkdir()
    from safetensors.torch import save_file

    save_file(tensors, str(v2 / "model.safetensors"), metadata={"format": "pt"})
    cfg = json.loads((v1 / "config.json").read_text())
    cfg["quantization_config"].update(checkpoint_format="gptq_v2", format="gptq_v2")
    (v2 / "config.json").write_text(json.dumps(cfg))
    a, b = load_gptq_model(v1), load_gptq_model(v2)
    assert b.model.layers[0].self_attn.q_proj.checkpoint_format == "gptq_v2"
    with torch.no_grad():
        assert torch.equal(a(IDS).logits, b(IDS).logits)


def test_rtn_is_data_free_and_worse_than_gptq_on_calibration_like_data():
    calib = calib_ids(8, 64)
    errs = {}
    ref = tiny_llama()
    with torch.no_grad():
        want = ref(IDS).logits
    for method in ("rtn", "gptq"):
        model = tiny_llama()
        quantize_model(model, None if method == "rtn" else calib, GPTQConfig(bits=3, group_size=32, method=method),
                       progress=False)
        with torch.no_grad():
            errs[method] = (model(IDS).logits - want).pow(2).mean().item()
    assert errs["gptq"] < errs["rtn"]


def test_quantize_model_refuses_bad_input():
    with pytest.raises(UserError, match="does not fit"):
        quantize_model(tiny_llama(), calib_ids(2), GPTQConfig(group_size=128), progress=False)
    with pytest.raises(UserError, match="empty"):
        quantize_model(tiny_llama(), [], GPTQConfig(group_size=32), progress=False)
    with pytest.raises(UserError, match="packed"):
        quantize_model(tiny_llama(hidden=80, intermediate=96), calib_ids(2), GPTQConfig(bits=3, group_size=16),
                       progress=False)


def test_load_refuses_non_gptq_dir(tmp_path):
    tiny_llama().save_pretrained(tmp_path)
    with pytest.raises(UserError, match="not a GPTQ checkpoint"):
        load_gptq_model(tmp_path)


@pytest.mark.parametrize("variant", ["asym_g64_v2", "sym_g32_actorder_v1"])
def test_gptqmodel_checkpoint_reproduces_gptqmodel_outputs(variant):
    """Checkpoints and reference outputs written by GPTQModel 7.6.0 (scripts/interop/interop_gptqmodel.py)."""
    ckpt = FIXTURES / variant
    rec = load_file(str(ckpt / "gptqmodel_outputs.safetensors"))
    model = load_gptq_model(ckpt, dtype=torch.float16)
    qc = model.config.quantization_config
    layers = assert_reproduces_gptqmodel(model, rec, lambda mod: mod.dequantize(torch.float16).T)
    assert all(isinstance(m, QuantLinear) for m in layers)
    if variant.endswith("actorder_v1"):
        g = model.model.layers[0].mlp.down_proj.g_idx.long()
        assert qc["desc_act"] and not bool((g[1:] >= g[:-1]).all())
    else:
        assert model.model.layers[0].self_attn.q_proj.checkpoint_format == "gptq_v2"


def test_per_module_overrides_are_read_from_tensor_shapes(tmp_path):
    """GPTQModel's `dynamic` config can give single modules other bits/group sizes; shapes tell them apart."""
    from safetensors.torch import save_file

    from quant.gptq.solver import rtn_quantize

    model = tiny_llama()
    w_down = model.model.layers[1].mlp.down_proj.weight.detach().clone()
    quantize_model(model, None, GPTQConfig(bits=4, group_size=32, method="rtn"), progress=False)
    out = save_quantized(model, tmp_path / "ckpt")
    tensors = load_file(str(out / "model.safetensors"))
    special = QuantLinear.from_result(rtn_quantize(w_down, GPTQConfig(bits=8, group_size=64)))
    for k, v in special.state_dict().items():
        tensors[f"model.layers.1.mlp.down_proj.{k}"] = v
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    loaded = load_gptq_model(out)
    down = loaded.model.layers[1].mlp.down_proj
    assert (down.bits, down.group_size) == (8, 64) and loaded.model.layers[0].mlp.down_proj.bits == 4
    assert torch.equal(down.dequantize(), special.dequantize())
