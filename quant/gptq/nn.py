"""`GPTQLinear`: a packed layer (quant.packed.PackedLinear) that runs a GPTQ layer straight from its checkpoint
tensors qweight, qzeros, scales, g_idx (docs/quantized-formats.md A1), with the Triton kernels on CUDA and the torch
reference elsewhere (`quant.gptq.kernels`). `QuantLinear` is the same class under its earlier name.

LoRA from peft wraps it through the registry (`quant.peft_support`: peft's own GPTQ LoRA layer, registered as a
custom module).
"""

from __future__ import annotations

import torch

from quant.gptq.kernels import KERNELS, kernels_for
from quant.gptq.pack import V1, encode_zeros, pack_rows, packed_len, zero_offset
from quant.gptq.solver import QuantResult, group_count
from quant.packed import PackedLinear


class GPTQLinear(PackedLinear):
    """y = x @ dequant(W) + bias for a GPTQ-packed layer of `bits` with `group_size` (-1: one group)."""

    PACKED = ("qweight", "qzeros", "scales", "g_idx")

    def __init__(self, in_features: int, out_features: int, bits: int, group_size: int, bias: bool = True,
                 checkpoint_format: str = V1, device=None, kernel: str = "auto"):
        super().__init__(in_features, out_features, bits, group_size)
        self.checkpoint_format = self.layout = checkpoint_format
        self.zero_offset = zero_offset(checkpoint_format)
        if kernel not in KERNELS:
            raise ValueError(f"kernel must be one of {KERNELS}")
        self.kernel = kernel
        G = group_count(in_features, group_size)
        self._buffer("qweight", (packed_len(in_features, bits), out_features), torch.int32, device)
        self._buffer("qzeros", (G, packed_len(out_features, bits)), torch.int32, device)
        self._buffer("scales", (G, out_features), torch.float16, device)
        self._buffer("g_idx", (in_features,), torch.int32, device)
        self._bias(bias, torch.float16, device)

    @classmethod
    def from_result(cls, result: QuantResult, bias: torch.Tensor | None = None, checkpoint_format: str = V1,
                    kernel: str = "auto") -> "GPTQLinear":
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

    def weight_kn(self, dtype, qweight, qzeros, scales, g_idx):
        k = kernels_for(scales, self.kernel)
        return k.gptq_dequantize(qweight, qzeros, scales, g_idx, self.bits, self.zero_offset, out_dtype=dtype)

    def matmul(self, x, qweight, qzeros, scales, g_idx):
        k = kernels_for(x, self.kernel)
        return k.gptq_matmul(x, qweight, qzeros, scales, g_idx, self.bits, self.zero_offset)


QuantLinear = GPTQLinear  # the name before GPTQ and AWQ shared one packed-layer base
