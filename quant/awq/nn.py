"""`AWQLinear`: a packed layer (quant.packed.PackedLinear) that runs an AWQ "gemm" layer straight from its
checkpoint tensors qweight, qzeros, scales (docs/awq-format.md): forward dequantizes and multiplies (torch unpack +
cuBLAS on GPUs, the same ops on CPU), except for up to quant.packed.GEMV_MAX_ROWS rows on a GPU (decode; 0 = off
until timed), which the Triton matrix-vector kernel of quant.awq.triton_kernels computes straight from the packed
words. peft attaches LoRA through the registry (`quant.peft_support`).
"""

from __future__ import annotations

import importlib.util

import torch

from quant.awq.kernels import awq_dequantize
from quant.awq.pack import BITS, PACK, VERSION, encode, group_count
from quant import packed
from quant.packed import PackedLinear, gemv_block_k

_TRITON = importlib.util.find_spec("triton") is not None


class AWQLinear(PackedLinear):
    """y = x @ dequant(W) + bias for a 4-bit AWQ gemm layer with `group_size` inputs per group."""

    PACKED = ("qweight", "qzeros", "scales")
    layout = f"awq-{VERSION}"

    def __init__(self, in_features: int, out_features: int, group_size: int, bias: bool = True, device=None,
                 scales_dtype=torch.float16):
        if out_features % PACK:
            raise ValueError(f"AWQ packs {PACK} outputs per word; out_features {out_features} is not a multiple")
        super().__init__(in_features, out_features, BITS, group_size)
        G = group_count(in_features, group_size)
        self._buffer("qweight", (in_features, out_features // PACK), torch.int32, device)
        self._buffer("qzeros", (G, out_features // PACK), torch.int32, device)
        # fp16 is what we write and vLLM's awq kernel takes; GPTQModel also writes bf16 scales and bias.
        self._buffer("scales", (G, out_features), scales_dtype, device)
        self._bias(bias, scales_dtype, device)

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

    def weight_kn(self, dtype, qweight, qzeros, scales):
        return awq_dequantize(qweight, qzeros, scales, self.group_size, out_dtype=dtype)

    def matmul(self, x, qweight, qzeros, scales):
        # The kernel applies a group's scale once per block of rows: it needs blocks that lie in one group.
        if (x.is_cuda and _TRITON and 0 < x.numel() <= packed.GEMV_MAX_ROWS * x.shape[-1]
                and gemv_block_k(self.group_size, self.in_features, 8)):
            from quant.awq import triton_kernels  # Triton is optional: imported only where it runs

            return triton_kernels.awq_gemv(x, qweight, qzeros, scales, self.group_size)
        return super().matmul(x, qweight, qzeros, scales)
