"""The scale searches of ggml's reference quantizers (ggml-quants.c), vectorised over blocks.

Every function takes B independent blocks as rows of a float32 tensor [B, n] and runs ggml's per-block search
for all of them at once: the candidate loops stay loops, the blocks become the vector dimension. Where ggml
updates a block's state only when a candidate wins, `torch.where` does the same per row.

Rounding follows ggml: `nearest_int` rounds half to even (torch.round); the reference Q8_0 uses C `roundf`
(half away from zero, `round_away`).
"""

from __future__ import annotations

import numpy as np
import torch

GROUP_MAX_EPS = 1e-15  # ggml treats a block whose largest magnitude is below this as all zero


def f32(*terms: float) -> float:
    """Sum of `terms` (products written as tuples) rounded step by step in float32, as ggml's C computes its grid
    constants (e.g. `rmin + rdelta*is + nmax`); a double-precision constant can differ in the last bit."""
    total = np.float32(0)
    for t in terms:
        total = np.float32(total + (np.float32(t[0]) * np.float32(t[1]) if isinstance(t, tuple) else np.float32(t)))
    return float(total)


def round_away(v: torch.Tensor) -> torch.Tensor:
    """C roundf: halves round away from zero."""
    return torch.sign(v) * torch.floor(v.abs() + 0.5)


def over(c: float, t: torch.Tensor) -> torch.Tensor:
    """c / t divided element by element. (torch computes `c / t` as c·(1/t), which rounds differently from C's
    division in a quarter of the cases, and moves values that land on .5 across a rounding boundary.)"""
    return torch.full_like(t, c).div_(t)


def _safe(den: torch.Tensor) -> torch.Tensor:
    return torch.where(den == 0, torch.ones_like(den), den)


def signed_max(x: torch.Tensor) -> torch.Tensor:
    """The element of largest magnitude of each row, with its sign ([B])."""
    return x.gather(-1, x.abs().argmax(dim=-1, keepdim=True)).squeeze(-1)


