"""The peft LoRA layers that train an exactly mergeable update on a packed GPTQ/AWQ layer (finetune.exact).

Route 1, zero points (asymmetric GPTQ, AWQ):

peft's GPTQ LoRA layer (which calls the packed base layer and adds the LoRA path) with a LoRA variant of its own:
lora_A is [r, G], acting on the input summed per quantization group, so the update c = scale · B @ A [N, G] is
constant within each (row, group) and lands on the weights as whole steps of the group's zero point
(`grid.group_update`). The layer computes

    y = base(x) + group_sums(x) @ D^T,   D = s · (z - z'),   z' = clamp(round(z - c / s), lo, hi)

which is x @ dequant(q, z', s) up to float rounding order: what the merged checkpoint computes.

Route 2, codes (symmetric GPTQ, whose zero points readers fix): plain LoRA factors, but the layer computes with
the requantized weight the merge will write, nearest codes on the base's own grid (`grid.code_update`):

    y = base(x) + x @ D^T,   D = s · (q' - q),   q' = clamp(round(q + scale · B @ A / s), 0, 2^b - 1)

It costs a dense [N, K] update per layer and step (measured in scripts/tables/exact_merge_table.py).

The fused LoRA kernels (finetune.kernels) do not take LoRA variants, so these layers run as this module and the
fast-path report names them ("a LoRA variant (ZeroPointVariant) is active").
"""

from __future__ import annotations

import math

import torch
from peft.tuners.lora.gptq import GPTQLoraLinear
from peft.tuners.lora.layer import LoraVariant
from torch import nn

from finetune.exact.grid import (LAYERS, CodeGrid, ZeroGrid, code_grid, code_update, grid_of, group_sums,
                                 group_update, lora_update)


def _cached(module, name: str, build):
    """`build(base layer)`, kept on the LoRA layer per device (the base's buffers are frozen)."""
    base = module.get_base_layer()
    grid = getattr(module, name, None)
    if grid is None or grid.scales.device != base.scales.device:
        with torch.no_grad():
            grid = build(base)
        setattr(module, name, grid)
    return grid


def _grid(module) -> ZeroGrid:
    return _cached(module, "_zero_grid", grid_of)


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


def _codes(module) -> CodeGrid:
    """The base layer's codes (uint8: a quarter of the fp32 weight)."""
    return _cached(module, "_code_grid", lambda b: code_grid(b.qweight, b.scales, b.g_idx, b.bits))


class CodeVariant(LoraVariant):
    """LoRA trained through the merge's requantization onto the base's grid (straight-through), so the merge is
    exact where zero points cannot carry the update."""

    def supports_lora_conversion(self) -> bool:
        return False

    @staticmethod
    def init(module, adapter_name: str, **kwargs) -> None:
        _codes(module)

    merge_safe = merge_unsafe = unmerge = ZeroPointVariant._refuse

    @staticmethod
    def forward(module, active_adapter: str, x: torch.Tensor, result: torch.Tensor, **kwargs) -> torch.Tensor:
        dropout = module.lora_dropout[active_adapter]
        A, B = module.lora_A[active_adapter].weight, module.lora_B[active_adapter].weight
        with torch.autocast(x.device.type, enabled=False):
            D = code_update(lora_update(A, B, module.scaling[active_adapter]), _codes(module))  # [N, K]
            return result + (dropout(x).float() @ D.T).to(result.dtype)


class ZeroPointLoraLinear(GPTQLoraLinear):
    """peft's LoRA layer for our packed layers, always with the zero-point variant."""

    def resolve_lora_variant(self, *, config, **kwargs):
        return ZeroPointVariant()


class CodeLoraLinear(GPTQLoraLinear):
    """peft's LoRA layer for symmetric GPTQ layers, always with the code variant."""

    def resolve_lora_variant(self, *, config, **kwargs):
        return CodeVariant()


CLASSES = {"zeros": ZeroPointLoraLinear, "codes": CodeLoraLinear}


def register(lora_config, route: str):
    """Make `lora_config` (a peft LoraConfig) wrap the packed GPTQ/AWQ layers with the `route`'s LoRA layers."""
    lora_config._register_custom_module({t: CLASSES[route] for t in LAYERS})
    return lora_config
