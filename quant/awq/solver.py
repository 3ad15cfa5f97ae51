"""Activation-aware weight quantization (Lin et al. 2023, arXiv:2306.00978): the per-layer mathematics.

Weights are in nn.Linear layout W [N, K]; groups are runs of `group_size` input channels of one output row.

- The grid is group-wise asymmetric: a group's range [min(w, 0), max(w, 0)] (optionally shrunk by a
  clipping factor p) maps to codes 0..2^b-1 with an fp16 scale and an integer zero point in 0..2^b-1,
  w ≈ (q - z) · s, which is exactly what the AWQ gemm format stores (docs/awq-format.md).
- The scale search multiplies input channel k of every Linear that shares an input by s_k and divides the
  input by it (folded into the producer of that input, see quant.awq.blocks): s = mean|x|^α, normalised so
  that sqrt(max·min) = 1, for α on a grid in [0, 1); α = 0 is plain round-to-nearest, so the chosen scale
  is never worse than RTN on the calibration loss. The loss is the output error of the smallest module
  containing the Linears, measured by a caller-supplied function.
- The clipping search shrinks each group's range by p ∈ {1, 0.95, ..., 1 - max_shrink + 0.05} and keeps,
  per group, the p with the least output error of that group's partial dot products, Δw_g H_gg Δw_gᵀ,
  where H = Σ x xᵀ over all calibration tokens (exact for the error AutoAWQ estimates from 512 tokens).
- The codes on the chosen grid are the nearest ones (AWQ as published) or come from GPTQ's error feedback on
  that fixed grid (AWQConfig.rounding), which lowers the output error further at the cost of a GPTQ pass.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Callable

import torch

from quant.awq.pack import BITS, GROUP_SIZES, METHODS
from quant.moe.calibration import expert_min_tokens_setting
from quant.settings import check, setting

# fp16 cannot hold a smaller normal scale; a group whose whole range is below it is ~zero anyway.
_MIN_SCALE = torch.finfo(torch.float16).tiny


# How codes are picked on the searched grid: "nearest" (AWQ as published), "feedback" (nearest inside GPTQ's error
# feedback: each column's rounding error is pushed onto the columns not yet rounded, weighted by H) or "dithered"
# (unbiased stochastic rounding, seeded, inside that error feedback; what the merge uses, quant.formats.awq).
ROUNDINGS = ("nearest", "feedback", "dithered")
# AWQ as published (Lin et al. 2023): nearest rounding on the searched grid.
PUBLISHED = {"rounding": "nearest", "decorrelate": 0.0}


@dataclass
class AWQConfig:
    """Everything that decides the quantized weights; its fields are recorded in quantization_config.meta. The
    defaults are `quant awq`'s (the measured ones); `published()` gives the paper's."""

    bits: int = setting(BITS, "the only width of the AWQ gemm format", valid=lambda b: b == BITS,
                        rule=f"bits must be {BITS}: the AWQ gemm format vLLM and transformers load is 4-bit "
                        "(got {value})")
    group_size: int = setting(128, f"{', '.join(map(str, GROUP_SIZES))} input channels per scale/zero; pick one that "
                              "divides every layer's in_features for vLLM (SmolLM2's 576 needs 32 or 64)",
                              valid=lambda g: g in GROUP_SIZES,
                              rule=f"group size must be one of {', '.join(map(str, GROUP_SIZES))} for AWQ "
                              "(got {value})")
    method: str = setting(METHODS[0], "awq: the scale and clipping searches on --calib data; rtn: plain "
                          "round-to-nearest on the same grid, no calibration (for comparison)", choices=METHODS)
    clip: bool = setting(True, "search per-group clipping of the weight range (--no-clip: min-max range)")
    n_grid: int = setting(20, "points of the alpha grid (and 1/grid clipping steps)", flag="--grid",
                          valid=lambda n: n >= 2, rule="the scale grid needs at least 2 points (got {value})")
    max_shrink: float = setting(0.5, valid=lambda p: 0 < p < 1, rule="max_shrink must be in (0, 1) (got {value})")
    duo_scaling: bool = setting(False, "AutoAWQ's variant: s = mean|x|^a / mean|w|^(1-a)")
    # Calibration tokens the scale search forwards per candidate through attention/MLP modules (whole
    # samples, evenly spaced); statistics and single-Linear losses always use every token. On 4 SmolLM2 blocks
    # 1024, 4096 and 16384 gave held-out errors within 1 % of each other, at up to 8x the search cost.
    search_tokens: int = setting(2048, "calibration tokens forwarded per scale candidate through attention/MLP "
                                 "(statistics always use every token)", valid=lambda n: n >= 1,
                                 rule="search tokens must be >= 1 (got {value})")
    # "feedback" with decorrelate 0.5 measured better than nearest in and out of the calibration domain (README,
    # "quant awq": out-of-domain mean gap ratio 0.39 against 0.56, never more than 0.01 worse on any pair).
    rounding: str = setting("feedback", "how codes are picked on the searched grid: feedback (nearest, inside GPTQ's "
                            "error feedback), nearest (AWQ as published) or dithered (unbiased stochastic rounding, "
                            "seeded, inside the error feedback; what finetune merge uses)", choices=ROUNDINGS)
    # For "feedback"/"dithered": the fraction by which H's off-diagonal is shrunk first (GPTQConfig.decorrelate).
    decorrelate: float = setting(0.5, "for feedback/dithered rounding: shrink the Hessian's off-diagonal by this "
                                 "fraction, 0..1 (best out of the calibration domain, README 'quant awq')",
                                 valid=lambda d: 0 <= d <= 1, rule="decorrelate must be in [0, 1] (got {value})")
    expert_min_tokens: int = expert_min_tokens_setting()

    @classmethod
    def published(cls, **overrides) -> "AWQConfig":
        """AWQ as the paper runs it (PUBLISHED), with `overrides`."""
        return cls(**{**PUBLISHED, **overrides})

    @property
    def calibrated(self) -> bool:
        """Whether the method needs calibration data (AWQ does, round-to-nearest does not)."""
        return self.method == METHODS[0]

    def validate(self) -> "AWQConfig":
        check(self)
        return self

    def to_dict(self) -> dict:
        return asdict(self)


# ---- the grid -------------------------------------------------------------------------------------------

def _grouped(W: torch.Tensor, group_size: int) -> torch.Tensor:
    """W [N, K] -> [N, G, group_size], a partial last group padded with zeros (which never widen a range
    that always contains 0)."""
    N, K = W.shape
    G = math.ceil(K / group_size)
    if G * group_size != K:
        W = torch.nn.functional.pad(W, (0, G * group_size - K))
    return W.reshape(N, G, group_size)


def group_params(W: torch.Tensor, bits: int, group_size: int, shrink=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, zero) [N, G]: scale fp16-representable (it is stored as fp16), zero an integer in 0..2^b-1.

    `shrink` (a float or an [N, G] tensor, 1 = none) scales the group's range before the grid is made.
    """
    Wg = _grouped(W.float(), group_size)
    xmin = Wg.amin(dim=-1).clamp(max=0)
    xmax = Wg.amax(dim=-1).clamp(min=0)
    if shrink is not None:
        xmin, xmax = xmin * shrink, xmax * shrink
    maxq = 2**bits - 1
    scale = ((xmax - xmin) / maxq).clamp(min=_MIN_SCALE).to(torch.float16).float()
    zero = torch.round(-xmin / scale).clamp(0, maxq)
    return scale, zero


