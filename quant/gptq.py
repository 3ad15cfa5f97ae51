"""The per-layer GPTQ solver (Frantar et al. 2022) and round-to-nearest, sharing one grid and one result type.

Algorithm details follow docs/quantized-formats.md section C. Everything works on W in nn.Linear layout
[out, in] = [N, K] and returns integer codes in that layout; `quant.formats.gptq_pack` transposes when packing.
"""

from __future__ import annotations

import logging
import math
from contextlib import contextmanager
from dataclasses import asdict, dataclass

import torch

from quant.errors import UserError
from quant.grid import VALID_BITS, GridSpec, dequantize, find_params, quantize

log = logging.getLogger(__name__)

METHODS = ("gptq", "rtn")  # how codes are found: the GPTQ solver on calibration data, or round-to-nearest


@dataclass
class GPTQConfig:
    """Everything that decides the quantized weights; it is also what ends up in quantization_config."""

    bits: int = 4
    group_size: int = 128
    desc_act: bool = False
    static_groups: bool = False
    sym: bool = True
    damp_percent: float = 0.01
    damp_auto_increment: float = 0.01
    block_size: int = 128
    mse: float = 0.0
    # Shrinks the Hessian's off-diagonal toward 0 by this fraction before solving: 0 is GPTQ as published, 1 keeps
    # only the diagonal (which makes GPTQ round-to-nearest). Correlations between input channels are the part of
    # the calibration statistics least likely to hold on other text.
    decorrelate: float = 0.0
    true_sequential: bool = True
    method: str = "gptq"

    def validate(self) -> "GPTQConfig":
        if self.bits not in VALID_BITS:
            raise UserError(f"bits must be one of {', '.join(map(str, VALID_BITS))} (got {self.bits})")
        gs = self.group_size
        if gs != -1 and (gs < 16 or gs & (gs - 1)):
            raise UserError(f"group size must be -1 (one group per row) or a power of two >= 16 (got {gs})")
        if not 0 < self.damp_percent < 1:
            raise UserError(f"damp must be in (0, 1), a fraction of the mean Hessian diagonal (got {self.damp_percent})")
        if self.method not in METHODS:
            raise UserError(f"method must be one of {', '.join(METHODS)} (got {self.method!r})")
        if not 0 <= self.decorrelate <= 1:
            raise UserError(f"decorrelate must be in [0, 1] (got {self.decorrelate})")
        if self.mse < 0:
            raise UserError(f"mse must be >= 0 (0 = plain min-max grid; got {self.mse})")
        return self

    @property
    def calibrated(self) -> bool:
        """Whether the method needs calibration data (GPTQ does, round-to-nearest does not)."""
        return self.method == METHODS[0]

    @property
    def grid(self) -> GridSpec:
        return GridSpec(bits=self.bits, sym=self.sym, mse=self.mse)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class QuantResult:
    """Integer codes q [N, K] (original channel order), per-group scales/zeros [G, N], g_idx [K]."""

    q: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor
    g_idx: torch.Tensor
    bits: int
    group_size: int
    # Relative output error on the calibration inputs, tr(dW H dWᵀ) / tr(W H Wᵀ); None for RTN without data.
    rel_error: float | None = None
    damp_percent: float | None = None

    def dequantize(self, dtype=torch.float32) -> torch.Tensor:
        g = self.g_idx.long()
        return dequantize(self.q.float(), self.scales[g].T, self.zeros[g].T).to(dtype)


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


def group_count(in_features: int, group_size: int) -> int:
    return 1 if group_size == -1 else math.ceil(in_features / group_size)


def _effective_group(in_features: int, group_size: int) -> int:
    return in_features if group_size == -1 else group_size


