"""Checkpoint keys and tensors between the model's own names (state_dict, fused 3-D experts) and what transformers
writes to disk (per-expert Linears, Mixtral's v4 names, a multimodal class's `language_model.model.` prefix):
what our writers produce and our readers accept.

In memory, Qwen3-MoE and Mixtral hold a layer's experts as gate_up [E, 2I, H] (gate rows first) and down [E, H, I];
on disk each expert e is `<disk_path>.<e>.<gate>.weight` [I, H], `<up>` [I, H], `<down>` [H, I]. gpt-oss stores
its fused parameters as they are.
"""

from __future__ import annotations

import re
from typing import Iterable, Iterator

import torch

from quant.arch.describe import Architecture
from quant.errors import UserError


def _expert_param(arch: Architecture, key: str) -> tuple[str, str] | None:
    """(block path, parameter leaf) when `key` (memory name) is a fused expert parameter with a per-expert disk
    layout, else None."""
    ex = arch.family.experts
    if ex is None or ex.disk is None:
        return None
    for leaf in (ex.gate_up, ex.down):
        suffix = f".{ex.path}.{leaf}"
        if key.endswith(suffix):
            return key[: -len(suffix)], leaf
    return None


def to_disk_tensors(arch: Architecture, key: str, t: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
    """The disk keys and tensors of one state_dict entry (a fused expert parameter becomes E or 2E tensors)."""
    found = _expert_param(arch, key)
    if found is None:
        return [(arch.to_disk(key), t)]
    block, leaf = found
    ex = arch.family.experts
    gate, up, down = ex.disk
    base = arch.to_disk(f"{block}.{ex.disk_path}")
    if leaf == ex.down:
        return [(f"{base}.{e}.{down}.weight", t[e]) for e in range(t.shape[0])]
    half = t.shape[1] // 2
    return [(f"{base}.{e}.{name}.weight", part) for e in range(t.shape[0])
            for name, part in ((gate, t[e, :half]), (up, t[e, half:]))]


def _disk_expert_pattern(arch: Architecture) -> re.Pattern | None:
    ex = arch.family.experts
    if ex is None or ex.disk is None:
        return None
    names = "|".join(re.escape(n) for n in ex.disk)
    return re.compile(rf"^(.*\.{re.escape(ex.disk_path)})\.(\d+)\.({names})\.weight$")


class ExpertStacker:
    """Turns a stream of disk tensors into memory ones: renamed keys pass through at once, per-expert tensors are
    held until their layer's stack is complete (a layer-ordered stream holds one layer's experts at a time)."""

    def __init__(self, arch: Architecture):
        self.arch = arch
        self.pattern = _disk_expert_pattern(arch)
        self.pending: dict[str, dict[tuple[str, int], torch.Tensor]] = {}

    def add(self, key: str, t: torch.Tensor) -> Iterator[tuple[str, torch.Tensor]]:
        m = self.pattern.match(key) if self.pattern else None
        if m is None:
            yield self.arch.to_memory(key), t
            return
        base, e, name = m.group(1), int(m.group(2)), m.group(3)
        parts = self.pending.setdefault(base, {})
        parts[(name, e)] = t
        if len(parts) == 3 * self.arch.n_experts:
            del self.pending[base]
            yield from self._stack(base, parts)

    def _stack(self, base: str, parts: dict) -> Iterator[tuple[str, torch.Tensor]]:
        ex = self.arch.family.experts
        gate, up, down = ex.disk
        E = self.arch.n_experts
        missing = [f"{base}.{e}.{n}" for n in ex.disk for e in range(E) if (n, e) not in parts]
        if missing:
            raise UserError(f"checkpoint: expert tensors missing, e.g. {missing[0]}.weight")
        block = self.arch.to_memory(base[: -len(ex.disk_path)])  # keeps the dot before the block's part
        memory = block + ex.path
        yield f"{memory}.{ex.gate_up}", torch.stack([torch.cat([parts[(gate, e)], parts[(up, e)]]) for e in range(E)])
        yield f"{memory}.{ex.down}", torch.stack([parts[(down, e)] for e in range(E)])

    def close(self) -> None:
        if self.pending:
            base = next(iter(self.pending))
            raise UserError(f"checkpoint: {base} holds {len(self.pending[base])} of the {3 * self.arch.n_experts} "
                            "per-expert tensors of its layer")


def to_memory_tensors(arch: Architecture, items: Iterable[tuple[str, torch.Tensor]]
                      ) -> Iterator[tuple[str, torch.Tensor]]:
    """A stream of (disk key, tensor) as (state_dict key, tensor): per-expert tensors stacked per layer."""
    stacker = ExpertStacker(arch)
    for key, t in items:
        yield from stacker.add(key, t)
    stacker.close()
