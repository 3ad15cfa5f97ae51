"""A layer's experts between transformers' fused 3-D parameters and one [out, in] matrix per expert and projection.

In memory transformers holds gate_up [E, 2I, H] (gate rows then up rows; gpt-oss: [E, H, 2I] used as x @ W, gate
and up alternating along 2I, with a bias [E, 2I]) and down [E, H, I] (gpt-oss [E, I, H], bias [E, H]). Our
modules hold the same numbers as three matrices per expert in nn.Linear layout: gate [I, H], up [I, H], down
[H, I] (+ biases), named `<experts path>.<e>.<gate|up|down name>` (the "defused" names: the family's per-expert
disk names, Mixtral's under `mlp.` as in memory; gpt-oss, which has none, takes GPTQModel's gate_proj/up_proj/
down_proj). The family description (quant.arch) says which layout applies.
"""

from __future__ import annotations

from typing import Callable, Mapping

import torch

from quant.arch.parts import Experts

GATE, UP, DOWN = "gate", "up", "down"
PROJECTIONS = (GATE, UP, DOWN)
GATE_UP = "gate_up"  # the fused gate/up pair (one LoRA adapter covers both, as peft's does on the fused parameter)
_DEFAULT_NAMES = ("gate_proj", "up_proj", "down_proj")  # GPTQModel's names for gpt-oss's defused experts


def leaf_names(part: Experts) -> dict[str, str]:
    """{gate, up, down: the per-expert module name} (the family's disk names, else GPTQModel's)."""
    return dict(zip(PROJECTIONS, part.disk or _DEFAULT_NAMES))


def split_pair(t: torch.Tensor, dim: int, interleaved: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(gate, up) of a tensor holding both along `dim`: halves, or alternating entries (gpt-oss)."""
    if not interleaved:
        return t.chunk(2, dim=dim)
    moved = t.movedim(dim, -1)
    return moved[..., 0::2].movedim(-1, dim), moved[..., 1::2].movedim(-1, dim)


def join_pair(gate: torch.Tensor, up: torch.Tensor, dim: int, interleaved: bool) -> torch.Tensor:
    """The inverse of split_pair."""
    if not interleaved:
        return torch.cat([gate, up], dim=dim)
    dim = dim % gate.dim()
    return torch.stack([gate, up], dim=dim + 1).flatten(dim, dim + 1)


def expert_matrices(part: Experts, params: Mapping[str, torch.Tensor]
                    ) -> dict[str, tuple[torch.Tensor, torch.Tensor | None]]:
    """{gate, up, down: (weight [E, out, in], bias [E, out] or None)} from a fused experts module's parameters (by
    name, as the module or a checkpoint holds them). Views where the layout allows."""
    gate_up, down = params[part.gate_up], params[part.down]
    if part.transposed:
        gate_up, down = gate_up.transpose(1, 2), down.transpose(1, 2)
    gate, up = split_pair(gate_up, 1, part.interleaved)
    gate_b = up_b = down_b = None
    if part.gate_up_bias:
        gate_b, up_b = split_pair(params[part.gate_up_bias], 1, part.interleaved)
    if part.down_bias:
        down_b = params[part.down_bias]
    return {GATE: (gate, gate_b), UP: (up, up_b), DOWN: (down, down_b)}


def fused_params(part: Experts, mats: Mapping[str, tuple[torch.Tensor, torch.Tensor | None]]
                 ) -> dict[str, torch.Tensor]:
    """The inverse of expert_matrices: the fused parameters by name (contiguous)."""
    gate_up = join_pair(mats[GATE][0], mats[UP][0], 1, part.interleaved)
    down = mats[DOWN][0]
    if part.transposed:
        gate_up, down = gate_up.transpose(1, 2), down.transpose(1, 2)
    out = {part.gate_up: gate_up.contiguous(), part.down: down.contiguous()}
    if part.gate_up_bias:
        out[part.gate_up_bias] = join_pair(mats[GATE][1], mats[UP][1], 1, part.interleaved).contiguous()
    if part.down_bias:
        out[part.down_bias] = mats[DOWN][1].contiguous()
    return out


def map_matrices(part: Experts, params: Mapping[str, torch.Tensor],
                 fn: Callable[[str, torch.Tensor], torch.Tensor]) -> dict[str, torch.Tensor]:
    """The fused parameters with fn(projection, W [out, in]) applied to every expert's every weight matrix (biases
    untouched): how a rebuild that works per expert and projection (NF4) applies to a fused stack."""
    mats = expert_matrices(part, params)
    new = {p: (torch.stack([fn(p, w) for w in mats[p][0]]), mats[p][1]) for p in PROJECTIONS}
    return fused_params(part, new)


def defused_keys(part: Experts, experts_prefix: str, num_experts: int, bias: bool) -> dict[str, list[str]]:
    """{gate, up, down: the defused weight keys of experts 0..E-1 (and `.bias` keys after them when `bias`)} of
    the experts module at `experts_prefix` ('model.layers.3.mlp.experts')."""
    names = leaf_names(part)
    leaves = ("weight", "bias") if bias else ("weight",)
    return {p: [f"{experts_prefix}.{e}.{names[p]}.{leaf}" for leaf in leaves for e in range(num_experts)]
            for p in PROJECTIONS}
