"""Plain-PyTorch GPTQ kernels: the reference the Triton kernels are tested against, and the CPU path.

Both functions take the checkpoint tensors as stored (doc A1/A5):
qweight int32 [K·b/32, N], qzeros int32 [G, N·b/32], scales fp16 [G, N], g_idx int32 [K].
"""

from __future__ import annotations

import torch

from quant.formats.gptq_pack import unpack_cols, unpack_rows


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
