"""The grids of packed layers (GPTQ, AWQ) and the functions that move them, shared by training and the merge.

Route 1, zero points:

A packed layer computes W[n, k] = (q[k, n] - z[g, n]) · s[g, n] with g = g_idx[k] (GPTQ, act-order groups) or
k // group_size (AWQ). An update c[n, g] that is the same for every input of group g changes W by c wherever
z' = z - c / s is an integer the checkpoint can store. `shift_zeros` makes it one: it rounds c / s to whole
grid steps and clamps z' to the storable range, in training (with a straight-through gradient, so the adapter
learns the real-valued update the rounding follows) and in the merge (without gradient), with the same code on the
same fp32 numbers, so the merged checkpoint holds exactly the zero points training computed with.

Route 2, codes (a symmetric GPTQ grid, whose zero points readers fix): `shift_codes` is the merge's requantization
of W + delta onto the base's own grid, nearest code with the same scales and zero points; training computes with
it (straight-through), the merge writes it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from quant.awq.nn import AWQLinear
from quant.awq.pack import unpack as awq_unpack
from quant.gptq.nn import GPTQLinear
from quant.gptq.pack import decode_zeros, unpack_rows, zero_offset

LAYERS = (GPTQLinear, AWQLinear)  # the packed layers whose zero points can carry an update


class _Shape:
    """What a grid says of its layer's shape (its `scales` [G, N] and `g_idx` [K])."""

    scales: torch.Tensor
    g_idx: torch.Tensor

    @property
    def in_features(self) -> int:
        return self.g_idx.shape[0]

    @property
    def out_features(self) -> int:
        return self.scales.shape[1]


@dataclass
class ZeroGrid(_Shape):
    """One packed layer's group structure and zero points, in fp32, transposed to [G, N] like the checkpoint."""

    zeros: torch.Tensor  # [G, N] the integer zero points as readers decode them
    scales: torch.Tensor  # [G, N]
    g_idx: torch.Tensor  # [K] long: the group of each input
    lo: torch.Tensor  # [G, N] the smallest storable zero point (or the base's own, where it is below)
    hi: torch.Tensor  # [G, N] the largest
    run: int | None = None  # the group size when groups are equal runs in input order (no act-order), else None

    @property
    def groups(self) -> int:
        return self.scales.shape[0]

    def to(self, device) -> "ZeroGrid":
        return ZeroGrid(*(t.to(device) for t in (self.zeros, self.scales, self.g_idx, self.lo, self.hi)), self.run)


