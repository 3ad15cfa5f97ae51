"""A saved exact-merge adapter (finetune.exact.lora) read against the base checkpoint it was trained on.

The merge sees each adapted module as `ZeroPointFactors` (route 1) or `CodeFactors` (route 2): the same interface
as a plain adapter's factors (the shape of the weight it adapts, a dense delta in nn.Linear layout) so that every
general path (adapter/base checks, the requantizing merge into another format, generation) takes it unchanged,
plus `packed()`: the checkpoint tensors the exact merge replaces in the base's own format (`qzeros`, or
`qweight`), computed by the code training computed with.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from finetune.exact.grid import (CodeGrid, ZeroGrid, awq_grid, code_grid, code_update, dense_delta, gptq_grid,
                                 group_update, lora_update, shift_codes, shift_zeros)
from finetune.exact.target import route
from quant.awq.pack import layer_group_size, pack as awq_pack, read_quant_config as awq_config
from quant.errors import UserError
from quant.formats.base import BaseSpec
from quant.gptq.pack import encode_zeros, pack_rows, read_quant_config as gptq_config
from quant.tensorfiles import Checkpoint


@dataclass
class _Factors:
    """One adapted packed layer: LoRA factors A and B [N, r] with their scale, and the layer's grid."""

    A: torch.Tensor
    B: torch.Tensor
    scale: float
    grid: ZeroGrid | CodeGrid

    @property
    def shape(self) -> tuple[int, int]:
        """The (out, in) of the weight it adapts."""
        return self.grid.out_features, self.grid.in_features


@dataclass
class ZeroPointFactors(_Factors):
    """Route 1: A [r, G] acts on the group sums; the update moves zero points."""

    encode: Callable[[torch.Tensor], torch.Tensor]  # integer zero points [G, N] -> the checkpoint's qzeros

    @torch.no_grad()
    def zeros(self) -> torch.Tensor:
        """The zero points [G, N] training computed with (integers, as fp32)."""
        return shift_zeros(lora_update(self.A, self.B, self.scale), self.grid)

    def packed(self) -> dict[str, torch.Tensor]:
        return {"qzeros": self.encode(self.zeros())}

    def moved(self) -> tuple[int, int]:
        """(zero points the adapter moved, zero points of the layer)."""
        return int((self.zeros() != self.grid.zeros).sum()), self.grid.zeros.numel()

    @torch.no_grad()
    def delta(self, device=None) -> torch.Tensor:
        """The dense weight delta [N, K] the new zero points make: s · (z - z') over each group's inputs."""
        grid = self.grid.to(device) if device is not None else self.grid
        return dense_delta(group_update(lora_update(self.A, self.B, self.scale).to(grid.scales.device), grid), grid)


@dataclass
class CodeFactors(_Factors):
    """Route 2 (symmetric GPTQ): plain A [r, K]; the update moves codes."""

    bits: int

    @torch.no_grad()
    def codes(self) -> torch.Tensor:
        """The codes [N, K] training computed with."""
        return shift_codes(lora_update(self.A, self.B, self.scale), self.grid)

    def packed(self) -> dict[str, torch.Tensor]:
        return {"qweight": pack_rows(self.codes().T.to(torch.int64), self.bits)}

    def moved(self) -> tuple[int, int]:
        return int((self.codes() != self.grid.codes.float()).sum()), self.grid.codes.numel()

    @torch.no_grad()
    def delta(self, device=None) -> torch.Tensor:
        return code_update(lora_update(self.A, self.B, self.scale), self.grid).to(device)


def _gptq(ckpt: Checkpoint, module: str, f):
    q = gptq_config(ckpt.path)
    if route("gptq", q["raw"]) == "codes":
        grid = code_grid(ckpt.get(f"{module}.qweight"), ckpt.get(f"{module}.scales"), ckpt.get(f"{module}.g_idx"),
                         q["bits"])
        _check_shapes(module, f, grid.in_features, grid.out_features)
        return CodeFactors(f.A, f.B, f.scale, grid, q["bits"])
    fmt = q["checkpoint_format"]
    grid = gptq_grid(ckpt.get(f"{module}.qzeros"), ckpt.get(f"{module}.scales"), ckpt.get(f"{module}.g_idx"),
                     q["bits"], fmt)
    _check_shapes(module, f, grid.groups, grid.out_features)
    return ZeroPointFactors(f.A, f.B, f.scale, grid, lambda z: encode_zeros(z.round().to(torch.int64), q["bits"], fmt))


def _awq(ckpt: Checkpoint, module: str, f):
    q = awq_config(ckpt.path)
    scales = ckpt.get(f"{module}.scales")
    K = ckpt.shape(f"{module}.qweight")[0]
    group = layer_group_size(K, scales.shape[0], q["group_size"], f"{ckpt.path}: {module}")
    grid = awq_grid(ckpt.get(f"{module}.qzeros"), scales, K, group)
    _check_shapes(module, f, grid.groups, grid.out_features)
    return ZeroPointFactors(f.A, f.B, f.scale, grid, lambda z: awq_pack(z.round().to(torch.int64)))


def _check_shapes(module: str, f, inputs: int, outputs: int) -> None:
    """lora_A acts on `inputs` (the groups of route 1, the layer's inputs of route 2), lora_B makes `outputs`."""
    if f.A.shape[1] != inputs or f.B.shape[0] != outputs:
        raise UserError(f"adapter/base mismatch: {module}: lora_A {tuple(f.A.shape)} / lora_B {tuple(f.B.shape)} "
                        f"do not fit the base's {inputs} adapter inputs x {outputs} outputs; is --base the model "
                        "the adapter was trained on?")


READERS = {"gptq": _gptq, "awq": _awq}


def exact_factors(loras: dict, base: BaseSpec, adapter_dir) -> dict:
    """The plain factors read from an exact-merge adapter joined with the grid of each adapted layer in the base
    checkpoint; a layer the base does not pack, or whose shape differs, is refused."""
    read = READERS.get(base.format)
    if read is None:
        raise UserError(f"{adapter_dir}: trained for an exact merge, but its base.json names a {base.format} base; "
                        f"exact-merge adapters are trained on {' or '.join(READERS)} bases")
    ckpt = Checkpoint(base.model_dir)
    out = {}
    for module, f in loras.items():
        if f"{module}.qzeros" not in ckpt.file_of:
            raise UserError(f"adapter/base mismatch: {module} is not a packed {base.format} layer in {ckpt.path}; "
                            "is --base the model the adapter was trained on?")
        out[module] = read(ckpt, module, f)
    return out