def symmetric(x: torch.Tensor, nmax: int, weights: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """ggml `make_qx_quants` with rmse_type 1: codes l in [-nmax, nmax-1], the scale that minimises the weighted
    squared error for them, tried at 19 grid stretches around -nmax/max.

    `weights` default to x² (ggml's choice without an importance matrix). Returns (scale [B], codes + nmax [B, n]
    as float in [0, 2·nmax-1]); an all-zero block gets scale 0 and codes 0.
    """
    w = x * x if weights is None else weights
    xmax = signed_max(x)
    zero = xmax.abs() < GROUP_MAX_EPS
    xmax = torch.where(zero, torch.ones_like(xmax), xmax)

    def attempt(stretch: float):
        iscale = over(-stretch, xmax).unsqueeze(-1)
        l = torch.round(iscale * x).clamp_(-nmax, nmax - 1)
        return l, (w * x * l).sum(-1), (w * l * l).sum(-1)

    L, sumlx, suml2 = attempt(float(nmax))
    scale = torch.where(suml2 > 0, sumlx / _safe(suml2), torch.zeros_like(suml2))
    best = scale * sumlx
    for step in range(-9, 10):
        if step == 0:
            continue
        l, slx, sl2 = attempt(f32(nmax, (0.1, step)))
        better = (sl2 > 0) & (slx * slx > best * sl2)
        L = torch.where(better.unsqueeze(-1), l, L)
        scale = torch.where(better, slx / _safe(sl2), scale)
        best = torch.where(better, scale * slx, best)
    L = torch.where(zero.unsqueeze(-1), torch.zeros_like(L), L + nmax)
    return torch.where(zero, torch.zeros_like(scale), scale), L


def asymmetric(x: torch.Tensor, weights: torch.Tensor, nmax: int, rmin: float, rdelta: float, nstep: int
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """ggml `make_qkx2_quants` / `make_qkx3_quants` (squared error): codes in [0, nmax] for x ≈ scale·l − min with
    min ≥ 0, starting from the min/max grid and trying nstep+1 grid widths (rmin + rdelta·i + nmax)/(max − min),
    each refined by the weighted least-squares (scale, min) for its codes. A winning candidate's min becomes the
    origin of the next candidates' grid, as in ggml.

    Returns (scale [B], min [B] (the positive offset, ggml's `the_min`), codes [B, n] as float).
    """
    lo = x.amin(-1).clamp(max=0)
    hi = x.amax(-1)
    flat = hi <= lo
    sum_w = weights.sum(-1)
    sum_x = (weights * x).sum(-1)
    width = torch.where(flat, torch.ones_like(hi), hi - lo)
    iscale = over(nmax, width)
    scale = 1 / iscale
    L = torch.round(iscale.unsqueeze(-1) * (x - lo.unsqueeze(-1))).clamp_(0, nmax)
    best = (weights * (scale.unsqueeze(-1) * L + lo.unsqueeze(-1) - x) ** 2).sum(-1)
    cur_min = lo
    for step in range(nstep + 1):
        isc = over(f32(rmin, (rdelta, step), nmax), _safe(hi - cur_min))
        l = (x - cur_min.unsqueeze(-1)).mul_(isc.unsqueeze(-1)).round_().clamp_(0, nmax)
        wl = weights * l
        sum_l = wl.sum(-1)
        sum_l2 = (wl * l).sum(-1)
        sum_xl = wl.mul_(x).sum(-1)
        D = sum_w * sum_l2 - sum_l * sum_l
        this_scale = (sum_w * sum_xl - sum_x * sum_l) / _safe(D)
        this_min = (sum_l2 * sum_x - sum_l * sum_xl) / _safe(D)
        positive = this_min > 0
        this_min = torch.where(positive, torch.zeros_like(this_min), this_min)
        this_scale = torch.where(positive, sum_xl / _safe(sum_l2), this_scale)
        r = (l * this_scale.unsqueeze(-1)).add_(this_min.unsqueeze(-1)).sub_(x)
        err = r.square_().mul_(weights).sum(-1)
        better = (D > 0) & (err < best) & ~flat
        L = torch.where(better.unsqueeze(-1), l, L)
        best = torch.where(better, err, best)
        scale = torch.where(better, this_scale, scale)
        cur_min = torch.where(better, this_min, cur_min)
    L = torch.where(flat.unsqueeze(-1), torch.zeros_like(L), L)
    return torch.where(flat, torch.zeros_like(scale), scale), -cur_min, L


def positive_scales(x: torch.Tensor, nmax: int, weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """ggml `make_qp_quants`: quantize the non-negative values x (a super-block's sub-block scales or mins) to
    codes in [0, nmax] with one scale: the best of 9 grid stretches by weighted squared error, then up to 5
    sweeps that move single codes while that improves the least-squares fit. Returns (scale [B], codes [B, n]).
    """
    xmax = x.amax(-1)
    zero = xmax < GROUP_MAX_EPS
    xmax = torch.where(zero, torch.ones_like(xmax), xmax)
    iscale = over(nmax, xmax)
    L = torch.round(iscale.unsqueeze(-1) * x)
    best = (weights * (x - (1 / iscale).unsqueeze(-1) * L) ** 2).sum(-1)
    for step in range(-4, 5):
        if step == 0:
            continue
        isc = over(f32((0.1, step), nmax), xmax)
        l = torch.round(isc.unsqueeze(-1) * x).clamp_(max=nmax)
        mse = (weights * (x - (1 / isc).unsqueeze(-1) * l) ** 2).sum(-1)
        better = mse < best
        best = torch.where(better, mse, best)
        iscale = torch.where(better, isc, iscale)
    L = torch.round(iscale.unsqueeze(-1) * x).clamp_(max=nmax)
    sumlx = (weights * x * L).sum(-1)
    suml2 = (weights * L * L).sum(-1)
    for _sweep in range(5):  # a block with nothing left to move stays put, so running every sweep is exact
        for i in range(x.shape[-1]):
            w, xi, li = weights[:, i], x[:, i], L[:, i]
            slx = sumlx - w * xi * li
            sl2 = suml2 - w * li * li
            ok = (slx > 0) & (sl2 > 0)
            new = torch.round(xi * sl2 / _safe(slx)).clamp_(max=nmax)
            slx_new = slx + w * xi * new
            sl2_new = sl2 + w * new * new
            accept = ok & (new != li) & (slx_new * slx_new * suml2 > sumlx * sumlx * sl2_new)
            L[:, i] = torch.where(accept, new, li)
            sumlx = torch.where(accept, slx_new, sumlx)
            suml2 = torch.where(accept, sl2_new, suml2)
    scale = torch.where(suml2 > 0, sumlx / _safe(suml2), torch.zeros_like(suml2))
    L = torch.where(zero.unsqueeze(-1), torch.zeros_like(L), L)
    return torch.where(zero, torch.zeros_like(scale), scale), L
