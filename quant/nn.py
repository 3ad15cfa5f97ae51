"""`QuantLinear`: an nn.Module that runs a GPTQ layer straight from its checkpoint tensors.

Buffers carry the ecosystem's names (qweight, qzeros, scales, g_idx, bias) so `state_dict()` keys are the
checkpoint keys. There is deliberately no `weight`: the float weight is only ever made transiently, one
layer at a time, by `dequantize()` or inside the autograd function.

Training: `GPTQMatmul` is frozen-weight autograd. Backward returns grad_input = grad_out @ Wᵀ with W
dequantized again on the fly (not saved from forward, so activation memory stays that of a normal
frozen Linear) and no gradient for the packed tensors. LoRA from peft wraps this module via
`quant.peft_support` (peft's own GPTQ LoRA layer, registered as a custom module).
"""

from __future__ import annotations

import torch
from torch import nn

from quant.formats.gptq_pack import V1, encode_zeros, pack_rows, packed_len, zero_offset
from quant.gptq import QuantResult, group_count
from quant.kernels import torch_ref, triton_available

KERNELS = ("auto", "torch", "triton")


def _kernel_module(x: torch.Tensor, choice: str):
    if choice == "torch" or (choice == "auto" and x.device.type != "cuda"):
        return torch_ref
    if choice == "auto" and not triton_available():
        return torch_ref
    from quant.kernels import triton_gptq

    return triton_gptq


class GPTQMatmul(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, qweight, qzeros, scales, g_idx, bits, zero_off, kernel):
        k = _kernel_module(x, kernel)
        ctx.save_for_backward(qweight, qzeros, scales, g_idx)
        ctx.meta = (bits, zero_off, kernel)
        return k.gptq_matmul(x, qweight, qzeros, scales, g_idx, bits, zero_off)

    @staticmethod
    def backward(ctx, grad_out):
        grad_x = None
        if ctx.needs_input_grad[0]:
            qweight, qzeros, scales, g_idx = ctx.saved_tensors
            bits, zero_off, kernel = ctx.meta
            k = _kernel_module(grad_out, kernel)
            W = k.gptq_dequantize(qweight, qzeros, scales, g_idx, bits, zero_off, out_dtype=grad_out.dtype)
            grad_x = grad_out @ W.T
        return grad_x, None, None, None, None, None, None, None


class QuantLinear(nn.Module):
    """y = x @ dequant(W) + bias for a GPTQ-packed layer of `bits` with `group_size` (-1: one group)."""

    def __init__(self, in_features: int, out_features: int, bits: int, group_size: int, bias: bool = True,
                 checkpoint_format: str = V1, device=None, kernel: str = "auto"):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.bits, self.group_size = bits, group_size
        self.checkpoint_format = checkpoint_format
        self.zero_offset = zero_offset(checkpoint_format)
        if kernel not in KERNELS:
            raise ValueError(f"kernel must be one of {KERNELS}")
        self.kernel = kernel
        G = group_count(in_features, group_size)
        f = dict(device=device)
        self.register_buffer("qweight", torch.zeros(packed_len(in_features, bits), out_features, dtype=torch.int32, **f))
        self.register_buffer("qzeros", torch.zeros(G, packed_len(out_features, bits), dtype=torch.int32, **f))
        self.register_buffer("scales", torch.zeros(G, out_features, dtype=torch.float16, **f))
        self.register_buffer("g_idx", torch.zeros(in_features, dtype=torch.int32, **f))
        if bias:
            self.register_buffer("bias", torch.zeros(out_features, dtype=torch.float16, **f))
        else:
            self.bias = None

    # peft's generic in/out detection looks for these (tuners_utils._get_in_out_features).
    @property
    def infeatures(self) -> int:
        return self.in_features

    @property
    def outfeatures(self) -> int:
        return self.out_features

    @classmethod
    def from_result(cls, result: QuantResult, bias: torch.Tensor | None = None, checkpoint_format: str = V1,
                    kernel: str = "auto") -> "QuantLinear":
        N, K = result.q.shape
        layer = cls(K, N, result.bits, result.group_size, bias=bias is not None,
                    checkpoint_format=checkpoint_format, device=result.q.device, kernel=kernel)
        layer.qweight.copy_(pack_rows(result.q.T, result.bits))
        layer.qzeros.copy_(encode_zeros(result.zeros.round(), result.bits, checkpoint_format))
        layer.scales.copy_(result.scales.to(torch.float16))
        layer.g_idx.copy_(result.g_idx.to(torch.int32))
        if bias is not None:
            layer.bias.copy_(bias.detach().to(torch.float16))
        return layer

    def dequantize(self, dtype=torch.float32) -> torch.Tensor:
        """The float weight in nn.Linear layout [out_features, in_features]."""
        probe = self.scales
        k = _kernel_module(probe, self.kernel)
        W = k.gptq_dequantize(self.qweight, self.qzeros, self.scales, self.g_idx, self.bits, self.zero_offset,
                              out_dtype=dtype)
        return W.T

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"QuantLinear expects last dim {self.in_features}, got {tuple(x.shape)}")
        y = GPTQMatmul.apply(x, self.qweight, self.qzeros, self.scales, self.g_idx, self.bits, self.zero_offset,
                             self.kernel)
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
                f"group_size={self.group_size}, format={self.checkpoint_format}, bias={self.bias is not None}")
