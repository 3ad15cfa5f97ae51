"""Second-order error feedback (the core of GPTQ, Frantar et al. 2022), shared by the methods that round with it.

A Linear's output error on its calibration inputs X is ||(W - Q) X||², a quadratic form in H ∝ X Xᵀ. Rounding
the columns of W one at a time and pushing each column's rounding error onto the columns not yet rounded,
weighted by the inverse Hessian, lowers that error far below rounding each weight to its nearest code. GPTQ runs
this loop with grids it picks on the way (`quant.gptq.solver`); AWQ runs it on the grid its own search chose
(`round_on_grid`), with nearest or dithered rounding. Details follow docs/quantized-formats.md section C.

Everything works on W in nn.Linear layout [out, in] = [N, K]; the loop walks Wᵀ, whose columns are then
contiguous rows.
"""

from __future__ import annotations

import logging
import math
from contextlib import contextmanager

import torch

from quant.grid import GridSpec, dequantize, find_params, quantize

log = logging.getLogger(__name__)

BLOCK_SIZE = 128  # columns per lazy batch of the update (GPTQ's default; only speed depends on it)
DAMP_INCREMENT = 0.01  # how much damping a failed Cholesky adds before retrying (GPTQModel's default)


class HessianAccumulator:
    """Running H = (2/n) Σ x xᵀ over calibration tokens (n counts tokens), kept in fp32 on x's device."""

    def __init__(self, in_features: int, device):
        self.H = torch.zeros(in_features, in_features, dtype=torch.float32, device=device)
        self.n = 0

    def add(self, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1])
        t = x.shape[0]
        if t == 0:
            return
        self.H.mul_(self.n / (self.n + t))
        self.n += t
        # Scale a copy of x, never x itself: it is the live input of the layer being observed.
        x = x.float() * math.sqrt(2 / self.n)
        self.H.addmm_(x.T, x)

    @property
    def hessian(self) -> torch.Tensor | None:
        """H, or None when no calibration token reached the layer."""
        return self.H if self.n > 0 else None


def relative_error(W: torch.Tensor, Wq: torch.Tensor, H: torch.Tensor | None) -> float:
    """||(W - Wq) X||² / ||W X||² on the calibration inputs, computed through H ∝ X Xᵀ; without H (data-free)
    the weight-space error ||W - Wq||² / ||W||²."""
    W, Wq = W.float(), Wq.float().to(W.device)
    dW = W - Wq
    if H is None:
        return (dW.pow(2).sum() / W.pow(2).sum().clamp(min=1e-30)).item()
    H = H.to(W.device)
    num = torch.sum((dW @ H) * dW).item()
    den = torch.sum((W @ H) * W).item()
    return num / den if den > 0 else float("nan")


def inverse_cholesky(H: torch.Tensor, damp_percent: float, name: str,
                     increment: float = DAMP_INCREMENT) -> tuple[torch.Tensor, float]:
    """Upper Cholesky factor of (H + damp·mean(diag H)·I)⁻¹, raising damp until H is numerically PD."""
    mean_diag = torch.mean(torch.diag(H)).item()
    damp = damp_percent
    idx = torch.arange(H.shape[0], device=H.device)
    while True:
        Hd = H.clone()
        Hd[idx, idx] += damp * mean_diag
        L, info = torch.linalg.cholesky_ex(Hd)
        if info.item() == 0:
            Hinv = torch.cholesky_inverse(L)
            U, info = torch.linalg.cholesky_ex(Hinv, upper=True)
            if info.item() == 0:
                return U, damp
        damp += increment
        if damp >= 1.0:
            raise RuntimeError(f"{name}: Hessian not positive definite even with damp_percent {damp:.2f}")
        log.warning("%s: Cholesky failed, retrying with damp_percent %.3f", name, damp)


@contextmanager
def cpu_threads(W: torch.Tensor):
    """The solvers run single-threaded on CPU: their ops are small, and on a busy 2-core box OpenMP
    synchronisation made rank-1 updates ~100x and cholesky_inverse ~10x slower with 2 threads."""
    old = torch.get_num_threads()
    if W.device.type == "cpu":
        torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def decorrelated(H: torch.Tensor, fraction: float) -> torch.Tensor:
    """H with its off-diagonal shrunk toward 0 by `fraction`, in place: 0 is GPTQ as published, 1 keeps only the
    diagonal (which makes the feedback round-to-nearest). Correlations between input channels are the part of the
    calibration statistics least likely to hold on other text."""
    if fraction:
        diag = torch.diag(H).clone()
        H.mul_(1 - fraction)
        H.diagonal().copy_(diag)
    return H


