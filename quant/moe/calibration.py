"""Calibration of a mixture of experts' experts: each expert is quantized on the tokens the router sends it (its
layers' Hessians and statistics come from hooks on the per-expert layers, which see only those tokens), and an
expert that received too few is rounded to nearest on the same grid instead.

Why a floor: with n tokens an expert's input Hessian has rank at most n, and GPTQ's error feedback (and AWQ's
searches) then fit those few inputs at the expense of every other input direction. The default floor, 128 tokens,
is one default group of input channels, and about 3 % of what an average expert of Qwen3-30B-A3B (128 experts,
top 8) receives from a default calibration set (128 windows of 512 tokens: 4096 tokens each).
"""

from __future__ import annotations

import logging

from torch import nn

from quant.moe.experts import MoEExperts
from quant.settings import setting

log = logging.getLogger(__name__)

EXPERT_MIN_TOKENS = 128
FALLBACK = "rtn"  # what such an expert gets: round-to-nearest on the grid the method would use


def expert_min_tokens_setting():
    """The quantizer config field (GPTQConfig, AWQConfig): one default and help text for both."""
    return setting(EXPERT_MIN_TOKENS, "mixture of experts: an expert that receives fewer calibration tokens than this "
                   "is rounded to nearest on the same grid (one log line per layer lists them; quant_log.json "
                   "records them)", valid=lambda n: n >= 0, rule="expert min tokens must be >= 0 (got {value})")


def expert_layers(block: nn.Module) -> set[str]:
    """Names (relative to `block`) of the per-expert layers inside the block's MoEExperts modules."""
    names = set()
    for path, module in block.named_modules():
        if isinstance(module, MoEExperts) and not module.stacked:
            names.update(f"{path}.{n}" for n, m in module.named_modules() if n.count(".") == 1)
    return names


def too_few(counts: dict[str, int], minimum: int) -> dict[str, int]:
    """{layer: tokens} of the expert layers below `minimum`."""
    return {n: c for n, c in counts.items() if c < minimum}


def log_fallbacks(block_name: str, few: dict[str, int], minimum: int) -> dict | None:
    """One line for the block's experts that fell back, and the quant_log.json entry (None when none did)."""
    if not few:
        return None
    tokens: dict[int, int] = {}
    for name, count in few.items():  # '<experts path>.<e>.<projection>'
        e = int(name.rsplit(".", 2)[1])
        tokens[e] = min(count, tokens.get(e, count))
    listed = ", ".join(f"{e} ({c} tokens)" for e, c in sorted(tokens.items()))
    log.warning("%s: experts %s received fewer than %d calibration tokens: %s on the same grid", block_name, listed,
                minimum, FALLBACK)
    return {"block": block_name, "min_tokens": minimum, "fallback": FALLBACK,
            "experts": {str(e): c for e, c in sorted(tokens.items())}}
