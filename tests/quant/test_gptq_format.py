"""GPTQ on-disk format against docs/quantized-formats.md section A."""

from __future__ import annotations

import json

import pytest
import torch
from quant_helpers import calib_ids, tiny_llama
from safetensors import safe_open

from quant.errors import UserError
from quant.gptq.pack import read_quant_config
from quant.gptq.pack import (
    convert_qzeros,
    decode_zeros,
    encode_zeros,
    pack_cols,
    pack_rows,
    unpack_cols,
    unpack_rows,
)
from quant.gptq.model import quantize_model, save_quantized
from quant.gptq.solver import GPTQConfig


def u32(x: int) -> int:
    return x & 0xFFFFFFFF


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_pack_unpack_round_trip(bits):
    g = torch.Generator().manual_seed(bits)
    Q = torch.randint(0, 2**bits, (96, 40), generator=g)
    P = pack_rows(Q, bits)
    assert P.dtype == torch.int32 and P.shape == (96 * bits // 32, 40)
    assert torch.equal(unpack_rows(P, bits).long(), Q)
    Z = torch.randint(0, 2**bits, (3, 64), generator=g)
    PZ = pack_cols(Z, bits)
    assert PZ.dtype == torch.int32 and PZ.shape == (3, 64 * bits // 32)
    assert torch.equal(unpack_cols(PZ, bits).long(), Z)


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_pack_word_layout_lsb_first(bits):
    # doc A2: qweight[r, n] = OR_j Q[r*p + j, n] << (b*j)
    p = 32 // bits
    Q = torch.randint(0, 2**bits, (p, 1), generator=torch.Generator().manual_seed(0))
    expected = sum(int(Q[j, 0]) << (bits * j) for j in range(p))
    assert u32(int(pack_rows(Q, bits)[0, 0])) == expected


def test_pack_3bit_layout_matches_doc():
    v = torch.randint(0, 8, (32, 1), generator=torch.Generator().manual_seed(3))
    w = [u32(int(x)) for x in pack_rows(v, 3)[:, 0]]
    vals = [int(x) for x in v[:, 0]]
    w0 = sum(vals[j] << (3 * j) for j in range(10)) | ((vals[10] & 3) << 30)
    w1 = (vals[10] >> 2) | sum(vals[11 + j] << (3 * j + 1) for j in range(10)) | ((vals[21] & 1) << 31)
    w2 = (vals[21] >> 1) | sum(vals[22 + j] << (3 * j + 2) for j in range(10))
    assert w == [w0, w1, w2]


SYM_TABLE = {  # doc A3, computed there with AutoGPTQ's packer
    2: ([0x55555555], [0xAAAAAAAA]),
    3: ([0xDB6DB6DB, 0xB6DB6DB6, 0x6DB6DB6D], [0x24924924, 0x49249249, 0x92492492]),
    4: ([0x77777777], [0x88888888]),
    8: ([0x7F7F7F7F], [0x80808080]),
}


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_symmetric_zero_constants(bits):
    z = torch.full((2, 32), 2 ** (bits - 1))
    v1, v2 = SYM_TABLE[bits]
    words_v1 = [u32(int(x)) for x in encode_zeros(z, bits, "gptq")[0]]
    words_v2 = [u32(int(x)) for x in encode_zeros(z, bits, "gptq_v2")[0]]
    assert words_v1 == (v1 * (bits // len(v1)))[: len(words_v1)]
    assert words_v2 == (v2 * (bits // len(v2)))[: len(words_v2)]
    assert torch.equal(decode_zeros(encode_zeros(z, bits, "gptq"), bits, "gptq").long(), z)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_v1_v2_conversion(bits):
    z = torch.randint(1, 2**bits, (4, 64), generator=torch.Generator().manual_seed(bits))
    v1 = encode_zeros(z, bits, "gptq")
    v2 = convert_qzeros(v1, bits, "gptq", "gptq_v2")
    assert torch.equal(v2, encode_zeros(z, bits, "gptq_v2"))
    assert torch.equal(convert_qzeros(v2, bits, "gptq_v2", "gptq"), v1)
    if bits != 3:  # word arithmetic of doc A3 (valid when no field is 0 in v2 terms)
        const = {2: 0x55555555, 4: 0x11111111, 8: 0x01010101}[bits]
        assert [u32(int(a) + const) for a in v1.flatten()] == [u32(int(b)) for b in v2.flatten()]


def test_v1_refuses_zero_point_zero():
    with pytest.raises(ValueError, match="gptq_v2"):
        encode_zeros(torch.tensor([[0] * 8]), 4, "gptq")
    assert torch.equal(decode_zeros(encode_zeros(torch.tensor([[0] * 8]), 4, "gptq_v2"), 4, "gptq_v2").long(),
                       torch.zeros(1, 8, dtype=torch.long))


@pytest.mark.parametrize("sym,fmt", [(True, "gptq"), (False, "gptq"), (False, "gptq_v2")])
def test_written_checkpoint_follows_format_doc(tmp_path, sym, fmt):
    model = tiny_llama()
    cfg = GPTQConfig(bits=4, group_size=32, sym=sym, desc_act=True)
    quantize_model(model, calib_ids(4, 32), cfg, checkpoint_format=fmt, progress=False)
    out = save_quantized(model, tmp_path / "ckpt")
    names = sorted(p.name for p in out.iterdir())
    assert {"config.json", "quantize_config.json", "model.safetensors"} <= set(names)
    assert not any(n.startswith(".") for n in tmp_path.iterdir() for n in [n.name])  # temp dir renamed away
    qc = json.loads((out / "quantize_config.json").read_text())
    assert qc == json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["checkpoint_format"] == qc["format"] == fmt and qc["quant_method"] == "gptq"
    assert qc["bits"] == 4 and qc["group_size"] == 32 and qc["sym"] is sym and qc["desc_act"] is True
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert f.metadata() == {"format": "pt"}
        keys = set(f.keys())
        assert "model.layers.0.mlp.down_proj.weight" not in keys and "lm_head.weight" not in keys  # tied
        K, N = 128, 64  # down_proj
        p = "model.layers.1.mlp.down_proj"
        qw, qz, sc, gi = (f.get_tensor(f"{p}.{k}") for k in ("qweight", "qzeros", "scales", "g_idx"))
        assert qw.dtype == torch.int32 and qw.shape == (K * 4 // 32, N)
        assert qz.dtype == torch.int32 and qz.shape == (K // 32, N * 4 // 32)
        assert sc.dtype == torch.float16 and sc.shape == (K // 32, N)
        assert gi.dtype == torch.int32 and gi.shape == (K,)
        assert sorted(torch.bincount(gi.long()).tolist()) == [32] * 4  # act-order: every group has gs channels
        assert not torch.equal(gi, torch.arange(K, dtype=torch.int32) // 32)
        z = decode_zeros(qz, 4, fmt)
        if sym:
            assert bool((z == 8).all())
            assert {u32(int(w)) for w in qz.flatten()} == {0x77777777 if fmt == "gptq" else 0x88888888}
        else:
            assert int(z.min()) >= 1 and int(z.max()) <= 15  # z >= 1: no v1 overflow
        assert f.get_tensor("model.embed_tokens.weight").dtype == torch.float16


def test_read_quant_config_variants(tmp_path):
    (tmp_path / "quantize_config.json").write_text(json.dumps({"bits": 4, "group_size": 128, "desc_act": True}))
    q = read_quant_config(tmp_path)
    assert q["sym"] is True and q["checkpoint_format"] == "gptq" and q["desc_act"] is True
    (tmp_path / "config.json").write_text(json.dumps({"quantization_config": {
        "quant_method": "gptq", "bits": 3, "group_size": 64, "sym": False, "format": "gptq_v2"}}))
    q = read_quant_config(tmp_path)
    assert (q["bits"], q["group_size"], q["sym"], q["checkpoint_format"]) == (3, 64, False, "gptq_v2")
    (tmp_path / "config.json").write_text(json.dumps({"quantization_config": {"quant_method": "awq", "bits": 4}}))
    with pytest.raises(UserError, match="awq"):
        read_quant_config(tmp_path)
    with pytest.raises(UserError, match="not a GPTQ checkpoint"):
        read_quant_config(tmp_path / "missing")


def test_sharded_checkpoint_round_trip(tmp_path):
    from quant.gptq.model import load_gptq_model

    model = tiny_llama()
    quantize_model(model, None, GPTQConfig(bits=4, group_size=32, method="rtn"), progress=False)
    out = save_quantized(model, tmp_path / "ckpt", max_shard_bytes=20_000)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    ids = torch.randint(3, 128, (1, 16))
    with torch.no_grad():
        assert torch.equal(load_gptq_model(out)(ids).logits, model(ids).logits)