def rtn_quantize(W: torch.Tensor, cfg: GPTQConfig) -> QuantResult:
    """Round-to-nearest per group: GPTQ with H = I collapses to exactly this (see tests), done vectorised."""
    W = W.float()
    N, K = W.shape
    gs = _effective_group(K, cfg.group_size)
    G = group_count(K, cfg.group_size)
    spec = cfg.grid
    q = torch.empty(N, K, dtype=torch.uint8, device=W.device)
    scales = torch.empty(G, N, device=W.device)
    zeros = torch.empty(G, N, device=W.device)
    for g in range(G):
        cols = slice(g * gs, min((g + 1) * gs, K))
        s, z = find_params(W[:, cols], spec)
        q[:, cols] = quantize(W[:, cols], s.unsqueeze(1), z.unsqueeze(1), spec.maxq).to(torch.uint8)
        scales[g], zeros[g] = s, z
    g_idx = (torch.arange(K, device=W.device) // gs).to(torch.int32)
    return QuantResult(q, scales, zeros, g_idx, cfg.bits, cfg.group_size)


def _inverse_cholesky(H: torch.Tensor, cfg: GPTQConfig, name: str) -> tuple[torch.Tensor, float]:
    """Upper Cholesky factor of (H + damp·mean(diag H)·I)⁻¹, raising damp until H is numerically PD."""
    mean_diag = torch.mean(torch.diag(H)).item()
    damp = cfg.damp_percent
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
        damp += cfg.damp_auto_increment
        if damp >= 1.0:
            raise RuntimeError(f"{name}: Hessian not positive definite even with damp_percent {damp:.2f}")
        log.warning("%s: Cholesky failed, retrying with damp_percent %.3f", name, damp)


@contextmanager
def _cpu_threads(n: int | None):
    """The solver runs single-threaded on CPU: its ops are small, and on a busy 2-core box OpenMP
    synchronisation made rank-1 updates ~100x and cholesky_inverse ~10x slower with 2 threads."""
    if n is None:
        yield
        return
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def _column_loop(Wt, Hinv, Qt, scales, zeros, proc_group, scale, zero, static, perm_list, gs, bs, spec, grouped,
                 dither: torch.Generator | None = None):
    """The GPTQ main loop over columns (rows of Wt) in lazy blocks of `bs`, updating Wt in place. `dither`:
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


def _decorrelated(H: torch.Tensor, fraction: float) -> torch.Tensor:
    """H with its off-diagonal shrunk toward 0 by `fraction`, in place."""
    if fraction:
        diag = torch.diag(H).clone()
        H.mul_(1 - fraction)
        H.diagonal().copy_(diag)
    return H


def _solver_inputs(W: torch.Tensor, H: torch.Tensor, decorrelate: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Wᵀ [K, N] in fp32 and a decorrelated fp32 copy of H, with dead input channels (never active in calibration)
    zeroed in W and given a unit diagonal so that H stays invertible. The solver walks columns of W; holding Wᵀ
    makes each a contiguous row, which makes the per-column rank-1 update an order of magnitude faster on CPU
    than strided column slices."""
    Wt = W.detach().float().T.contiguous()
    H = _decorrelated(H.float().clone(), decorrelate)
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    Wt[dead] = 0
    return Wt, H


def gptq_quantize(W: torch.Tensor, H: torch.Tensor | None, cfg: GPTQConfig, name: str = "layer") -> QuantResult:
    """Quantize W [N, K] against the input Hessian H [K, K]; H None (or cfg.method 'rtn') means RTN."""
    with _cpu_threads(1 if W.device.type == "cpu" else None):
        return _gptq_quantize(W, H, cfg, name)


def _gptq_quantize(W, H, cfg: GPTQConfig, name: str) -> QuantResult:
    if H is None or cfg.method == "rtn":
        result = rtn_quantize(W, cfg)
        if H is not None:
            result.rel_error = relative_error(W, result.dequantize(), H)
        return result
    W_in, H_orig = W, H
    Wt, H = _solver_inputs(W, H, cfg.decorrelate)
    K, N = Wt.shape
    spec = cfg.grid
    gs = _effective_group(K, cfg.group_size)
    G = group_count(K, cfg.group_size)
    dev = Wt.device

    Qt = torch.zeros(K, N, dtype=torch.uint8, device=dev)
    scales = torch.zeros(G, N, device=dev)
    zeros = torch.zeros(G, N, device=dev)
    static = None
    if cfg.static_groups and cfg.group_size != -1:
        # Groups fixed in original channel order, before any permutation (doc C "static_groups").
        static = [find_params(Wt[g * gs : min((g + 1) * gs, K)].T, spec) for g in range(G)]
        for g, (scale, zero) in enumerate(static):
            scales[g], zeros[g] = scale, zero

    perm = None
    if cfg.desc_act:
        perm = torch.argsort(torch.diag(H), descending=True)
        Wt, H = Wt[perm], H[perm][:, perm]

    Hinv, damp_used = _inverse_cholesky(H, cfg, name)
    del H

    proc_group = [0] * K  # group of the column at each processing position
    scale = zero = None
    if cfg.group_size == -1:
        scale, zero = find_params(Wt.T, spec)
        scales[0], zeros[0] = scale, zero
    perm_list = perm.tolist() if perm is not None else None

    _column_loop(Wt, Hinv, Qt, scales, zeros, proc_group, scale, zero, static, perm_list, gs, cfg.block_size, spec,
                 grouped=cfg.group_size != -1)
    del Hinv, Wt

    if static is not None:
        g_idx = torch.arange(K, device=dev) // gs
    else:
        g_idx = torch.tensor(proc_group, device=dev)
    if perm is not None:
        invperm = torch.argsort(perm)
        Qt = Qt[invperm]
        if static is None:
            g_idx = g_idx[invperm]
    result = QuantResult(Qt.T, scales, zeros, g_idx.to(torch.int32), cfg.bits, cfg.group_size, damp_percent=damp_used)
    result.rel_error = relative_error(W_in, result.dequantize(), H_orig)
    return result


def round_on_grid(W: torch.Tensor, H: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group_size: int,
                  bits: int, damp_percent: float = 0.01, name: str = "layer",
                  dither: torch.Generator | None = None, decorrelate: float = 0.0) -> torch.Tensor:
    """GPTQ's error-feedback rounding of W [N, K] onto a grid chosen beforehand (another method's: AWQ's), scale
    and zero [N, G] per group of `group_size` input columns in natural order; codes [N, K] uint8.

    Columns are processed in act-order (groups stay fixed, so no g_idx is needed). Rounding each weight to its
    nearest code is what loses a small change such as a merged LoRA delta when the grid is the one the weights
    came from: they snap back. Here each column's rounding error is pushed onto the columns not yet rounded,
    weighted by H, so the layer's outputs keep the change even though most single weights cannot."""
    cfg = GPTQConfig(bits=bits, group_size=group_size, sym=False, damp_percent=damp_percent).validate()
    with _cpu_threads(1 if W.device.type == "cpu" else None):
        Wt, H = _solver_inputs(W, H, decorrelate)
        K, N = Wt.shape
        static = [(scale[:, g].float(), zero[:, g].float()) for g in range(scale.shape[1])]
        perm = torch.argsort(torch.diag(H), descending=True)
        Wt, H = Wt[perm], H[perm][:, perm]
        Hinv, _ = _inverse_cholesky(H, cfg, name)
        del H
        Qt = torch.zeros(K, N, dtype=torch.uint8, device=Wt.device)
        unused = torch.zeros(len(static), N, device=Wt.device)  # the loop records parameters only when it picks them
        _column_loop(Wt, Hinv, Qt, unused, unused.clone(), [0] * K, None, None, static, perm.tolist(), group_size,
                     cfg.block_size, cfg.grid, grouped=True, dither=dither)
        return Qt[torch.argsort(perm)].T.contiguous()


def relative_error(W: torch.Tensor, Wq: torch.Tensor, H: torch.Tensor) -> float:
    """||(W - Wq) X||² / ||W X||² on the calibration inputs, computed through H ∝ X Xᵀ."""
    W, Wq, H = W.float(), Wq.float().to(W.device), H.to(W.device)
    dW = W - Wq
    num = torch.sum((dW @ H) * dW).item()
    den = torch.sum((W @ H) * W).item()
    return num / den if den > 0 else float("nan")