def quantize_codes(W: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int, group_size: int) -> torch.Tensor:
    """Integer codes [N, K] (uint8) of W on the grid (scale, zero) [N, G]."""
    N, K = W.shape
    Wg = _grouped(W.float(), group_size)
    q = torch.clamp(torch.round(Wg / scale.unsqueeze(-1)) + zero.unsqueeze(-1), 0, 2**bits - 1)
    return q.reshape(N, -1)[:, :K].to(torch.uint8)


def dequantize_codes(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group_size: int) -> torch.Tensor:
    N, K = q.shape
    qg = _grouped(q.float(), group_size)
    return ((qg - zero.unsqueeze(-1)) * scale.unsqueeze(-1)).reshape(N, -1)[:, :K]


def fake_quantize(W: torch.Tensor, bits: int, group_size: int, shrink=None) -> torch.Tensor:
    """W rounded to its group grid and back, in fp32."""
    scale, zero = group_params(W, bits, group_size, shrink)
    return dequantize_codes(quantize_codes(W, scale, zero, bits, group_size), scale, zero, group_size)


@dataclass
class AWQResult:
    """One quantized Linear: codes q [N, K] (uint8), scales and zeros [N, G]."""

    q: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor
    group_size: int
    rel_error: float | None = None

    def dequantize(self, dtype=torch.float32) -> torch.Tensor:
        return dequantize_codes(self.q, self.scales, self.zeros, self.group_size).to(dtype)


def quantize_weight(W: torch.Tensor, cfg: AWQConfig, shrink=None) -> AWQResult:
    scale, zero = group_params(W, cfg.bits, cfg.group_size, shrink)
    return AWQResult(quantize_codes(W, scale, zero, cfg.bits, cfg.group_size), scale, zero, cfg.group_size)


