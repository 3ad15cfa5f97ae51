"""The per-layer GPTQ solver (Frantar et al. 2022) and round-to-nearest, sharing one grid and one result type.

Algorithm details follow docs/quantized-formats.md section C; the error-feedback loop itself is shared with AWQ's
rounding (`quant.feedback`). Everything works on W in nn.Linear layout [out, in] = [N, K] and returns integer
codes in that layout; `quant.gptq.pack` transposes when packing.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch

from quant.errors import UserError
from quant.feedback import column_loop, cpu_threads, inverse_cholesky, relative_error, solver_inputs
from quant.grid import VALID_BITS, GridSpec, dequantize, find_params, quantize

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


def gptq_quantize(W: torch.Tensor, H: torch.Tensor | None, cfg: GPTQConfig, name: str = "layer") -> QuantResult:
    """Quantize W [N, K] against the input Hessian H [K, K]; H None (or cfg.method 'rtn') means RTN."""
    with cpu_threads(W):
        return _gptq_quantize(W, H, cfg, name)


def _gptq_quantize(W, H, cfg: GPTQConfig, name: str) -> QuantResult:
    if H is None or cfg.method == "rtn":
        result = rtn_quantize(W, cfg)
        if H is not None:
            result.rel_error = relative_error(W, result.dequantize(), H)
        return result
    W_in, H_orig = W, H
    Wt, H = solver_inputs(W, H, cfg.decorrelate)
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

    Hinv, damp_used = inverse_cholesky(H, cfg.damp_percent, name, cfg.damp_auto_increment)
    del H

    proc_group = [0] * K  # group of the column at each processing position
    scale = zero = None
    if cfg.group_size == -1:
        scale, zero = find_params(Wt.T, spec)
        scales[0], zeros[0] = scale, zero
    perm_list = perm.tolist() if perm is not None else None

    column_loop(Wt, Hinv, Qt, scales, zeros, proc_group, scale, zero, static, perm_list, gs, cfg.block_size, spec,
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
