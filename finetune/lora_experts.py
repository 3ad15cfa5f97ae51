"""LoRA on a mixture of experts' experts: per-expert adapters on the fused gate_up and down, in peft's layout.

Which parameters: the experts' gate_up (gate and up of each expert) and down, never the router (a [E, H] matrix
that decides routing; it stays the base's). gate and up share ONE adapter per expert, A_e [r, H] and B_e [2I, r],
as peft's adapter on the fused `gate_up_proj` parameter does: (1) the adapter file is then exactly peft's
`target_parameters` layout, so a peft user loads it on a 16-bit transformers model with nothing converted (and we
load theirs); (2) gate and up read the same input, so x·A_eᵀ is computed once for both; (3) at one rank it has
r·(H + 2I) parameters against 2r·(H + I) for two adapters (Qwen3-30B-A3B, H 2048, I 768: 3584r against 5632r).

The layout (peft 0.21 `ParamWrapper`, P/tuners/lora/layer.py): per adapted parameter `lora_A.weight` [r·E, in]
with expert-major rows (A.view(E, r, in)) and `lora_B.weight` [out, r·E] with rank-major columns
(B.view(out, r, E)); scale alpha/r (alpha/√r with rslora). Wrappers nest as peft nests them: the down adapter
wraps the gate_up adapter, which wraps the experts module, so the keys are `...mlp.experts.base_layer.lora_A.weight`
(gate_up) and `...mlp.experts.lora_A.weight` (down), and adapter_config.json lists `target_parameters`. The gate_up
rows are in the fused parameter's order (gpt-oss: gate/up alternating). No dropout on expert adapters (peft's
refuse it too: it cannot be folded into the parameter).

The wrappers are peft tuner layers (BaseTunerLayer), so peft saves and loads them with the rest of the adapter and
`disable_adapter()` switches them off with the others (the eval's base row, the preference reference). The
outer wrapper computes the layer: on CUDA with Triton through the grouped kernel (finetune.kernels.experts), else
expert by expert (quant.moe.experts).
"""

from __future__ import annotations

import math
import re

import torch
from peft.tuners.lora.layer import LoraLayer
from torch import nn

from finetune.kernels.experts import grouped_experts, use_grouped
from quant.arch.describe import Architecture
from quant.errors import UserError
from quant.moe.experts import Adapter, MoEExperts
from quant.moe import layout
from quant.moe.layout import DOWN, GATE_UP, PARAMETERS


class ExpertLora(nn.Module, LoraLayer):
    """The adapter of one fused expert parameter (`parameter`: gate_up or down) of a MoEExperts layer."""

    adapter_layer_names = ("lora_A", "lora_B")

    def __init__(self, base_layer: nn.Module, adapter_name: str, parameter: str, r: int, lora_alpha: float,
                 use_rslora: bool = False, init_lora_weights=True):
        nn.Module.__init__(self)
        self.parameter = parameter
        LoraLayer.__init__(self, base_layer)
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, r, lora_alpha, use_rslora, init_lora_weights)

    def _get_in_out_features(self, module: MoEExperts) -> tuple[int, int]:
        spec = module.spec
        self.num_experts = spec.num_experts
        return (spec.hidden, 2 * spec.intermediate) if self.parameter == GATE_UP else (spec.intermediate, spec.hidden)

    def update_layer(self, adapter_name, r, lora_alpha, use_rslora=False, init_lora_weights=True, **kwargs):
        if r <= 0:
            raise ValueError(f"`r` should be a positive integer value but the value passed is {r}")
        self.r[adapter_name], self.lora_alpha[adapter_name] = r, lora_alpha
        self.scaling[adapter_name] = lora_alpha / (math.sqrt(r) if use_rslora else r)
        self.use_rslora[adapter_name], self.lora_bias[adapter_name] = use_rslora, False
        self.lora_dropout[adapter_name] = nn.Identity()
        device = next(self.get_base_layer().buffers(), None)
        device = device.device if device is not None else None
        self.lora_A[adapter_name] = nn.Linear(self.in_features, r * self.num_experts, bias=False, device=device)
        self.lora_B[adapter_name] = nn.Linear(r * self.num_experts, self.out_features, bias=False, device=device)
        self.reset_lora_parameters(adapter_name, init_lora_weights)
        self.set_adapter(self.active_adapters)

    def factors(self) -> Adapter | None:
        """(A [E, r, in], B [E, out, r], scale) of the active adapter, or None when disabled or absent."""
        name = self.active_adapters[0] if self.active_adapters else None
        if self.disable_adapters or name not in self.lora_A:
            return None
        E = self.num_experts
        A = self.lora_A[name].weight.view(E, -1, self.in_features)
        B = self.lora_B[name].weight.view(self.out_features, -1, E).permute(2, 0, 1)
        return A, B, self.scaling[name]

    def merge(self, *args, **kwargs):
        raise UserError("expert adapters are merged by `finetune merge`, not in place")

    def forward(self, hidden_states, top_k_index, top_k_weights):
        adapters, layer = {}, self
        while isinstance(layer, ExpertLora):
            if len(layer.active_adapters) > 1:
                raise UserError("expert adapters run one adapter at a time")
            f = layer.factors()
            if f is not None:
                adapters[layer.parameter] = f
            layer = layer.base_layer
        if use_grouped(hidden_states):
            return grouped_experts(layer, hidden_states, top_k_index, top_k_weights, adapters)
        return layer(hidden_states, top_k_index, top_k_weights, adapters=adapters or None)

    def __repr__(self) -> str:
        return f"ExpertLora({self.parameter}, experts={self.num_experts}, in={self.in_features}, " \
               f"out={self.out_features}, r={self.r})"