# ---- the scale search -----------------------------------------------------------------------------------

def weight_magnitude(weights: list[torch.Tensor], group_size: int) -> torch.Tensor:
    """Mean over output rows of |w| / max|w| of its group, per input channel (AutoAWQ's duo-scaling w_mean)."""
    W = torch.cat([w.float() for w in weights], dim=0)
    Wg = _grouped(W.abs(), group_size)
    rel = Wg / (Wg.amax(dim=-1, keepdim=True) + 1e-6)
    return rel.reshape(W.shape[0], -1)[:, : W.shape[1]].mean(dim=0)


def candidate_scales(x_mean: torch.Tensor, alpha: float, w_mean: torch.Tensor | None = None) -> torch.Tensor:
    s = x_mean.float().clamp(min=1e-8).pow(alpha)
    if w_mean is not None:
        s = s / (w_mean.float().pow(1 - alpha) + 1e-4)
    s = s.clamp(min=1e-4)
    s = s / (s.max() * s.min()).sqrt()
    return torch.where(torch.isfinite(s), s, torch.ones_like(s))


@dataclass
class ScaleChoice:
    scales: torch.Tensor  # [K], multiply weight columns, divide the input
    alpha: float
    loss: float  # loss at the chosen alpha
    rtn_loss: float  # loss at alpha = 0 (plain round-to-nearest)


@torch.no_grad()
def search_scales(weights: list[torch.Tensor], x_mean: torch.Tensor, loss_fn: Callable[[list[torch.Tensor]], float],
                  cfg: AWQConfig) -> ScaleChoice:
    """The α on the grid whose scales s give the least loss_fn([Q(W·s)/s for W in weights]).

    `loss_fn` receives candidate weights (fp32, nn.Linear layout, to be used on the *unscaled* input) and
    returns the output error they cause; the caller decides what output (a module's, or a Linear's via H).
    """
    w_mean = weight_magnitude(weights, cfg.group_size) if cfg.duo_scaling else None
    best = None
    rtn_loss = float("nan")
    for i in range(cfg.n_grid):
        alpha = i / cfg.n_grid
        s = candidate_scales(x_mean, alpha, w_mean).to(weights[0].device)
        cands = [fake_quantize(w.float() * s, cfg.bits, cfg.group_size) / s for w in weights]
        loss = loss_fn(cands)
        if i == 0:
            rtn_loss = loss
        if math.isfinite(loss) and (best is None or loss < best.loss):
            best = ScaleChoice(s, alpha, loss, rtn_loss)
    if best is None:  # every candidate overflowed: keep the layer as it is
        ones = torch.ones_like(x_mean, dtype=torch.float32)
        return ScaleChoice(ones, 0.0, rtn_loss, rtn_loss)
    best.rtn_loss = rtn_loss
    return best


def hessian_loss(weights: list[torch.Tensor], H: torch.Tensor) -> Callable[[list[torch.Tensor]], float]:
    """loss_fn for Linears alone: Σ ||(W' - W) X||² = Σ tr(ΔW H ΔWᵀ), with H ∝ X Xᵀ over all tokens."""
    refs = [w.float() for w in weights]

    def loss(cands: list[torch.Tensor]) -> float:
        total = 0.0
        for c, w in zip(cands, refs):
            d = c - w
            total += torch.sum((d @ H) * d).item()
        return total

    return loss


# ---- the clipping search --------------------------------------------------------------------------------

@torch.no_grad()
def search_clip(W: torch.Tensor, H: torch.Tensor, cfg: AWQConfig) -> torch.Tensor:
    """Per-group shrink factors [N, G] minimising Δw_g H_gg Δw_gᵀ (H: the Linear's input second moment)."""
    W = W.float()
    N, K = W.shape
    gs = cfg.group_size
    G = math.ceil(K / gs)
    Hp = torch.nn.functional.pad(H.float(), (0, G * gs - K, 0, G * gs - K))
    Hg = torch.stack([Hp[g * gs:(g + 1) * gs, g * gs:(g + 1) * gs] for g in range(G)])  # [G, gs, gs]
    Wg = _grouped(W, gs)
    best_err = torch.full((N, G), float("inf"), device=W.device)
    best_p = torch.ones(N, G, device=W.device)
    steps = int(round(cfg.max_shrink * cfg.n_grid))
    for i in range(steps):
        p = 1 - i / cfg.n_grid
        d = _grouped(fake_quantize(W, cfg.bits, gs, shrink=p), gs) - Wg  # [N, G, gs]
        err = torch.einsum("ngi,gij,ngj->ng", d, Hg, d)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_p = torch.where(better, torch.full_like(best_p, p), best_p)
    return best_p
