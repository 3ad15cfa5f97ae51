"""ggml block formats written by us, checked against the `gguf` package's own decoder (and quantizers)."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as G

from quant.ggml.types import TYPES, encode, encode_blocks

BLOCK_TYPES = [G.Q8_0, G.Q4_0, G.Q4_1, G.Q5_0, G.Q5_1, G.Q4_K, G.Q5_K, G.Q6_K]
LEGACY = [G.Q8_0, G.Q4_0, G.Q4_1, G.Q5_0, G.Q5_1]
pytestmark = pytest.mark.usefixtures("one_thread")


def weights(rows: int = 64, cols: int = 512, seed: int = 0) -> torch.Tensor:
    """Gaussian weights with the blocks that break naive quantizers: all zero, constant, one-signed, an outlier,
    values far below fp16's normal range."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, cols, generator=g) * 0.02
    x[0] = 0
    x[1] = 0.37
    x[2] = -torch.rand(cols, generator=g)
    x[3, 5] = 4.0
    x[4] *= 1e-6
    x[5, : cols // 2] = torch.rand(cols // 2, generator=g) + 1
    return x


def decoded_by_gguf(data: torch.Tensor, qtype: G, shape) -> np.ndarray:
    return gguf.quants.dequantize(data.numpy().reshape(-1), qtype).reshape(shape)


@pytest.mark.parametrize("qtype", BLOCK_TYPES, ids=lambda t: t.name)
@pytest.mark.parametrize("with_importance", [False, True], ids=["reference", "importance"])
def test_gguf_decodes_exactly_what_we_meant(qtype, with_importance):
    tt = TYPES[qtype]
    x = weights().reshape(-1, tt.block)
    qw = torch.rand(x.shape, generator=torch.Generator().manual_seed(1)) + 0.05 if with_importance else None
    data, meant = encode_blocks(x, tt, qw)
    assert data.shape == (x.shape[0], tt.nbytes) and data.dtype == torch.uint8
    np.testing.assert_array_equal(decoded_by_gguf(data, qtype, meant.shape), meant.numpy())


@pytest.mark.parametrize("qtype", LEGACY, ids=lambda t: t.name)
def test_legacy_reference_bytes_equal_ggmls_reference_quantizer(qtype):
    """Without importance our legacy quantizers are ggml's reference ones, which `gguf` copies bit for bit."""
    x = weights()
    ours = encode(x, TYPES[qtype])
    theirs = gguf.quants.quantize(x.numpy(), qtype)
    np.testing.assert_array_equal(ours, theirs)


# Relative squared error of Gaussian weights per type: the order of the formats' precision, with headroom.
ERROR_BOUND = {G.Q8_0: 4e-5, G.Q6_K: 4e-4, G.Q5_K: 1.7e-3, G.Q5_1: 1.9e-3, G.Q5_0: 2.4e-3, G.Q4_K: 6.5e-3,
               G.Q4_1: 8e-3, G.Q4_0: 9e-3}


@pytest.mark.parametrize("qtype", BLOCK_TYPES, ids=lambda t: t.name)
def test_error_is_that_of_the_format(qtype):
    x = torch.randn(128, 1024, generator=torch.Generator().manual_seed(2)) * 0.02
    tt = TYPES[qtype]
    _, meant = encode_blocks(x.reshape(-1, tt.block), tt)
    rel = ((meant.reshape(x.shape) - x).pow(2).sum() / x.pow(2).sum()).item()
    assert rel < ERROR_BOUND[qtype]
    assert rel > ERROR_BOUND[qtype] / 20  # a lossless "quantizer" would be a bug too


@pytest.mark.parametrize("qtype", [G.Q4_0, G.Q4_1, G.Q5_0, G.Q5_1, G.Q4_K, G.Q5_K, G.Q6_K], ids=lambda t: t.name)
def test_importance_lowers_the_error_where_it_is_large(qtype):
    """Columns with 30x the activation energy: the importance-weighted search trades error towards the others."""
    tt = TYPES[qtype]
    cols = 512
    x = torch.randn(256, cols, generator=torch.Generator().manual_seed(3)) * 0.02
    imp = torch.ones(cols)
    imp[torch.randperm(cols, generator=torch.Generator().manual_seed(4))[:48]] = 30.0

    def weighted_error(importance):
        data = encode(x, tt, importance)
        back = torch.from_numpy(gguf.quants.dequantize(data.reshape(-1), qtype).reshape(x.shape))
        return ((back - x).pow(2) * imp).sum().item()

    assert weighted_error(imp) < 0.97 * weighted_error(None)


def test_q8_0_ignores_importance_like_ggml():
    x = weights()
    np.testing.assert_array_equal(encode(x, TYPES[G.Q8_0]), encode(x, TYPES[G.Q8_0], torch.rand(x.shape[1])))


@pytest.mark.parametrize("qtype", [G.F32, G.F16, G.BF16], ids=lambda t: t.name)
def test_float_types_pass_the_values_through(qtype):
    x = weights(8, 64)
    data = encode(x, TYPES[qtype])
    back = gguf.quants.dequantize(data.reshape(-1), qtype).reshape(x.shape)
    expected = x.to({G.F32: torch.float32, G.F16: torch.float16, G.BF16: torch.bfloat16}[qtype]).float()
    np.testing.assert_array_equal(back, expected.numpy())


def test_rows_are_processed_in_chunks_without_changing_the_bytes():
    x = weights(96, 512)
    for qtype in (G.Q4_K, G.Q5_0):
        imp = torch.rand(512) + 0.1
        np.testing.assert_array_equal(encode(x, TYPES[qtype], imp, chunk_elems=512 * 8),
                                      encode(x, TYPES[qtype], imp, chunk_elems=1 << 20))


def test_encode_refuses_what_ggml_cannot_hold():
    with pytest.raises(ValueError, match="multiple of Q4_K's block of 256"):
        encode(torch.randn(4, 576), TYPES[G.Q4_K])
    with pytest.raises(ValueError, match="NaN or Inf"):
        encode(torch.tensor([[float("nan")] * 32]), TYPES[G.Q8_0])
    with pytest.raises(ValueError, match="overflows fp16"):
        encode(torch.full((1, 32), 1e7), TYPES[G.Q8_0])
