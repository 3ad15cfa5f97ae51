"""`MoEExperts`: a layer's experts, one frozen layer per expert and projection, computed as transformers does.

It takes the place of the family's experts module (`mlp.experts`) and is called as that module is: with the
router's choices, `forward(hidden [T, H], top_k_index [T, k], top_k_weights [T, k]) -> [T, H]`. Each token's
output is the weighted sum over its k experts of down(act(gate(x)) * up(x)) (+ biases), the activation being the
config's (`hidden_act`, SiLU in every family we know) or gpt-oss's clamped SwiGLU, `(up + 1) * gate *
sigmoid(alpha * gate)` after clamping both. Only the experts that received tokens are computed.

The weights live in one of two ways:
- per expert: child modules `<e>.<gate|up|down name>`, each an nn.Linear or a packed layer (quant.packed), so that
  the state_dict keys are the per-expert checkpoint names GPTQ/AWQ readers expect, and the quantizers' hooks see
  each expert's routed tokens;
- stacked: one module per projection holding all E experts (`<gate|up|down name>`), such as the NF4 storage
  (quant.formats.bnb_experts), which dequantizes only the experts asked for.
Either way `weights(projection, experts, dtype)` gives dense [n, out, in] weights and `apply(projection, e, x)`
computes one expert (frozen: no weight gradient, the weight never kept for backward).

`adapters` (the LoRA of finetune's expert adapters): {"gate_up": (A [E, r, H], B [E, 2I, r], scale), "down":
(A [E, r, I], B [E, H, r], scale)}; the gate_up rows are in the fused parameter's order (halves, or alternating
for gpt-oss), as peft's adapter on the fused parameter holds them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import torch
from torch import nn

from quant.arch.describe import Architecture
from quant.arch.parts import CLAMPED_SWIGLU
from quant.moe.layout import DOWN, GATE, GATE_UP, PROJECTIONS, UP, leaf_names, split_pair

Adapter = tuple[torch.Tensor, torch.Tensor, float]  # A [E, r, in], B [E, out, r], scale


@dataclass(frozen=True)
class ExpertSpec:
    """What the experts' math needs from the family description and the config."""

    num_experts: int
    hidden: int
    intermediate: int
    names: tuple[str, str, str]  # the per-expert module names of gate, up, down
    interleaved: bool  # gate/up alternate along the fused 2I (gpt-oss): the order of the gate_up adapter's rows
    activation: str  # the config's hidden_act (act(gate) * up), or CLAMPED_SWIGLU
    bias: bool = False
    alpha: float = 1.702  # clamped SwiGLU's sigmoid slope and clamp limit (gpt-oss config swiglu_alpha/limit)
    limit: float = 7.0

    @classmethod
    def of(cls, arch: Architecture) -> "ExpertSpec":
        part, c = arch.family.experts, arch.config
        names = leaf_names(part)
        clamped = part.activation == CLAMPED_SWIGLU
        return cls(arch.n_experts, arch.hidden, arch.expert_intermediate, (names[GATE], names[UP], names[DOWN]),
                   part.interleaved, CLAMPED_SWIGLU if clamped else getattr(c, "hidden_act", "silu"),
                   bias=bool(part.gate_up_bias), alpha=float(getattr(c, "swiglu_alpha", 1.702)),
                   limit=float(getattr(c, "swiglu_limit", 7.0)))

    def shape(self, projection: str) -> tuple[int, int]:
        """[out, in] of one expert's `projection`."""
        return (self.hidden, self.intermediate) if projection == DOWN else (self.intermediate, self.hidden)


def dense_weight(layer: nn.Module, dtype: torch.dtype) -> torch.Tensor:
    """A per-expert layer's weight [out, in] as a dense tensor: an nn.Linear's own, a packed layer (quant.packed,
    which holds no `weight`) dequantized."""
    if is_packed(layer):
        return layer.dequantize(dtype)
    return layer.weight.to(dtype)


def is_packed(layer: nn.Module) -> bool:
    """A packed layer (quant.packed.PackedLinear: it names its packed buffers), told apart without importing
    quant.packed, which imports this package."""
    return bool(getattr(layer, "PACKED", ()))


def route(top_k_index: torch.Tensor, num_experts: int) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
    """(expert, token indices, top-k positions) for every expert that received tokens, in expert order, tokens
    ascending."""
    k = top_k_index.shape[-1]
    with torch.no_grad():
        flat = top_k_index.reshape(-1)
        order = torch.argsort(flat, stable=True)
        counts = torch.bincount(flat, minlength=num_experts).tolist()
    start = 0
    for e, n in enumerate(counts[:num_experts]):
        if n:
            sel = order[start:start + n]
            yield e, sel // k, sel % k
            start += n


