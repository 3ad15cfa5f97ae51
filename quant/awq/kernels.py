"""Plain-PyTorch AWQ kernels: the CPU path, the GPU path (unpack with torch ops, then cuBLAS), and the
reference any faster kernel is tested against.

They take the checkpoint tensors as stored (docs/awq-format.md): qweight int32 [K, N/8], qzeros int32
[G, N/8], scales fp16 [G, N]; row k of the weight belongs to group k // group_size.
"""

from __future__ import annotations

import torch

from quant.awq.pack import unpack


def awq_dequantize(qweight, qzeros, scales, group_size: int, out_dtype=torch.float32) -> torch.Tensor:
    """The float weight W [K, N] (y = x @ W), computed in fp32 and rounded once to out_dtype."""
    K = qweight.shape[0]
    q = unpack(qweight)
    z = unpack(qzeros)
    # Expand per-group rows to per-input rows; the last group may be partial (G = ceil(K / group_size)).
    z = z.repeat_interleave(group_size, dim=0)[:K]
    s = scales.float().repeat_interleave(group_size, dim=0)[:K]
    return (q - z).float().mul_(s).to(out_dtype)


def dequantize_layer(parts: dict[str, torch.Tensor], group_size: int, dtype=torch.float32) -> torch.Tensor:
    """nn.Linear-layout weight [out, in] of one layer from its qweight / qzeros / scales (as stored)."""
    return awq_dequantize(parts["qweight"], parts["qzeros"], parts["scales"], group_size, out_dtype=dtype).T.contiguous()
