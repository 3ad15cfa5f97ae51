"""`AWQLinear`: an nn.Module that runs an AWQ "gemm" layer straight from its checkpoint tensors.

Buffers carry the ecosystem's names (qweight, qzeros, scales, bias), so `state_dict()` keys are the
checkpoint keys, and there is no `weight`: the float weight exists only transiently, one layer at a time.

Training: `AWQMatmul` is frozen-weight autograd. Forward dequantizes and multiplies (torch unpack +
cuBLAS on GPUs, the same ops on CPU); backward returns grad_input = grad_out @ Wᵀ with W dequantized
again rather than saved, so activation memory stays that of a frozen nn.Linear, and gives no gradient to
the packed tensors. peft attaches LoRA through `quant.peft_support.register_awqlinear`.
"""

from __future__ import annotations

import torch
from torch import nn

from quant.formats.awq import PACK, encode, group_count
from quant.kernels import torch_awq


class AWQMatmul(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, qweight, qzeros, scales, group_size):
        ctx.save_for_backward(qweight, qzeros, scales)
        ctx.group_size = group_size
        return torch_awq.awq_matmul(x, qweight, qzeros, scales, group_size)

    @staticmethod
    def backward(ctx, grad_out):
        grad_x = None
        if ctx.needs_input_grad[0]:
            qweight, qzeros, scales = ctx.saved_tensors
            W = torch_awq.awq_dequantize(qweight, qzeros, scales, ctx.group_size, out_dtype=grad_out.dtype)
            grad_x = grad_out @ W.T
        return grad_x, None, None, None, None


class AWQLinear(nn.Module):
    """y = x @ dequant(W) + bias for a 4-bit AWQ gemm layer with `group_size` inputs per group."""

    def __init__(self, in_features: int, out_features: int, group_size: int, bias: bool = True, device=None,
                 scales_dtype=torch.float16):
        super().__init__()
        if out_features % PACK:
            raise ValueError(f"AWQ packs {PACK} outputs per word; out_features {out_features} is not a multiple")
        self.in_features, self.out_features = in_features, out_features
        self.bits, self.group_size = 4, group_size
        G = group_count(in_features, group_size)
        f = dict(device=device)
        self.register_buffer("qweight", torch.zeros(in_features, out_features // PACK, dtype=torch.int32, **f))
        self.register_buffer("qzeros", torch.zeros(G, out_features // PACK, dtype=torch.int32, **f))
        # fp16 is what we write and vLLM's awq kernel takes; GPTQModel also writes bf16 scales and bias.
        self.register_buffer("scales", torch.zeros(G, out_features, dtype=scales_dtype, **f))
        if bias:
            self.register_buffer("bias", torch.zeros(out_features, dtype=scales_dtype, **f))
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
    def from_codes(cls, q: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int,
                   bias: torch.Tensor | None = None) -> "AWQLinear":
        """From codes q [N, K], scales and integer zeros [N, G] (nn.Linear layout)."""
        N, K = q.shape
        layer = cls(K, N, group_size, bias=bias is not None, device=q.device)
        for name, t in encode(q, scales, zeros).items():
            getattr(layer, name).copy_(t)
        if bias is not None:
            layer.bias.copy_(bias.detach().to(torch.float16))
        return layer

    def dequantize(self, dtype=torch.float32) -> torch.Tensor:
        """The float weight in nn.Linear layout [out_features, in_features]."""
        return torch_awq.awq_dequantize(self.qweight, self.qzeros, self.scales, self.group_size, out_dtype=dtype).T

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"AWQLinear expects last dim {self.in_features}, got {tuple(x.shape)}")
        y = AWQMatmul.apply(x, self.qweight, self.qzeros, self.scales, self.group_size)
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits=4, "
                f"group_size={self.group_size}, format=awq-gemm, bias={self.bias is not None}")
