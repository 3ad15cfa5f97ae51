"""The peft LoRA layer that trains a zero-point update on a packed GPTQ/AWQ layer (finetune.exact, route 1).

peft's GPTQ LoRA layer (which calls the packed base layer and adds the LoRA path) with a LoRA variant of its own:
lora_A is [r, G], acting on the input summed per quantization group, so the update c = scale · B @ A [N, G] is
constant within each (row, group) and lands on the weights as whole steps of the group's zero point
(`grid.group_update`). The layer computes

    y = base(x) + group_sums(x) @ D^T,   D = s · (z - z'),   z' = clamp(round(z - c / s), lo, hi)

which is x @ dequant(q, z', s) up to float rounding order: what the merged checkpoint computes.

The fused LoRA kernels (finetune.kernels) do not take LoRA variants, so these layers run as this module and the
fast-path report names them ("a LoRA variant (ZeroPointVariant) is active").
"""

from __future__ import annotations

import math

import torch
from peft.tuners.lora.gptq import GPTQLoraLinear
from peft.tuners.lora.layer import LoraVariant
from torch import nn

from finetune.exact.grid import LAYERS, ZeroGrid, grid_of, group_sums, group_update, lora_update


def _grid(module) -> ZeroGrid:
    """The base layer's grid, decoded once per device (its buffers are frozen)."""
    base = module.get_base_layer()
    grid = getattr(module, "_zero_grid", None)
    if grid is None or grid.scales.device != base.scales.device:
        with torch.no_grad():
            grid = grid_of(base)
        module._zero_grid = grid
    return grid


class ZeroPointVariant(LoraVariant):
    """QA-LoRA whose update is rounded to whole zero-point steps (straight-through), so the merge is exact."""

    def supports_lora_conversion(self) -> bool:
        return False

    @staticmethod
    def init(module, adapter_name: str, **kwargs) -> None:
        old = module.lora_A[adapter_name]
        groups = _grid(module).groups
        A = nn.Linear(groups, old.out_features, bias=False, device=old.weight.device, dtype=old.weight.dtype)
        nn.init.kaiming_uniform_(A.weight, a=math.sqrt(5))  # peft's default init, over the G group sums
        module.lora_A[adapter_name] = A

    @staticmethod
    def _refuse(*args, **kwargs):
        raise NotImplementedError("a zero-point adapter merges with `finetune merge`, which writes the new zero "
                                  "points into the checkpoint")

    merge_safe = merge_unsafe = unmerge = _refuse

    @staticmethod
    def forward(module, active_adapter: str, x: torch.Tensor, result: torch.Tensor, **kwargs) -> torch.Tensor:
        grid = _grid(module)
        dropout = module.lora_dropout[active_adapter]
        A, B = module.lora_A[active_adapter].weight, module.lora_B[active_adapter].weight
        with torch.autocast(x.device.type, enabled=False):  # the zero points are rounded from fp32 numbers
            D = group_update(lora_update(A, B, module.scaling[active_adapter]), grid)  # [N, G]
            sums = group_sums(dropout(x).float(), grid)
            return result + (sums @ D.T).to(result.dtype)


class ZeroPointLoraLinear(GPTQLoraLinear):
    """peft's LoRA layer for our packed layers, always with the zero-point variant."""

    def resolve_lora_variant(self, *, config, **kwargs):
        return ZeroPointVariant()


def register(lora_config):
    """Make `lora_config` (a peft LoraConfig) wrap the packed GPTQ/AWQ layers with zero-point LoRA layers."""
    lora_config._register_custom_module({t: ZeroPointLoraLinear for t in LAYERS})
    return lora_config
