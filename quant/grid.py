"""Uniform min-max quantization grids, one (scale, zero) pair per output row of a weight slice.

Conventions follow docs/quantized-formats.md (A3, A5, C): a real value w maps to the integer
q = clamp(round(w / scale) + zero, 0, 2^bits - 1) and back to scale * (q - zero).

Two deliberate choices, both invisible to readers of the checkpoint:
- Scales are rounded to fp16 *here*, because fp16 is what the checkpoint stores. GPTQ then feeds back
  the error of exactly the values a reader will reconstruct, and packing never has to re-round.
- Asymmetric zeros are kept >= 1, so the v1 format (which stores z - 1) never meets the z = 0 overflow
  (doc A3 "Hazard"). Only a group that is almost entirely >= 0 is affected; it loses one of its levels.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

VALID_BITS = (2, 3, 4, 8)
# fp16 cannot hold a smaller normal scale; a group whose whole range is below it is ~zero anyway.
_MIN_SCALE = torch.finfo(torch.float16).tiny


@dataclass(frozen=True)
class GridSpec:
    bits: int = 4
    sym: bool = True
    # > 0 turns on the clipping search and is the norm exponent of its error (GPTQModel's `mse`, 2.4 there).
    mse: float = 0.0
    max_shrink: float = 0.8
    grid_points: int = 100

    @property
    def maxq(self) -> int:
        return 2**self.bits - 1


def _params_from_range(xmin: torch.Tensor, xmax: torch.Tensor, spec: GridSpec):
    maxq = spec.maxq
    if spec.sym:
        scale = (xmax - xmin) / maxq
        zero = torch.full_like(scale, float((maxq + 1) // 2))
    else:
        scale = (xmax - xmin) / maxq
        scale = scale.clamp(min=_MIN_SCALE)
        zero = torch.round(-xmin / scale)
        # z = 0 would overflow v1 checkpoints: move the grid up by one level and stretch it to still reach xmax.
        low = zero < 1
        if low.any():
            zero = torch.where(low, torch.ones_like(zero), zero)
            scale = torch.where(low, (xmax / (maxq - 1)).clamp(min=_MIN_SCALE), scale)
    scale = scale.clamp(min=_MIN_SCALE).to(torch.float16).float()
    return scale, zero


def find_params(x: torch.Tensor, spec: GridSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, zero) per row of `x` [rows, cols]; scale is fp16-representable fp32, zero an integer-valued float."""
    x = x.float()
    xmin = x.min(dim=1).values.clamp(max=0)
    xmax = x.max(dim=1).values.clamp(min=0)
    if spec.sym:
        # Unlike AutoGPTQ we mirror the range for every row, also rows that are entirely >= 0: keeping
        # xmin = 0 there with the mid-grid zero would clip the top half of the row's values.
        xmax = torch.maximum(-xmin, xmax)
        xmin = -xmax
    both_zero = (xmin == 0) & (xmax == 0)
    xmin = torch.where(both_zero, torch.full_like(xmin, -1.0), xmin)
    xmax = torch.where(both_zero, torch.full_like(xmax, 1.0), xmax)
    scale, zero = _params_from_range(xmin, xmax, spec)
    if spec.mse > 0:
        scale, zero = _mse_search(x, xmin, xmax, scale, zero, spec)
    return scale, zero


def _mse_search(x, xmin, xmax, scale, zero, spec: GridSpec):
    """Shrink the range in 1% steps and keep, per row, the grid with the least sum |Q(x) - x|^mse."""
    best = torch.full_like(xmin, float("inf"))
    best_scale, best_zero = scale.clone(), zero.clone()
    steps = int(spec.max_shrink * spec.grid_points)
    for i in range(steps):
        p = 1 - i / spec.grid_points
        cand_scale, cand_zero = _params_from_range(p * xmin, p * xmax, spec)
        if spec.sym:
            cand_zero = zero  # the symmetric zero is fixed; only the scale moves
        q = fake_quantize(x, cand_scale.unsqueeze(1), cand_zero.unsqueeze(1), spec.maxq)
        err = (q - x).abs_().pow_(spec.mse).sum(dim=1)
        better = err < best
        if better.any():
            best = torch.where(better, err, best)
            best_scale = torch.where(better, cand_scale, best_scale)
            best_zero = torch.where(better, cand_zero, best_zero)
    return best_scale, best_zero


def quantize(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, maxq: int) -> torch.Tensor:
    """Integer codes (as float) for `x`; scale/zero broadcast against x."""
    return torch.clamp(torch.round(x / scale) + zero, 0, maxq)


def dequantize(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    return scale * (q - zero)


def fake_quantize(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, maxq: int) -> torch.Tensor:
    return dequantize(quantize(x, scale, zero, maxq), scale, zero)
