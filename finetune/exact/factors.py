"""A saved zero-point adapter (finetune.exact.lora) read against the base checkpoint it was trained on.

The merge sees each adapted module as `ZeroPointFactors`: the same interface as a plain adapter's factors (the
shape of the weight it adapts, a dense delta in nn.Linear layout) so that every general path (adapter/base checks,
the requantizing merge into another format, generation) takes it unchanged, plus the new zero points and their
packed `qzeros`, which the exact merge writes into the base's own format.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from finetune.exact.grid import ZeroGrid, awq_grid, dense_delta, group_update, gptq_grid, lora_update, shift_zeros
from quant.awq.pack import layer_group_size, pack as awq_pack, read_quant_config as awq_config
from quant.errors import UserError
from quant.formats.base import BaseSpec
from quant.gptq.pack import encode_zeros, read_quant_config as gptq_config
from quant.tensorfiles import Checkpoint


@dataclass
class ZeroPointFactors:
    """One adapted packed layer: LoRA factors A [r, G] and B [N, r] with their scale, and the layer's grid."""

    A: torch.Tensor
    B: torch.Tensor
    scale: float
    grid: ZeroGrid
    encode: Callable[[torch.Tensor], torch.Tensor]  # integer zero points [G, N] -> the checkpoint's qzeros

    @property
    def shape(self) -> tuple[int, int]:
        return self.grid.out_features, self.grid.in_features

    @torch.no_grad()
    def zeros(self) -> torch.Tensor:
        """The zero points [G, N] training computed with (integers, as fp32)."""
        return shift_zeros(lora_update(self.A, self.B, self.scale), self.grid)

    def qzeros(self) -> torch.Tensor:
        return self.encode(self.zeros())

    @torch.no_grad()
    def delta(self, device=None) -> torch.Tensor:
        """The dense weight delta [N, K] the new zero points make: s · (z - z') over each group's inputs."""
        grid = self.grid.to(device) if device is not None else self.grid
        return dense_delta(group_update(lora_update(self.A, self.B, self.scale).to(grid.scales.device), grid), grid)


def _gptq(ckpt: Checkpoint, module: str):
    q = gptq_config(ckpt.path)
    fmt = q["checkpoint_format"]
    offset = 1 if fmt == "gptq" else 0
    grid = gptq_grid(ckpt.get(f"{module}.qzeros"), ckpt.get(f"{module}.scales"), ckpt.get(f"{module}.g_idx"),
                     q["bits"], offset)
    return grid, lambda z: encode_zeros(z.round().to(torch.int64), q["bits"], fmt)


def _awq(ckpt: Checkpoint, module: str):
    q = awq_config(ckpt.path)
    scales = ckpt.get(f"{module}.scales")
    K = ckpt.shape(f"{module}.qweight")[0]
    group = layer_group_size(K, scales.shape[0], q["group_size"], f"{ckpt.path}: {module}")
    return awq_grid(ckpt.get(f"{module}.qzeros"), scales, K, group), lambda z: awq_pack(z.round().to(torch.int64))


READERS = {"gptq": _gptq, "awq": _awq}


def zero_point_factors(loras: dict, base: BaseSpec, adapter_dir) -> dict[str, ZeroPointFactors]:
    """The plain factors read from a zero-point adapter (lora_A [r, G]) joined with the grid of each adapted
    layer in the base checkpoint; a layer the base does not pack, or whose group count differs, is refused."""
    read = READERS.get(base.format)
    if read is None:
        raise UserError(f"{adapter_dir}: trained for an exact merge, but its base.json names a {base.format} base; "
                        f"zero-point adapters are trained on {' or '.join(READERS)} bases")
    ckpt = Checkpoint(base.model_dir)
    out = {}
    for module, f in loras.items():
        if f"{module}.qzeros" not in ckpt.file_of:
            raise UserError(f"adapter/base mismatch: {module} is not a packed {base.format} layer in {ckpt.path}; "
                            "is --base the model the adapter was trained on?")
        grid, encode = read(ckpt, module)
        if f.A.shape[1] != grid.groups or f.B.shape[0] != grid.out_features:
            raise UserError(f"adapter/base mismatch: {module}: lora_A {tuple(f.A.shape)} / lora_B {tuple(f.B.shape)} "
                            f"do not fit the base's {grid.groups} groups x {grid.out_features} outputs; is --base "
                            "the model the adapter was trained on?")
        out[module] = ZeroPointFactors(f.A, f.B, f.scale, grid, encode)
    return out