def experts_modules(model: nn.Module) -> list[tuple[str, MoEExperts]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, MoEExperts)]


def attach(model: nn.Module, parameters: tuple[str, ...], r: int, alpha: float, use_rslora: bool = False,
           init_lora_weights=True, adapter_name: str = "default") -> int:
    """Wrap every MoEExperts of `model` with adapters on `parameters` (before peft's get_peft_model, which then
    keeps them as its own tuner layers); returns how many layers."""
    done = 0
    for name, experts in experts_modules(model):
        wrapped: nn.Module = experts
        for p in PARAMETERS:
            if p in parameters:
                wrapped = ExpertLora(wrapped, adapter_name, p, r, alpha, use_rslora, init_lora_weights)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, wrapped)
        done += 1
    return done


def target_parameters(arch: Architecture, parameters: tuple[str, ...]) -> list[str]:
    """adapter_config.json's `target_parameters` for the adapted expert parameters (peft's names)."""
    return layout.target_parameters(arch.family.experts, parameters)


def parameters_of(arch: Architecture, entries: list[str] | None) -> tuple[str, ...]:
    """The expert parameters an adapter_config.json's `target_parameters` adapt; anything else is refused."""
    try:
        return layout.parameters_of(arch.family.experts, entries)
    except ValueError as e:
        raise UserError(f"adapter: {e}") from None


def resolve_targets(model: nn.Module, arch: Architecture, targets) -> tuple[str | None, tuple[str, ...]]:
    """(peft's target_modules as a regex of full module names, the expert parameters adapted) for `targets` (the
    recipe's lora.target_modules) on a mixture of experts whose experts are MoEExperts layers.

    'all-linear': every projection outside the experts (attention, a dense layer's MLP; never the LM head) and both
    expert parameters. A list of names: projections of those leaf names outside the experts; the family's
    per-expert names (gate_proj/up_proj/down_proj, Mixtral's w1/w3/w2), the fused parameter names (gate_up_proj,
    down_proj) or 'experts' adapt the experts (gate and up only together: they share one adapter). The router is
    never a target. Spelled out as full names so that peft's v4->v5 shim, which would turn 'gate_proj' into the
    router and fused parameters (R1 §0.3), never sees a leaf name. A regex string is passed through, refused if
    it matches a module inside the experts or the router."""
    part, router = arch.family.experts, arch.family.router
    inside = {n for n, _ in experts_modules(model)}
    linears = {n: n.rpartition(".")[2] for n, m in model.named_modules()
               if _is_projection(m) and not any(n.startswith(e + ".") for e in inside) and n.rpartition(".")[2] != "lm_head"}
    router_leaf = router.path.rpartition(".")[2] if router else None
    if isinstance(targets, str) and targets != "all-linear":
        hits = [n for n, _ in model.named_modules() if re.fullmatch(targets, n)]
        bad = [n for n in hits if any(n == e or n.startswith(e + ".") for e in inside) or
               (router_leaf and n.endswith(f".{router.path}"))]
        if bad:
            raise UserError(f"lora.target_modules regex {targets!r} matches {bad[0]}; expert and router modules are "
                            "adapted through the experts' parameters (list 'experts' or use 'all-linear')")
        return targets, ()
    if targets == "all-linear":
        return _shim_safe(arch, _regex(linears), linears.values()), PARAMETERS
    names = set(targets)
    if router_leaf and router_leaf in names:
        raise UserError(f"lora.target_modules: '{router_leaf}' is the {arch.family.title} router, which is never a "
                        "LoRA target (it decides the routing and stays the base's)")
    gate, up, down = part.disk or ("gate_proj", "up_proj", "down_proj")
    gate_up = {gate, up} & names
    params = []
    if "experts" in names or part.gate_up in names or gate_up == {gate, up}:
        params.append(GATE_UP)
    elif gate_up and not any(v in gate_up for v in linears.values()):
        raise UserError(f"lora.target_modules: {sorted(gate_up)[0]} without {sorted({gate, up} - gate_up)[0]}: the "
                        f"{arch.family.title} experts' gate and up share one adapter; list both or neither")
    if "experts" in names or part.down in names or down in names:
        params.append(DOWN)
    chosen = {n: leaf for n, leaf in linears.items() if leaf in names}
    return _shim_safe(arch, _regex(chosen), chosen.values()), tuple(p for p in PARAMETERS if p in params)


def _shim_safe(arch: Architecture, regex: str | None, leaves) -> str | None:
    """`regex`, unless it adapts a Linear whose leaf name is one of the family's per-expert names (a dense MLP
    layer of a Qwen3-MoE with mlp_only_layers): peft's v4->v5 shim resolves every target to leaf names and turns
    those into the experts' fused parameters, on our model and on a peft user's, so such an adapter would not load
    as trained."""
    clash = sorted(set(leaves) & set(arch.family.experts.disk or ()))
    if clash:
        raise UserError(f"lora.target_modules: the {arch.family.title} model has dense MLP layers whose {clash[0]} "
                        f"peft would load as the experts' {arch.family.experts.gate_up} (its transformers-v4 names); "
                        "leave the dense MLPs out (list the attention projections and 'experts')")
    return regex


def _is_projection(module: nn.Module) -> bool:
    return hasattr(module, "in_features") and hasattr(module, "out_features") and not isinstance(module, MoEExperts) \
        and not isinstance(module, LoraLayer) and len(list(module.children())) == 0


def _regex(names) -> str | None:
    return "^(" + "|".join(re.escape(n) for n in sorted(names)) + ")$" if names else None
