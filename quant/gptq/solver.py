"""The per-layer GPTQ solver (Frantar et al. 2022) and round-to-nearest, sharing one grid and one result type.

Algorithm details follow docs/quantized-formats.md section C; the error-feedback loop itself is shared with AWQ's
rounding (`quant.feedback`). Everything works on W in nn.Linear layout [out, in] = [N, K] and returns integer
codes in that layout; `quant.gptq.pack` transposes when packing.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch

from quant.feedback import column_loop, cpu_threads, inverse_cholesky, relative_error, solver_inputs
from quant.grid import VALID_BITS, GridSpec, dequantize, find_params, quantize
from quant.moe.calibration import expert_min_tokens_setting
from quant.settings import check, setting

METHODS = ("gptq", "rtn")  # how codes are found: the GPTQ solver on calibration data, or round-to-nearest

# The settings whose default depends on the method. For GPTQ, act-order + the clipping search + a quarter of the
# Hessian's off-diagonal shrunk had the smallest perplexity gap of every symmetric GPTQ measured on SmolLM2-135M,
# in and out of the calibration domain (README "quant awq": out-of-domain mean gap ratio 0.38 against 1.16 for GPTQ
# as published; 4-bit g64 Hamlet ppl 34.49 against 41.73). Round-to-nearest stays plain min-max rounding.
METHOD_DEFAULTS = {"gptq": {"desc_act": True, "mse": 2.4, "decorrelate": 0.25},
                   "rtn": {"desc_act": False, "mse": 0.0, "decorrelate": 0.0}}
# Frantar et al. 2022: columns in natural order, the min-max grid, the Hessian as measured.
PUBLISHED = {"desc_act": False, "mse": 0.0, "decorrelate": 0.0}


def _group_size_ok(gs: int) -> bool:
    return gs == -1 or (gs >= 16 and not gs & (gs - 1))


@dataclass
class GPTQConfig:
    """Everything that decides the quantized weights; it is also what ends up in quantization_config. The defaults
    are `quant gptq`'s (the measured ones, METHOD_DEFAULTS); `published()` gives the paper's."""

    bits: int = setting(4, "bits per weight: 2, 3, 4 or 8", valid=lambda b: b in VALID_BITS,
                        rule="bits must be one of 2, 3, 4, 8 (got {value})")
    group_size: int = setting(128, "input channels per scale/zero; -1 for one group per row",
                              valid=_group_size_ok,
                              rule="group size must be -1 (one group per row) or a power of two >= 16 (got {value})")
    desc_act: bool | None = setting(None, "act-order: quantize columns by decreasing Hessian diagonal (default for "
                                    "--method gptq; on SmolLM2 4-bit g64 it halves the perplexity gap of plain GPTQ; "
                                    "meaningless for rtn)", type=bool)
    static_groups: bool = setting(False, "with act-order: fix each group's grid in the original channel order "
                                  "before quantizing (g_idx stays k // group size)")
    sym: bool = setting(True, "symmetric grid (--no-sym or --asym: zero points, written as gptq_v2)")
    damp_percent: float = setting(0.01, "damping, fraction of the mean Hessian diagonal (raised automatically when "
                                  "the Cholesky fails)", flag="--damp", valid=lambda d: 0 < d < 1,
                                  rule="damp must be in (0, 1), a fraction of the mean Hessian diagonal (got {value})")
    damp_auto_increment: float = 0.01
    block_size: int = 128
    mse: float | None = setting(None, f"clipping search norm; 0 = min-max (default: {METHOD_DEFAULTS['gptq']['mse']} "
                                "for --method gptq, which had the smallest perplexity gap of our symmetric GPTQ both "
                                "in and out of the calibration domain on SmolLM2 (README); 0 for rtn)", type=float,
                                valid=lambda m: m >= 0,
                                rule="mse must be >= 0 (0 = plain min-max grid; got {value})")
    # Shrinks the Hessian's off-diagonal toward 0 by this fraction before solving (quant.feedback.decorrelated).
    decorrelate: float | None = setting(None, "shrink the Hessian's off-diagonal by this fraction, 0..1 (default: "
                                        f"{METHOD_DEFAULTS['gptq']['decorrelate']} for gptq: best in and out of the "
                                        "calibration domain, README 'quant awq'; 0 = GPTQ as published, 1 = "
                                        "round-to-nearest)", type=float,
                                        valid=lambda d: 0 <= d <= 1, rule="decorrelate must be in [0, 1] (got {value})")
    true_sequential: bool = setting(True, "quantize a block's Linears group by group (q/k/v, o, gate/up, down), "
                                    "each on the outputs of the groups already quantized")
    method: str = setting(METHODS[0], "gptq: the solver on --calib data; rtn: round-to-nearest, no calibration",
                          choices=METHODS)
    expert_min_tokens: int = expert_min_tokens_setting()

    def __post_init__(self):
        for key, value in METHOD_DEFAULTS.get(self.method, METHOD_DEFAULTS["rtn"]).items():
            if getattr(self, key) is None:
                setattr(self, key, value)

    @classmethod
    def published(cls, **overrides) -> "GPTQConfig":
        """GPTQ as the paper runs it (PUBLISHED), with `overrides`."""
        return cls(**{**PUBLISHED, **overrides})

    def validate(self) -> "GPTQConfig":
        check(self)
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