def _run(g_idx: torch.Tensor, groups: int) -> int | None:
    K = g_idx.shape[0]
    if K % groups:
        return None
    size = K // groups
    return size if torch.equal(g_idx, torch.arange(K, device=g_idx.device) // size) else None


def storable_range(zeros: torch.Tensor, bits: int, offset: int) -> tuple[torch.Tensor, torch.Tensor]:
    """[lo, hi] per zero point: the fields are `bits` wide and readers add `offset` (GPTQ v1 stores z - 1,
    docs/quantized-formats.md A3), and a v1 field 2^b - 1 (z = 2^b) is never written (quant.gptq.pack). A base
    zero point outside that range stays reachable (z' = z is always allowed: the update of zero is exact)."""
    lo = torch.full_like(zeros, float(offset)).minimum(zeros)
    hi = torch.full_like(zeros, float(2**bits - 1)).maximum(zeros)
    return lo, hi


def gptq_grid(qzeros, scales, g_idx, bits: int, checkpoint_format: str) -> ZeroGrid:
    zeros = decode_zeros(qzeros, bits, checkpoint_format, scales.shape[1]).float()
    g_idx = g_idx.long()
    return ZeroGrid(zeros, scales.float(), g_idx, *storable_range(zeros, bits, zero_offset(checkpoint_format)),
                    _run(g_idx, scales.shape[0]))


def awq_grid(qzeros, scales, in_features: int, group_size: int) -> ZeroGrid:
    zeros = awq_unpack(qzeros).float()
    g_idx = torch.arange(in_features, device=scales.device) // group_size
    return ZeroGrid(zeros, scales.float(), g_idx, *storable_range(zeros, 4, 0), _run(g_idx, scales.shape[0]))


def grid_of(layer: torch.nn.Module) -> ZeroGrid:
    """The grid of a loaded packed layer."""
    if isinstance(layer, GPTQLinear):
        return gptq_grid(layer.qzeros, layer.scales, layer.g_idx, layer.bits, layer.checkpoint_format)
    if isinstance(layer, AWQLinear):
        return awq_grid(layer.qzeros, layer.scales, layer.in_features, layer.group_size)
    raise TypeError(f"{type(layer).__name__} has no zero points to carry an update")


def shift_zeros(c: torch.Tensor, grid: ZeroGrid) -> torch.Tensor:
    """z' [G, N] for the update c [N, G] (in weight units): clamp(round(z - c / s), lo, hi).

    Forward is the integer zero point the merge writes; the gradient is that of the unrounded z - c / s inside
    [lo, hi] and zero where the clamp holds (the rounding is a straight-through estimator)."""
    t = (grid.zeros - c.T.float() / grid.scales).clamp(grid.lo, grid.hi)
    return t + (torch.round(t) - t).detach()


def group_update(c: torch.Tensor, grid: ZeroGrid) -> torch.Tensor:
    """What the shifted zero points add to each group's weights: D [N, G] = s · (z - z'), a whole number of grid
    steps per (row, group); its gradient with respect to c is 1 where the zero point is not clamped."""
    return (grid.scales * (grid.zeros - shift_zeros(c, grid))).T


def group_sums(x: torch.Tensor, grid: ZeroGrid) -> torch.Tensor:
    """x [..., K] summed over the inputs of each group -> [..., G] (a reshape-sum without act-order)."""
    if grid.run is not None:
        return x.unflatten(-1, (grid.groups, grid.run)).sum(-1)
    out = x.new_zeros(*x.shape[:-1], grid.groups)
    return out.index_add(-1, grid.g_idx, x)


def dense_delta(D: torch.Tensor, grid: ZeroGrid) -> torch.Tensor:
    """The group update D [N, G] as a dense weight delta [N, K] (what a merge into another format adds)."""
    return D[:, grid.g_idx]


# ------------------------------------------------------------------------------------------ the codes (route 2)


@dataclass
class CodeGrid(_Shape):
    """A symmetric GPTQ layer's codes and grid: readers fix its zero points, so an update can only move codes."""

    codes: torch.Tensor  # [N, K] uint8, nn.Linear layout
    scales: torch.Tensor  # [G, N]
    g_idx: torch.Tensor  # [K] long
    maxq: int  # 2^bits - 1


def code_grid(qweight, scales, g_idx, bits: int) -> CodeGrid:
    codes = unpack_rows(qweight, bits, g_idx.shape[0]).T.contiguous().to(torch.uint8)
    return CodeGrid(codes, scales.float(), g_idx.long(), 2**bits - 1)


def shift_codes(delta: torch.Tensor, grid: CodeGrid) -> torch.Tensor:
    """q' [N, K] for a dense update delta [N, K]: the merge's requantization of W + delta on the base's own grid
    (same scales and zero points, nearest code), clamp(round(q + delta / s), 0, 2^b - 1); forward is the code the
    merge writes, the gradient is straight through the rounding and zero where the clamp holds."""
    s = grid.scales[grid.g_idx].T
    t = (grid.codes.float() + delta.float() / s).clamp(0, grid.maxq)
    return t + (torch.round(t) - t).detach()


def code_update(delta: torch.Tensor, grid: CodeGrid) -> torch.Tensor:
    """What the requantized codes add to the weights: s · (q' - q) [N, K]."""
    return grid.scales[grid.g_idx].T * (shift_codes(delta, grid) - grid.codes.float())


def lora_update(A: torch.Tensor, B: torch.Tensor, scale: float) -> torch.Tensor:
    """c = scale · B @ A in fp32 [N, G]: the adapter's per-group update, computed by training and merge alike."""
    return (B.float() @ A.float()) * scale
