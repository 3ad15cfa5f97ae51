"""A mixture of experts' expert adapters in the merge: peft's `target_parameters` layout read back as one
`ExpertFactors` per fused parameter, whose delta the merge adds to the fused parameter as transformers holds it
(the base reader stacks per-expert checkpoint tensors into it first, quant.moe.layout.memory_tensors).

peft's file (P/tuners/lora/layer.py ParamWrapper; ours is the same, finetune.lora_experts): `<experts>.lora_A.weight`
[r·E, in] with expert-major rows and `lora_B.weight` [out, r·E] with rank-major columns; nested wrappers put
`.base_layer` before them, the innermost adapting the first of the targeted parameters in the experts module's
registration order (gate_up, then down), so the wrapper depth says which parameter a pair adapts.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from quant.errors import UserError
from quant.moe.layout import DOWN, GATE_UP, parameters_of

BASE_LAYER = ".base_layer"


@dataclass
class ExpertFactors:
    """One fused expert parameter's adapter: delta_e = scale · B_e A_e [out, in] for every expert e, added to the
    parameter in its own layout ([E, out, in], or [E, in, out] when `transposed`, gpt-oss)."""

    A: torch.Tensor  # [E, r, in]
    B: torch.Tensor  # [E, out, r]
    scale: float
    transposed: bool

    def delta(self, device=None) -> torch.Tensor:
        d = torch.einsum("eor,eri->eoi", self.B.to(device, torch.float32), self.A.to(device, torch.float32))
        d.mul_(self.scale)
        return d.transpose(1, 2) if self.transposed else d

    @property
    def shape(self) -> tuple[int, int, int]:
        E, out_f, in_f = self.B.shape[0], self.B.shape[1], self.A.shape[2]
        return (E, in_f, out_f) if self.transposed else (E, out_f, in_f)


def expert_factors(pairs: dict[str, dict[str, torch.Tensor]], config: dict, arch, scale_of, where) -> dict:
    """The expert adapters among `pairs` ({module name: {"A", "B"}}; taken out of it) as {fused parameter key:
    ExpertFactors}; `scale_of(key) -> (r, scale)` reads rank_pattern/alpha_pattern."""
    part = arch.family.experts if arch is not None else None
    if part is None:
        raise UserError(f"{where}: target_parameters {config.get('target_parameters')} but the base is not a "
                        "mixture of experts this version knows")
    try:
        targeted = parameters_of(part, config.get("target_parameters"))
    except ValueError as e:
        raise UserError(f"{where}: {e}") from None
    names = {GATE_UP: part.gate_up, DOWN: part.down}
    out = {}
    for module in [m for m in pairs if m.removesuffix(BASE_LAYER).endswith("." + part.path) or
                   m.endswith("." + part.path)]:
        experts, depth = module, 0
        while experts.endswith(BASE_LAYER):
            experts, depth = experts[: -len(BASE_LAYER)], depth + 1
        if not experts.endswith("." + part.path) or depth >= len(targeted):
            continue
        key = f"{experts}.{names[targeted[len(targeted) - 1 - depth]]}"
        ab = pairs.pop(module)
        if set(ab) != {"A", "B"}:
            raise UserError(f"{where}: {module} has lora_{'A' if 'A' in ab else 'B'} but not its partner")
        A, B = ab["A"], ab["B"]
        r, scale = scale_of(key)
        E = A.shape[0] // r if A.dim() == 2 else 0
        if A.dim() != 2 or B.dim() != 2 or not E or A.shape[0] != r * E or B.shape[1] != r * E:
            raise UserError(f"{where}: {key}: lora_A {tuple(A.shape)} / lora_B {tuple(B.shape)} are not rank {r} "
                            "expert adapters (peft's target_parameters layout)")
        out[key] = ExpertFactors(A.view(E, r, -1), B.view(B.shape[0], r, E).permute(2, 0, 1), scale,
                                 part.transposed)
    return out
