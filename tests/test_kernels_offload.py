"""Checkpointing with the layer input in host memory gives plain autograd's gradients, dropout included."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from finetune.kernels import offload
from finetune.kernels.offload import LayerCheckpoint, offloaded_checkpoint

gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


class Block(nn.Module):
    def __init__(self, width):
        super().__init__()
        self.lin = nn.Linear(width, width)
        self.drop = nn.Dropout(0.25)

    def forward(self, h):
        return h + self.drop(torch.tanh(self.lin(h)))


def run(blocks, x, wrap):
    h = x
    for b in blocks:
        h = wrap(b, h)
    (h.float() ** 2).sum().backward()
    return [p.grad.clone() for b in blocks for p in b.parameters()] + ([x.grad.clone()] if x.requires_grad else [])


@pytest.mark.parametrize("input_grad", [True, False])
def test_offloaded_checkpoint_gives_plain_gradients(input_grad, device="cpu"):
    torch.manual_seed(0)
    blocks = [Block(16).to(device) for _ in range(3)]
    x = torch.randn(4, 16, device=device, requires_grad=input_grad)
    torch.manual_seed(1)
    want = run(blocks, x, lambda b, h: b(h))
    for b in blocks:
        b.zero_grad()
    if x.grad is not None:
        x.grad = None
    torch.manual_seed(1)
    got = run(blocks, x, lambda b, h: offloaded_checkpoint(b, h))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)


def test_layer_checkpoint_offloads_only_long_micro_batches(monkeypatch):
    calls = []
    real = offload.offloaded_checkpoint
    monkeypatch.setattr(offload, "offloaded_checkpoint", lambda run, h: calls.append(h.shape) or real(run, h))
    block = Block(8)
    policy = LayerCheckpoint(min_tokens=12)
    policy(block, torch.randn(2, 5, 8, requires_grad=True)).sum().backward()
    assert calls == []
    policy(block, torch.randn(2, 6, 8, requires_grad=True)).sum().backward()
    assert calls == [torch.Size([2, 6, 8])]
    LayerCheckpoint(None)(block, torch.randn(2, 60, 8, requires_grad=True)).sum().backward()
    assert len(calls) == 1


@pytest.mark.gpu
@gpu
def test_offloaded_checkpoint_on_gpu():
    test_offloaded_checkpoint_gives_plain_gradients(True, device="cuda")
    torch.manual_seed(2)
    block = Block(1024).cuda()
    x = torch.randn(8192, 1024, device="cuda")
    before = torch.cuda.memory_allocated()
    out = offloaded_checkpoint(block, x.clone())  # the clone is the only reference: it must be freed
    torch.cuda.synchronize()
    assert torch.cuda.memory_allocated() - before <= out.numel() * 4 + 2**20
    out.sum().backward()
