"""What GPTQ's and AWQ's packed layers share through quant.packed.PackedLinear, held for both."""

from __future__ import annotations

import pytest
import torch
from test_awq_nn import make_layer as awq_layer
from test_gptq_nn import make_layer as gptq_layer


@pytest.mark.parametrize("make", [gptq_layer, awq_layer], ids=["gptq", "awq"])
def test_backward_through_bf16(make):
    layer, _ = make()
    x = torch.randn(5, layer.in_features, dtype=torch.bfloat16, requires_grad=True)
    y = layer(x)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    W = layer.dequantize(torch.bfloat16)
    torch.testing.assert_close(x.grad, torch.ones(5, 64, dtype=torch.bfloat16) @ W, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("make", [gptq_layer, awq_layer], ids=["gptq", "awq"])
def test_gradient_checkpointing_recomputes_through_the_packed_layer(make):
    """Non-reentrant activation checkpointing unpacks each saved tensor once: the frozen-weight backward must read
    its saved packed tensors once only (the LoRA training path with gradient checkpointing)."""
    from torch.utils.checkpoint import checkpoint

    layer, _ = make()
    x = torch.randn(3, layer.in_features, requires_grad=True)
    checkpoint(lambda t: layer(t), x, use_reentrant=False).sum().backward()
    torch.testing.assert_close(x.grad, torch.ones(3, 64) @ layer.dequantize(), rtol=1e-5, atol=1e-5)
