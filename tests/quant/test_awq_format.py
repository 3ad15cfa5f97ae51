"""AWQ gemm on-disk format against quant/formats/AWQ.md, and checkpoints written by GPTQModel."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from quant_helpers import assert_reproduces_gptqmodel, calib_ids, tiny_llama
from safetensors.torch import load_file

from quant.awq.kernels import awq_dequantize, dequantize_layer
from quant.awq.model import load_awq_model, quantize_model_awq, save_awq
from quant.awq.nn import AWQLinear
from quant.awq.pack import layer_group_size, pack, read_quant_config, unpack
from quant.awq.solver import AWQConfig
from quant.errors import UserError

SPEC = Path(__file__).resolve().parents[2] / "docs" / "awq-format.md"
FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "gptqmodel_awq_tiny"


def spec_example() -> dict[str, list[list[float]]]:
    """The worked example of AWQ.md: each line 'key values | values ...' (rows split by '|')."""
    text = SPEC.read_text()
    block = text.split("```awq-worked-example\n", 1)[1].split("```", 1)[0]
    out = {}
    for line in block.strip().splitlines():
        key, _, rest = line.partition(" ")
        out[key] = [[float(int(v, 16)) if v.startswith("0x") else float(v) for v in row.split()]
                    for row in rest.split("|")]
    return out


def as_int32(words: list[float]) -> list[int]:
    return [int(w) - 2**32 if w >= 2**31 else int(w) for w in words]


def u32(t: torch.Tensor) -> list[int]:
    return [int(v) & 0xFFFFFFFF for v in t.flatten()]


def test_spec_worked_example_packs_unpacks_and_dequantizes():
    ex = spec_example()
    gs = int(ex["group_size"][0][0])
    codes = torch.tensor(ex["codes"]).long()  # [K, N]
    zeros = torch.tensor(ex["zeros"]).long()  # [G, N]
    scales = torch.tensor(ex["scales"], dtype=torch.float16)
    qweight = torch.tensor([as_int32(r) for r in ex["qweight"]], dtype=torch.int32)
    qzeros = torch.tensor([as_int32(r) for r in ex["qzeros"]], dtype=torch.int32)
    assert u32(pack(codes)) == u32(qweight) and u32(pack(zeros)) == u32(qzeros)
    assert torch.equal(unpack(qweight).long(), codes) and torch.equal(unpack(qzeros).long(), zeros)
    W = awq_dequantize(qweight, qzeros, scales, gs)
    assert torch.equal(W, torch.tensor(ex["W"]))
    # What a merge rebuilds from the stored tensors: the nn.Linear-layout weight
    parts = {"qweight": qweight, "qzeros": qzeros, "scales": scales}
    assert torch.equal(dequantize_layer(parts, layer_group_size(2, 1, 128)), W.T)
    layer = AWQLinear.from_codes(codes.T, scales.T.float(), zeros.T.float(), gs)  # nn.Linear layout in
    assert u32(layer.qweight) == u32(qweight) and u32(layer.qzeros) == u32(qzeros)
    assert torch.equal(layer.dequantize().T, W)


def test_pack_is_the_interleaved_order_on_random_codes():
    # doc section 2: nibble i of word c holds column 8c + [0, 2, 4, 6, 1, 3, 5, 7][i]
    g = torch.Generator().manual_seed(0)
    Q = torch.randint(0, 16, (5, 24), generator=g)
    P = pack(Q)
    assert P.dtype == torch.int32 and P.shape == (5, 3)
    order = [0, 2, 4, 6, 1, 3, 5, 7]
    for r in range(5):
        for c in range(3):
            expected = sum(int(Q[r, 8 * c + order[i]]) << (4 * i) for i in range(8))
            assert int(P[r, c]) & 0xFFFFFFFF == expected
    assert torch.equal(unpack(P).long(), Q)
    with pytest.raises(ValueError, match="multiple of 8"):
        pack(Q[:, :12])


def independent_decode(qweight, qzeros, scales, gs) -> torch.Tensor:
    """Dequantize with plain Python loops straight from doc sections 2-3 (no code shared with quant)."""
    reverse = [0, 4, 1, 5, 2, 6, 3, 7]
    K, W = qweight.shape
    N = W * 8

    def code(words, r, n):
        return (int(words[r, n // 8]) & 0xFFFFFFFF) >> (4 * reverse[n % 8]) & 0xF

    out = torch.empty(K, N)
    for k in range(K):
        for n in range(N):
            out[k, n] = (code(qweight, k, n) - code(qzeros, k // gs, n)) * float(scales[k // gs, n])
    return out


def test_written_checkpoint_follows_the_spec(tmp_path):
    model = tiny_llama()
    quantize_model_awq(model, calib_ids(4, 32), AWQConfig(group_size=32), progress=False)
    expected = {n: m.dequantize() for n, m in model.named_modules() if isinstance(m, AWQLinear)}
    out = save_awq(model, tmp_path / "ckpt")
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert {k: qc[k] for k in ("quant_method", "bits", "group_size", "zero_point", "version")} == {
        "quant_method": "awq", "bits": 4, "group_size": 32, "zero_point": True, "version": "gemm"}
    assert json.loads((out / "quantize_config.json").read_text()) == qc
    tensors = load_file(str(out / "model.safetensors"))
    assert len(expected) == 14
    for name, W in expected.items():
        K, N = W.shape[1], W.shape[0]
        assert {k for k in tensors if k.startswith(name + ".")} == {f"{name}.{s}" for s in ("qweight", "qzeros", "scales")}
        qw, qz, sc = (tensors[f"{name}.{s}"] for s in ("qweight", "qzeros", "scales"))
        assert (qw.dtype, qz.dtype, sc.dtype) == (torch.int32, torch.int32, torch.float16)
        assert qw.shape == (K, N // 8) and qz.shape == (K // 32, N // 8) and sc.shape == (K // 32, N)
        if name.endswith("k_proj"):  # the loop decoder is slow; two layers per model are enough
            assert torch.equal(independent_decode(qw, qz, sc, 32), W.T)
    assert not any(k.endswith(".g_idx") for k in tensors)


def test_read_quant_config_variants(tmp_path):
    def write(qc):
        (tmp_path / "config.json").write_text(json.dumps({"quantization_config": qc}))
        return read_quant_config(tmp_path)

    autoawq = write({"quant_method": "awq", "w_bit": 4, "q_group_size": 64, "zero_point": True, "version": "GEMM"})
    assert (autoawq["bits"], autoawq["group_size"], autoawq["version"]) == (4, 64, "gemm")
    gptqmodel = write({"quant_method": "awq", "bits": 4, "group_size": 32, "format": "gemm", "zero_point": False})
    assert gptqmodel["group_size"] == 32 and gptqmodel["zero_point"] is False
    for qc, msg in [({"quant_method": "awq", "bits": 4, "group_size": 64, "version": "gemv"}, "only 'gemm'"),
                    ({"quant_method": "awq", "bits": 8, "group_size": 64}, "8-bit"),
                    ({"quant_method": "gptq", "bits": 4, "group_size": 64}, "expected 'awq'"),
                    ({"quant_method": "awq", "bits": 4}, "group_size")]:
        with pytest.raises(UserError, match=msg):
            write(qc)


def test_layer_group_size_comes_from_the_scales_rows():
    assert layer_group_size(576, 9, 64) == 64 and layer_group_size(576, 5, 128) == 128  # a partial last group
    assert layer_group_size(576, 1, -1) == 576
    with pytest.raises(UserError, match="scales has 4 groups"):
        layer_group_size(576, 4, 64, "model.layers.0.mlp.up_proj")


def test_loader_refuses_what_it_cannot_read(tmp_path):
    tiny_llama().save_pretrained(tmp_path / "float")
    with pytest.raises(UserError, match="not an AWQ checkpoint"):
        load_awq_model(tmp_path / "float")


@pytest.mark.parametrize("variant", ["zp_g64", "sym_g32"])
def test_gptqmodel_checkpoint_reproduces_gptqmodel_outputs(variant):
    """AWQ checkpoints and reference outputs written by GPTQModel 7.6.0 (scripts/interop/interop_gptqmodel_awq.py):
    zp_g64 is the usual zero-point AWQ, sym_g32 GPTQModel's default (zero_point false, qzeros all 8)."""
    ckpt = FIXTURES / variant
    rec = load_file(str(ckpt / "gptqmodel_outputs.safetensors"))
    model = load_awq_model(ckpt, dtype=torch.float16)
    assert model.config.quantization_config["zero_point"] is (variant == "zp_g64")
    layers = assert_reproduces_gptqmodel(model, rec, lambda mod: mod.dequantize(torch.float16))
    assert all(isinstance(m, AWQLinear) and m.group_size == (64 if variant == "zp_g64" else 32) for m in layers)
    if variant == "sym_g32":
        assert set(unpack(model.model.layers[0].mlp.down_proj.qzeros).unique().tolist()) == {8}
