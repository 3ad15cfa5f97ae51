"""Replacing a model's experts modules by `MoEExperts`, and what must hold before a 4-bit output is written.

`defuse(model, build)` walks the MoE layers the family description names and hands each fused experts module's
matrices (quant.moe.layout.expert_matrices, [E, out, in] per projection) to `build`, which returns the
MoEExperts that takes its place: per-expert nn.Linear layers for the quantizers and a float base
(`linear_experts`), meta layers for a skeleton that a checkpoint then fills, or the NF4 storage
(quant.formats.bnb_experts). The fused parameters are dropped as each layer is replaced, so the peak is the
model plus one layer's experts.

`unquantizable(model)` lists the weight matrices inside the decoder blocks that no quantizer would touch (not a
Linear, not the description's router): a model with such tensors is refused by `quant gptq/awq` rather than
written with 16-bit weights under a 4-bit name.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from quant.arch.describe import Architecture, describe
from quant.blocks import find_blocks, set_submodule
from quant.errors import UserError
from quant.moe.experts import Expert, ExpertSpec, MoEExperts, is_packed
from quant.moe.layout import PROJECTIONS, expert_matrices

Matrices = dict[str, tuple[torch.Tensor, torch.Tensor | None]]


def architecture(model: nn.Module) -> Architecture | None:
    """The model's description when it is a mixture of experts, else None (a dense or unknown family: nothing to
    defuse; unknown families are refused where their structure matters)."""
    try:
        arch = describe(model.config)
    except UserError:
        return None
    return arch if arch.is_moe else None


def experts_paths(model: nn.Module, arch: Architecture) -> list[str]:
    """The module paths of the experts modules of the model's MoE layers."""
    prefix, blocks = find_blocks(model)
    return [f"{prefix}.{i}.{arch.family.experts.path}" for i, moe in enumerate(arch.moe_layers) if moe and
            i < len(blocks)]


def linear_experts(spec: ExpertSpec, mats: Matrices | None, device=None, dtype=None) -> MoEExperts:
    """Per-expert nn.Linear layers holding `mats` (copied, frozen); with `mats` None, empty layers on `device`
    (the meta device for a skeleton a checkpoint fills)."""
    experts = []
    for e in range(spec.num_experts):
        expert = Expert()
        for p, name in zip(PROJECTIONS, spec.names):
            out_f, in_f = spec.shape(p)
            w, b = mats[p] if mats is not None else (None, None)
            layer = nn.Linear(in_f, out_f, bias=spec.bias, device=w.device if w is not None else device,
                              dtype=dtype or (w.dtype if w is not None else None))
            if w is not None:
                with torch.no_grad():
                    layer.weight.copy_(w[e])
                    if spec.bias:
                        layer.bias.copy_(b[e])
            layer.requires_grad_(False)
            setattr(expert, name, layer)
        experts.append(expert)
    return MoEExperts(spec, experts=experts)


def defuse(model: nn.Module, build: Callable[[str, ExpertSpec, Matrices], MoEExperts],
           arch: Architecture | None = None) -> int:
    """Replace every fused experts module of `model` by build(path, spec, matrices); returns how many. A module
    already replaced is left as it is."""
    arch = arch or architecture(model)
    if arch is None:
        return 0
    spec = ExpertSpec.of(arch)
    part = arch.family.experts
    done = 0
    for path in experts_paths(model, arch):
        old = model.get_submodule(path)
        if isinstance(old, MoEExperts):
            continue
        params = {name: p for name, p in old.named_parameters(recurse=False)}
        missing = [n for n in part.parameters if n not in params]
        if missing:
            raise UserError(f"{path}: a {type(old).__name__} without {missing}; not the {arch.family.title} "
                            "experts layout this version reads")
        with torch.no_grad():
            new = build(path, spec, expert_matrices(part, params))
        set_submodule(model, path, new)
        del old, params
        done += 1
    return done


def defuse_linear(model: nn.Module) -> int:
    """Every MoE layer's experts as per-expert nn.Linear layers (what the GPTQ/AWQ block walker quantizes)."""
    return defuse(model, lambda path, spec, mats: linear_experts(spec, mats))


def unquantizable(model: nn.Module) -> list[str]:
    """Weight tensors (2-D or more, floating) inside the decoder blocks that are not held by a Linear or packed
    layer, other than the family's router: what a GPTQ/AWQ output would leave in 16 bits."""
    arch = None
    try:
        arch = describe(model.config)
    except UserError:
        pass
    router = f".{arch.family.router.path}." if arch is not None and arch.family.router else None
    prefix, blocks = find_blocks(model)
    found = []
    for i, block in enumerate(blocks):
        for mname, module in block.named_modules():
            if isinstance(module, nn.Linear) or is_packed(module):
                continue
            for pname, p in module.named_parameters(recurse=False):
                full = f"{prefix}.{i}.{mname}.{pname}" if mname else f"{prefix}.{i}.{pname}"
                if p.dim() >= 2 and p.is_floating_point() and not (router and router in f".{mname}.{pname}"):
                    found.append(f"{full} {tuple(p.shape)}")
    return found


def prepare_quantization(model: nn.Module, method: str, skeleton: bool = False) -> None:
    """Before `method` (GPTQ, AWQ) quantizes `model`: its experts as per-expert nn.Linear layers (each quantized on
    the tokens routed to it; empty ones on the meta device for a `skeleton` whose layers are loaded one at a time),
    and a refusal, in one line, of any weight the quantizer would leave in 16 bits."""
    if skeleton:
        defuse(model, lambda _path, spec, _mats: linear_experts(spec, None, device="meta"))
    else:
        defuse_linear(model)
    left = unquantizable(model)
    if left:
        raise UserError(f"{type(model).__name__}: {method} cannot quantize {len(left)} weight tensors of the decoder "
                        f"blocks (e.g. {left[0]}), which would be written in 16 bits under a 4-bit name; this "
                        "architecture is not supported by quant gptq/awq")