def lora_delta(adapter: Adapter, e: int, x: torch.Tensor) -> torch.Tensor:
    """scale · B_e A_e x for expert e's tokens x, computed in the adapter's dtype and returned in x's."""
    A, B, scale = adapter
    xa = x.to(A.dtype) @ A[e].T
    return ((xa @ B[e].T) * scale).to(x.dtype)


class Expert(nn.Module):
    """One expert's gate, up and down layers (a container: MoEExperts calls them)."""


class MoEExperts(nn.Module):
    """See the module docstring. `experts`: E per-expert containers; or `stacks`: {gate, up, down: stacked module}."""

    def __init__(self, spec: ExpertSpec, experts: list[nn.Module] | None = None,
                 stacks: dict[str, nn.Module] | None = None):
        super().__init__()
        if (experts is None) == (stacks is None):
            raise ValueError("MoEExperts takes per-expert layers or stacks, one of the two")
        self.spec = spec
        self.num_experts = spec.num_experts
        self.stacked = stacks is not None
        self._names = dict(zip(PROJECTIONS, spec.names))
        if stacks is not None:
            for p in PROJECTIONS:
                self.add_module(self._names[p], stacks[p])
        else:
            for e, expert in enumerate(experts):
                self.add_module(str(e), expert)
        if spec.activation != CLAMPED_SWIGLU:
            # here, not at the top: `quant --help` imports this module through the format registry, and
            # transformers.activations added 1.1 s of CPU to it (docs/layout.md, exception 1)
            from transformers.activations import ACT2FN

            self.act_fn = ACT2FN[spec.activation]

    # ---- the weights
    def layer(self, projection: str, e: int) -> nn.Module:
        """Expert e's layer of `projection` (per-expert storage only)."""
        return getattr(self._modules[str(e)], self._names[projection])

    def stack(self, projection: str) -> nn.Module:
        return self._modules[self._names[projection]]

    def weights(self, projection: str, experts: list[int], dtype: torch.dtype) -> torch.Tensor:
        """Dense weights [len(experts), out, in] of these experts' `projection`, made now (never kept)."""
        if self.stacked:
            return self.stack(projection).weights(experts, dtype)
        return torch.stack([dense_weight(self.layer(projection, e), dtype) for e in experts])

    def bias(self, projection: str, dtype: torch.dtype) -> torch.Tensor | None:
        """[E, out] biases of `projection`, or None."""
        if not self.spec.bias:
            return None
        if self.stacked:
            return self.stack(projection).bias.to(dtype)
        return torch.stack([self.layer(projection, e).bias.to(dtype) for e in range(self.num_experts)])

    def apply(self, projection: str, e: int, x: torch.Tensor) -> torch.Tensor:
        """x [n, in] through expert e's frozen `projection` (bias included)."""
        if self.stacked:
            return self.stack(projection).expert_forward(e, x)
        return self.layer(projection, e)(x)

    # ---- the math
    def activate(self, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        if self.spec.activation == CLAMPED_SWIGLU:
            gate = gate.clamp(max=self.spec.limit)
            up = up.clamp(min=-self.spec.limit, max=self.spec.limit)
            return (up + 1) * (gate * torch.sigmoid(gate * self.spec.alpha))
        return self.act_fn(gate) * up

    def expert(self, e: int, x: torch.Tensor, adapters: dict[str, Adapter] | None = None) -> torch.Tensor:
        """Expert e on its tokens x [n, H] -> [n, H], with the LoRA of `adapters` where given."""
        gate, up = self.apply(GATE, e, x), self.apply(UP, e, x)
        if adapters and GATE_UP in adapters:
            d_gate, d_up = split_pair(lora_delta(adapters[GATE_UP], e, x), -1, self.spec.interleaved)
            gate, up = gate + d_gate, up + d_up
        h = self.activate(gate, up)
        y = self.apply(DOWN, e, h)
        if adapters and DOWN in adapters:
            y = y + lora_delta(adapters[DOWN], e, h)
        return y

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor,
                adapters: dict[str, Adapter] | None = None) -> torch.Tensor:
        out = torch.zeros_like(hidden_states)
        for e, tokens, pos in route(top_k_index, self.num_experts):
            y = self.expert(e, hidden_states[tokens], adapters) * top_k_weights[tokens, pos, None]
            out.index_add_(0, tokens, y.to(out.dtype))
        return out

    def extra_repr(self) -> str:
        s = self.spec
        return (f"num_experts={s.num_experts}, hidden={s.hidden}, intermediate={s.intermediate}, "
                f"activation={s.activation}, bias={s.bias}, {'stacked' if self.stacked else 'per expert'}")
