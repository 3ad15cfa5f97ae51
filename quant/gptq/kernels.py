"""GPTQ matmul kernels: the plain-PyTorch reference (the CPU path, and what the Triton kernels of
`quant.gptq.triton_kernels` are tested against) and the choice between the two.

Both take the checkpoint tensors as stored (docs/quantized-formats.md A1/A5):
qweight int32 [K·b/32, N], qzeros int32 [G, N·b/32], scales fp16 [G, N], g_idx int32 [K].
"""

from __future__ import annotations

import importlib.util
import sys

import torch

from quant.gptq.pack import unpack_cols, unpack_rows

KERNELS = ("auto", "torch", "triton")


def gptq_dequantize(qweight, qzeros, scales, g_idx, bits: int, zero_offset: int, out_dtype=torch.float32):
    """The float weight W [K, N] (y = x @ W). Computed in fp32 and rounded once to out_dtype."""
    K, N = g_idx.shape[0], scales.shape[1]
    q = unpack_rows(qweight, bits, K)
    z = unpack_cols(qzeros, bits, N) + zero_offset
    g = g_idx.long()
    W = (q - z[g]).float().mul_(scales.float()[g])
    return W.to(out_dtype)


def gptq_matmul(x: torch.Tensor, qweight, qzeros, scales, g_idx, bits: int, zero_offset: int) -> torch.Tensor:
    """x [..., K] @ W -> [..., N] in x.dtype, without bias."""
    W = gptq_dequantize(qweight, qzeros, scales, g_idx, bits, zero_offset, out_dtype=x.dtype)
    return x @ W


def dequantize_layer(parts: dict[str, torch.Tensor], bits: int, zero_offset: int) -> torch.Tensor:
    """nn.Linear-layout fp32 weight [out, in] of one layer from its qweight / qzeros / scales / g_idx (as stored)."""
    return gptq_dequantize(parts["qweight"], parts["qzeros"], parts["scales"], parts["g_idx"], bits, zero_offset,
                           out_dtype=torch.float32).T.contiguous()


def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def kernels_for(t: torch.Tensor, choice: str):
    """The module whose gptq_matmul / gptq_dequantize run for tensors like `t`: 'auto' takes the Triton kernels on
    CUDA when Triton is installed, else this one; 'triton' always takes them (on CPU with TRITON_INTERPRET=1, as the
    tests do). Triton is optional, so its module is imported only here."""
    if choice == "torch" or (choice == "auto" and (t.device.type != "cuda" or not triton_available())):
        return sys.modules[__name__]
    from quant.gptq import triton_kernels

    return triton_kernels

