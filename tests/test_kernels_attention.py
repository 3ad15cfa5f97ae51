"""Packed rows attend within each example: segments from position ids, the reference, and the flash varlen path."""

from __future__ import annotations

import pytest
import torch

from finetune.kernels.attention import attention, attention_reference, is_right_padding, segments

gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def packed_positions(lengths_per_row):
    return torch.stack([torch.cat([torch.arange(n) for n in row]) for row in lengths_per_row])


def test_segments_from_position_ids():
    pos = packed_positions([[3, 2, 1], [6]])
    seg = segments(pos, 2, 6, torch.device("cpu"))
    assert seg.cu_seqlens.tolist() == [0, 3, 5, 6, 12] and seg.max_len == 6 and seg.packed
    assert segments(pos, 2, 6, torch.device("cpu")) is seg  # every layer asks again: one host copy per forward
    plain = segments(torch.arange(6)[None], 2, 6, torch.device("cpu"))  # one position row broadcast over the batch
    assert plain.cu_seqlens.tolist() == [0, 6, 12] and not plain.packed
    assert segments(None, 3, 4, torch.device("cpu")).cu_seqlens.tolist() == [0, 4, 8, 12]


def test_reference_attends_within_each_packed_example():
    torch.manual_seed(0)
    lengths = [[5, 3, 4], [12]]
    q, k, v = torch.randn(2, 12, 4, 8), torch.randn(2, 12, 2, 8), torch.randn(2, 12, 2, 8)
    out = attention_reference(q, k, v, 0.3, packed_positions(lengths))
    assert attention(q, k, v, 0.3, packed_positions(lengths)).equal(out)  # CPU: the reference itself
    for r, row in enumerate(lengths):
        t = 0
        for n in row:
            alone = attention_reference(q[r:r + 1, t:t + n], k[r:r + 1, t:t + n], v[r:r + 1, t:t + n], 0.3)
            torch.testing.assert_close(out[r:r + 1, t:t + n], alone)
            t += n


def test_right_padding_mask_detection():
    T = 5
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    real = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]], dtype=torch.bool)
    right = causal[None, None] & real[:, None, None, :]
    assert is_right_padding(None) and is_right_padding(right)
    left = causal[None, None] & real.flip(1)[:, None, None, :]
    assert not is_right_padding(left)
    additive = torch.zeros(2, 1, T, T).masked_fill(~right, float("-inf"))
    assert is_right_padding(additive)


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("cudnn", [True, False])
@pytest.mark.parametrize("lengths", [[[2048]] * 2, [[700, 1000, 348], [64, 1984]], [[1] * 8 + [2040], [2048]]])
def test_fused_attention_matches_reference_on_gpu(lengths, cudnn):
    torch.manual_seed(1)
    B, T, H, KV, D = len(lengths), sum(lengths[0]), 8, 2, 128
    pos = packed_positions(lengths).cuda()
    mk = lambda h: torch.randn(B, T, h, D, device="cuda", dtype=torch.bfloat16).requires_grad_()  # noqa: E731
    q, k, v = mk(H), mk(KV), mk(KV)
    dy = torch.randn(B, T, H, D, device="cuda", dtype=torch.bfloat16)
    out = attention(q, k, v, D ** -0.5, pos, cudnn=cudnn)
    grads = torch.autograd.grad(out, (q, k, v), dy)
    exact = [t.detach().double().requires_grad_() for t in (q, k, v)]
    ref = attention_reference(*exact, D ** -0.5, pos)
    ref_grads = torch.autograd.grad(ref, exact, dy.double())
    for a, b in zip([out] + list(grads), [ref] + list(ref_grads)):
        err = float((a.double() - b).norm() / b.norm())
        assert err < 1e-2, err
