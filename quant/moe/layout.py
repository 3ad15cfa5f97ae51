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


def _experts_of(key: str, part: Experts) -> tuple[str, int, str, str] | None:
    """(experts module path, expert, leaf name, 'weight'|'bias') of a defused per-expert key, else None."""
    head, _, leaf = key.rpartition(".")
    if leaf not in ("weight", "bias"):
        return None
    head, _, name = head.rpartition(".")
    head, _, e = head.rpartition(".")
    if not e.isdigit() or not head.endswith("." + part.path) or name not in leaf_names(part).values():
        return None
    return head, int(e), name, leaf


def fuse_defused(arch, tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Tensors in memory names: per-expert float weights (and biases) `<experts>.<e>.<gate|up|down>.weight` stacked
    into the layer's fused parameters (every expert of a layer must be there); other keys as they are. Keys of
    per-expert layers without a float `weight` (packed layers) are not experts' float tensors and stay."""
    part = arch.family.experts if arch is not None else None
    if part is None:
        return dict(tensors)
    names = {v: k for k, v in leaf_names(part).items()}
    found: dict[str, dict[tuple[str, str], dict[int, torch.Tensor]]] = {}
    out = {}
    for key, t in tensors.items():
        hit = _experts_of(key, part)
        weight_of = key.rpartition(".")[0] + ".weight"
        if hit is None or weight_of not in tensors:
            out[key] = t
            continue
        path, e, name, leaf = hit
        found.setdefault(path, {}).setdefault((names[name], leaf), {})[e] = t
    for path, parts in found.items():
        mats = {}
        for p in PROJECTIONS:
            ws = parts.get((p, "weight"), {})
            if sorted(ws) != list(range(arch.n_experts)):
                raise ValueError(f"{path}: {len(ws)} of the {arch.n_experts} experts' {p} weights")
            bs = parts.get((p, "bias"))
            mats[p] = (torch.stack([ws[e] for e in range(arch.n_experts)]),
                       torch.stack([bs[e] for e in range(arch.n_experts)]) if bs else None)
        out.update({f"{path}.{k}": v for k, v in fused_params(part, mats).items()})
    return out


def fused_keys(arch, tensors: Mapping[str, torch.Tensor]) -> list[tuple[str, str]]:
    """(experts module path, parameter name) of every fused expert weight in `tensors` (memory names)."""
    part = arch.family.experts if arch is not None else None
    if part is None:
        return []
    out = []
    for key in tensors:
        path, _, leaf = key.rpartition(".")
        if leaf in (part.gate_up, part.down) and path.endswith("." + part.path) and tensors[key].dim() == 3:
            out.append((path, leaf))
    return out


def map_fused(arch, tensors: dict[str, torch.Tensor], fn: Callable[[str, torch.Tensor], torch.Tensor]) -> None:
    """fn(projection, W [out, in]) applied in place to every expert matrix of the fused expert parameters in
    `tensors` (memory names)."""
    part = arch.family.experts
    for path in sorted({p for p, _ in fused_keys(arch, tensors)}):
        params = {n: tensors[f"{path}.{n}"] for n in part.parameters}
        for name, value in map_matrices(part, params, fn).items():
            tensors[f"{path}.{name}"] = value


def memory_tensors(arch, tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Checkpoint tensors (transformers' disk names, or our per-expert names) in the model's own names: keys renamed
    (Mixtral's block_sparse_moe, a multimodal prefix), per-expert float weights stacked into the fused parameters."""
    if arch is None:
        return dict(tensors)
    return fuse_defused(arch, {arch.to_memory(k): t for k, t in tensors.items()})


# ---- the fused parameters as peft's `target_parameters` name them (adapter_config.json)

PARAMETERS = (GATE_UP, DOWN)  # registration order in every family's experts module: peft nests gate_up inside down


def target_parameters(part: Experts, parameters: tuple[str, ...]) -> list[str]:
    """`target_parameters` entries of the adapted fused parameters ('mlp.experts.gate_up_proj', ...)."""
    names = {GATE_UP: part.gate_up, DOWN: part.down}
    return [f"{part.path}.{names[p]}" for p in PARAMETERS if p in parameters]


def parameters_of(part: Experts, entries: list[str] | None) -> tuple[str, ...]:
    """The fused parameters (gate_up, down) that `target_parameters` entries name, in nesting order; ValueError
    naming an entry that is neither."""
    names = {part.gate_up: GATE_UP, part.down: DOWN}
    found = []
    for entry in entries or []:
        leaf = entry.rpartition(".")[2]
        if leaf not in names:
            raise ValueError(f"target_parameters entry {entry!r} is not an expert parameter "
                             f"({', '.join(target_parameters(part, PARAMETERS))})")
        found.append(names[leaf])
    return tuple(p for p in PARAMETERS if p in found)


def defused_tensors(arch, tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The inverse of fuse_defused: fused expert parameters (memory names) as per-expert weights and biases under
    the defused names; other keys as they are."""
    part = arch.family.experts if arch is not None else None
    fused = {path for path, _ in fused_keys(arch, tensors)}
    if not fused:
        return dict(tensors)
    names = leaf_names(part)
    own = {f"{path}.{n}" for path in fused for n in part.parameters}
    out = {k: t for k, t in tensors.items() if k not in own}
    for path in sorted(fused):
        mats = expert_matrices(part, {n: tensors[f"{path}.{n}"] for n in part.parameters})
        for p in PROJECTIONS:
            weight, bias = mats[p]
            for e in range(weight.shape[0]):
                out[f"{path}.{e}.{names[p]}.weight"] = weight[e].contiguous()
                if bias is not None:
                    out[f"{path}.{e}.{names[p]}.bias"] = bias[e].contiguous()
    return out
