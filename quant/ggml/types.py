"""The tensor types a GGUF file from us can hold, and the one function that turns a float tensor into their bytes.

A ggml tensor is stored row by row (a row: the last dimension, e.g. one output neuron's in_features weights),
each row as whole blocks; so a type fits a tensor only when its block size divides the row length.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from gguf import GGMLQuantizationType as G

from quant.ggml import kquants, legacy
from quant.ggml.legacy import BlockFormat


@dataclass(frozen=True)
class TensorType:
    ggml: G
    block: int
    nbytes: int  # bytes per block
    fmt: BlockFormat | None = None  # None: a float type, stored value by value

    @property
    def name(self) -> str:
        return self.ggml.name

    def fits(self, row: int) -> bool:
        return row % self.block == 0

    def row_bytes(self, row: int) -> int:
        return row // self.block * self.nbytes


_FLOATS = {G.F32: torch.float32, G.F16: torch.float16, G.BF16: torch.bfloat16}
TYPES: dict[G, TensorType] = {
    G.F32: TensorType(G.F32, 1, 4), G.F16: TensorType(G.F16, 1, 2), G.BF16: TensorType(G.BF16, 1, 2),
    **{G[f.name]: TensorType(G[f.name], f.block, f.nbytes, f) for f in
       (legacy.Q8_0, legacy.Q4_0, legacy.Q4_1, legacy.Q5_0, legacy.Q5_1, kquants.Q4_K, kquants.Q5_K, kquants.Q6_K)},
}


def tensor_type(ggml: G) -> TensorType:
    return TYPES[ggml]


def _check_scales(fields: dict[str, torch.Tensor]) -> None:
    for key in ("d", "dmin", "m"):
        if key in fields and not torch.isfinite(fields[key].to(torch.float16)).all():
            raise ValueError(f"a block scale overflows fp16 (|{key}| > 65504): the weights are too large for ggml")


def quantize_blocks(x: torch.Tensor, ttype: TensorType, qw: torch.Tensor | None = None,
                    sigma2: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Quantize B blocks x [B, block] into the type's fields (scales, codes).

    `qw` [B, block]: importance per value (None: ggml's reference quantizer); `sigma2` [B]: the mean square of
    each block's row, which the legacy types' importance weighting uses (default: the block's own).
    """
    if ttype.fmt is None:
        raise ValueError(f"{ttype.name} is not a block type")
    x = x.float()
    if sigma2 is None:
        sigma2 = x.pow(2).mean(-1)
    fields = ttype.fmt.quantize(x, qw, sigma2)
    _check_scales(fields)
    return fields


def encode_blocks(x: torch.Tensor, ttype: TensorType, qw: torch.Tensor | None = None,
                  sigma2: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(bytes uint8 [B, nbytes], the float values those bytes mean) of `quantize_blocks`."""
    fields = quantize_blocks(x, ttype, qw, sigma2)
    return ttype.fmt.pack(fields), ttype.fmt.decode(fields)


def encode(x: torch.Tensor, ttype: TensorType, importance: torch.Tensor | None = None, device=None,
           chunk_elems: int = 1 << 18) -> np.ndarray:
    """A float tensor (rows = last dimension) as the bytes of `ttype`: uint8 [n_rows, row_bytes].

    `importance` [row]: per-column weight for the scale search (activation energy); ignored by float types and
    Q8_0, as in ggml. Rows are processed `chunk_elems` values at a time, on `device` (default: x's device): small
    chunks keep the search's temporaries in cache, several times faster on a CPU than whole-tensor passes.
    """
    if not torch.isfinite(x).all():
        raise ValueError("the tensor holds NaN or Inf values")
    row = x.shape[-1]
    x2 = x.reshape(-1, row)
    if ttype.fmt is None:
        data = x2.to(_FLOATS[ttype.ggml]).contiguous()
        if data.dtype == torch.bfloat16:
            data = data.view(torch.int16)
        return data.cpu().numpy().view(np.uint8)
    if not ttype.fits(row):
        raise ValueError(f"row length {row} is not a multiple of {ttype.name}'s block of {ttype.block}")
    device = torch.device(device) if device is not None else x.device
    per_row = row // ttype.block
    if importance is not None:
        if importance.numel() != row:
            raise ValueError(f"importance has {importance.numel()} values for rows of {row}")
        imp = importance.to(device=device, dtype=torch.float32).reshape(1, per_row, ttype.block)
    out = np.empty((x2.shape[0], ttype.row_bytes(row)), dtype=np.uint8)
    step = max(1, chunk_elems // row)
    for r0 in range(0, x2.shape[0], step):
        xc = x2[r0 : r0 + step].to(device=device, dtype=torch.float32)
        n = xc.shape[0]
        blocks = xc.reshape(-1, ttype.block)
        sigma2 = xc.pow(2).mean(-1).repeat_interleave(per_row)
        qw = imp.expand(n, per_row, ttype.block).reshape(-1, ttype.block) if importance is not None else None
        data = ttype.fmt.pack(quantize_blocks(blocks, ttype, qw, sigma2))
        out[r0 : r0 + n] = data.reshape(n, -1).cpu().numpy()
    return out