def solver_inputs(W: torch.Tensor, H: torch.Tensor, decorrelate: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Wᵀ [K, N] in fp32 and a decorrelated fp32 copy of H, with dead input channels (never active in calibration)
    zeroed in W and given a unit diagonal so that H stays invertible. The solver walks columns of W; holding Wᵀ
    makes each a contiguous row, which makes the per-column rank-1 update an order of magnitude faster on CPU
    than strided column slices."""
    Wt = W.detach().float().T.contiguous()
    H = decorrelated(H.float().clone(), decorrelate)
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    Wt[dead] = 0
    return Wt, H


def column_loop(Wt, Hinv, Qt, scales, zeros, proc_group, scale, zero, static, perm_list, gs, bs, spec, grouped,
                dither: torch.Generator | None = None):
    """The main loop over columns (rows of Wt) in lazy blocks of `bs`, updating Wt in place. `static`: one fixed
    (scale, zero) per group in original channel order (`perm_list` maps processing position to channel); else
    a grouped loop picks each group's grid from the error-updated columns when it reaches the group. `dither`:
    round each weight up with probability equal to its distance from the code below (unbiased), not to nearest."""
    K = Wt.shape[0]
    for i1 in range(0, K, bs):
        i2 = min(i1 + bs, K)
        W1 = Wt[i1:i2].clone()
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            if grouped:
                if static is not None:
                    g = (perm_list[col] if perm_list else col) // gs
                    scale, zero = static[g]
                elif col % gs == 0:
                    g = col // gs
                    # Parameters from the current (error-updated) values: in-block columns live in W1.
                    end = min(col + gs, K)
                    chunk = W1[i : end - i1] if end <= i2 else torch.cat([W1[i:], Wt[i2:end]])
                    scale, zero = find_params(chunk.T, spec)
                    scales[g], zeros[g] = scale, zero
                proc_group[col] = g
            w = W1[i]
            if dither is None:
                q = quantize(w, scale, zero, spec.maxq)
            else:
                u = torch.rand(w.shape, generator=dither, device="cpu").to(w.device)
                q = torch.clamp(torch.floor(w / scale + u) + zero, 0, spec.maxq)
            Qt[col] = q.to(torch.uint8)
            err = (w - dequantize(q, scale, zero)).div_(Hinv1[i, i])
            W1[i:].addr_(Hinv1[i, i:], err, alpha=-1)
            Err1[i] = err
        Wt[i2:].addmm_(Hinv[i1:i2, i2:].T, Err1, alpha=-1)


def round_on_grid(W: torch.Tensor, H: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group_size: int,
                  bits: int, damp_percent: float = 0.01, name: str = "layer",
                  dither: torch.Generator | None = None, decorrelate: float = 0.0) -> torch.Tensor:
    """Error-feedback rounding of W [N, K] onto a grid chosen beforehand (another method's: AWQ's), scale and
    zero [N, G] per group of `group_size` input columns in natural order; codes [N, K] uint8.

    Columns are processed in act-order (groups stay fixed, so no g_idx is needed). Rounding each weight to its
    nearest code is what loses a small change such as a merged LoRA delta when the grid is the one the weights
    came from: they snap back. Here each column's rounding error is pushed onto the columns not yet rounded,
    weighted by H, so the layer's outputs keep the change even though most single weights cannot."""
    with cpu_threads(W):
        Wt, H = solver_inputs(W, H, decorrelate)
        K, N = Wt.shape
        static = [(scale[:, g].float(), zero[:, g].float()) for g in range(scale.shape[1])]
        perm = torch.argsort(torch.diag(H), descending=True)
        Wt, H = Wt[perm], H[perm][:, perm]
        Hinv, _ = inverse_cholesky(H, damp_percent, name)
        del H
        Qt = torch.zeros(K, N, dtype=torch.uint8, device=Wt.device)
        unused = torch.zeros(len(static), N, device=Wt.device)  # the loop records parameters only when it picks them
        column_loop(Wt, Hinv, Qt, unused, unused.clone(), [0] * K, None, None, static, perm.tolist(), group_size,
                    BLOCK_SIZE, GridSpec(bits=bits, sym=False), grouped=True, dither=dither)
        return Qt[torch.argsort(perm)].T.contiguous()
