"""Block-by-block AWQ over a Hugging Face decoder model (the search itself is in quant.awq.solver).

Only one decoder block and the calibration activations live on the compute device at a time: the block walker
and the grouping of Linears by shared input are the shared ones (quant.blocks). Per block:

1. The Linears are grouped by shared input (q/k/v, o, gate/up, down for Llama), in call order. Each
   group's input must come from something the scales can be folded into: a norm whose output *is* that
   input (found by watching one forward), or, for o_proj / down_proj, the v_proj / up_proj whose output
   channels map one-to-one onto it. Every fold is checked before use: scaling by random powers of two
   (exact in floating point) must leave the block's output unchanged, else the group is left unscaled.
   So v -> o is used only without grouped-query attention. A Gemma-style norm multiplies by (1 + weight): its
   fold divides (1 + weight) by the scales (weight -> (1 + weight) / s - 1, AutoAWQ's Gemma fold), which the
   same check confirms; divided as a plain norm it would fail the check and leave the group unscaled.
2. One pass over the calibration samples records, per group, the input statistics (mean |x| and
   H = Σ x xᵀ over all tokens) and the inputs of the smallest module containing the group on
   `search_tokens` tokens. Then group by group, on the float block with earlier folds applied: the scale
   search (loss: that module's output error on those tokens; for a single Linear the exact error through
   H) and the fold, whose only effect inside the block is on the group's own input (x -> x / s), applied
   to its statistics directly.
3. Per Linear: the clipping search (not q/k: their errors pass through the softmax), the final
   quantization, and its relative output error on the calibration inputs, logged.
4. The quantized block produces the next block's inputs; its Linears become AWQLinear.
"""

from __future__ import annotations

import logging
import math
import time
import zlib
from dataclasses import dataclass, field

import torch
from torch import nn

from quant.arch import describe
from quant.awq.nn import AWQLinear
from quant.awq.solver import (AWQConfig, AWQResult, ScaleChoice, group_params, hessian_loss, quantize_weight,
                              search_clip, search_scales)
from quant.blocks import LayerLog, QuantReport, block_linears, drive_blocks, linear_groups, log_layer, run_block
from quant.feedback import HessianAccumulator, relative_error, round_on_grid
from quant.moe.calibration import expert_layers, log_fallbacks, too_few

log = logging.getLogger(__name__)

# A Linear whose output channels are the next group's input channels one-to-one (AutoAWQ's fc -> fc folds).
LINEAR_FOLDS = {"o_proj": "v_proj", "out_proj": "v_proj", "down_proj": "up_proj", "w2": "w3"}  # w2/w3: Mixtral's
# Clipping is not searched for these: their errors reach the output through q·k and the softmax.
NO_CLIP = ("q_proj", "k_proj", "query", "key", "Wqkv")


@dataclass
class AWQReport(QuantReport):
    scales: list[dict] = field(default_factory=list)  # per group: names, fold target, alpha, loss vs RTN

    def to_dict(self) -> dict:
        return {**super().to_dict(), "scales": self.scales}


@dataclass
class Fold:
    kind: str  # "norm" or "linear"
    name: str
    module: nn.Module
    offset: float = 0.0  # a norm multiplying by (offset + weight): Gemma's 1.0


def _lca(names: list[str]) -> str:
    """The deepest module containing all of `names` ('' = the block)."""
    parts = [n.split(".") for n in names]
    common = []
    for level in zip(*parts):
        if len(set(level)) > 1:
            break
        common.append(level[0])
    return ".".join(common)


def _norm_producers(block, linears, owners, h, kw) -> dict[str, tuple[str, nn.Module]]:
    """For each owner Linear, the weight-carrying non-Linear leaf module whose output is its input tensor."""
    outputs, inputs = [], {}
    candidates = [(n, m) for n, m in block.named_modules()
                  if not isinstance(m, nn.Linear) and not list(m.children())
                  and isinstance(getattr(m, "weight", None), torch.Tensor) and m.weight.dim() == 1]
    handles = [m.register_forward_hook(lambda _m, _a, out, n=n, m=m: outputs.append((n, m, out)))
               for n, m in candidates]
    handles += [linears[o].register_forward_pre_hook(lambda _m, a, o=o: inputs.setdefault(o, a[0])) for o in owners]
    try:
        run_block(block, h, kw)
    finally:
        for hd in handles:
            hd.remove()
    found = {}
    for o, x in inputs.items():
        for n, m, out in outputs:
            if out is x and m.weight.numel() == linears[o].in_features:
                found[o] = (n, m)
    return found


@torch.no_grad()
def _apply_fold(fold: Fold, group: list[nn.Linear], s: torch.Tensor) -> None:
    """Inputs of `group` become x / s and their weight columns W · s: the float output is unchanged."""
    m = fold.module
    s = s.to(device=m.weight.device, dtype=m.weight.dtype)
    if fold.kind == "norm" and fold.offset:
        m.weight.add_(fold.offset).div_(s).sub_(fold.offset)
    elif fold.kind == "norm":
        m.weight.div_(s)
    else:
        m.weight.div_(s.view(-1, 1))
    if getattr(m, "bias", None) is not None:
        m.bias.div_(s)
    for lin in group:
        lin.weight.mul_(s.view(1, -1))


@torch.no_grad()
def _fold_is_exact(block, fold: Fold, group: list[nn.Linear], h, kw) -> bool:
    """Fold random powers of two (exact in floating point) and check the block's output does not move
    (a right fold leaves it bit for bit or within rounding; a wrong one moves it by O(1) of the update)."""
    K = group[0].in_features
    g = torch.Generator().manual_seed(K)
    probe = torch.pow(2.0, torch.randint(-1, 2, (K,), generator=g).float())
    ref = run_block(block, h, kw).float()
    _apply_fold(fold, group, probe)
    try:
        out = run_block(block, h, kw).float()
    finally:
        _apply_fold(fold, group, 1 / probe)
    # Relative to the block's update, not its output: the residual stream would hide a wrong fold.
    update = (ref - h.float()).norm().clamp(min=1e-30)
    err = ((out - ref).norm() / update).item()
    return math.isfinite(err) and err < 1e-3  # bf16/fp16 GPU kernels may reassociate; wrong folds move it by O(0.1)


def _find_folds(block, linears, groups, owner, h, kw, norm_offset: float = 0.0) -> dict[str, Fold]:
    norms = _norm_producers(block, linears, [g[0] for g in groups], h, kw)
    folds = {}
    for group in groups:
        o = owner[group[0]]
        fold = None
        if o in norms:
            fold = Fold("norm", *norms[o], offset=norm_offset)
        elif len(group) == 1:
            parent, _, leaf = group[0].rpartition(".")
            prev = LINEAR_FOLDS.get(leaf)
            prev_name = f"{parent}.{prev}" if parent else prev
            if prev and prev_name in linears and linears[prev_name].out_features == linears[o].in_features:
                fold = Fold("linear", prev_name, linears[prev_name])
        if fold is not None and _fold_is_exact(block, fold, [linears[n] for n in group], h, kw):
            folds[o] = fold
        elif fold is not None:
            log.info("%s -> %s: folding scales would change the block's output; left unscaled", fold.name, group)
    return folds


@dataclass
class GroupInputs:
    """What one pass over the calibration samples records for a group of Linears sharing an input."""

    acc: HessianAccumulator  # H = (2/n) Σ x xᵀ over every token
    absum: torch.Tensor  # Σ |x| per channel
    lca: nn.Module  # the smallest module containing the group
    captured: list = field(default_factory=list)  # the LCA's (args, kwargs) on the search samples

    @property
    def x_mean(self) -> torch.Tensor:
        return self.absum / max(self.acc.n, 1)


def _collect(block, linears, groups, owner, hidden, kwargs_list, subset) -> list[GroupInputs]:
    """One pass over all samples for every group at once. Later folds need no second pass: a fold that passed
    _fold_is_exact changes no tensor of the block but its own group's input, which becomes x / s, and
    _search_group applies that to the group's statistics directly."""
    stats, handles, want = [], [], [False]
    for group in groups:
        lin = linears[owner[group[0]]]
        lca_name = _lca(group)
        lca = block.get_submodule(lca_name) if lca_name else block
        g = GroupInputs(HessianAccumulator(lin.in_features, lin.weight.device),
                        torch.zeros(lin.in_features, dtype=torch.float32, device=lin.weight.device), lca)
        stats.append(g)

        def on_input(_m, args, g=g):
            x = args[0].detach()
            g.acc.add(x)
            g.absum.add_(x.reshape(-1, x.shape[-1]).float().abs().sum(dim=0))

        def on_lca(_m, args, kwargs, g=g):
            if want[0]:
                g.captured.append((args, dict(kwargs)))

        handles.append(lin.register_forward_pre_hook(on_input))
        if not isinstance(lca, nn.Linear):  # a lone Linear's loss comes from H, not from forwards
            handles.append(lca.register_forward_pre_hook(on_lca, with_kwargs=True))
    try:
        for j, (h, kw) in enumerate(zip(hidden, kwargs_list)):
            want[0] = j in subset
            run_block(block, h, kw)
    finally:
        for hd in handles:
            hd.remove()
    return stats


def _first(out):
    return out[0] if isinstance(out, (tuple, list)) else out


def _module_loss(module, group_linears, captured):
    """loss_fn for search_scales: squared output error of `module` on its captured inputs."""
    refs = [_first(module(*a, **kw)).float() for a, kw in captured]

    def loss(cands):
        originals = [lin.weight.data for lin in group_linears]
        try:
            for lin, c in zip(group_linears, cands):
                lin.weight.data = c.to(lin.weight.dtype)
            return sum((_first(module(*a, **kw)).float() - r).pow(2).sum().item() for (a, kw), r in zip(captured, refs))
        finally:
            for lin, w in zip(group_linears, originals):
                lin.weight.data = w

    return loss


def _search_group(linears, group, fold, g: GroupInputs, cfg) -> ScaleChoice | None:
    """The scale search and fold of one group; afterwards g.acc.H is that of the now-scaled input."""
    if fold is None or not cfg.calibrated or g.acc.n == 0:
        return None
    group_linears = [linears[n] for n in group]
    weights = [lin.weight.data for lin in group_linears]
    single = isinstance(g.lca, nn.Linear)
    loss_fn = hessian_loss(weights, g.acc.H) if single else _module_loss(g.lca, group_linears, g.captured)
    choice = search_scales(weights, g.x_mean, loss_fn, cfg)
    s = choice.scales.to(weights[0].dtype).float()  # the value the fold will actually use
    _apply_fold(fold, group_linears, s)
    s = s.to(g.acc.H.device)
    g.acc.H.div_(s.view(-1, 1)).div_(s.view(1, -1))
    g.captured.clear()
    return choice


def _quantize_linear(name, lin: nn.Linear, acc: HessianAccumulator | None, cfg: AWQConfig, rtn: bool = False):
    """`rtn`: plain round-to-nearest on the same grid (an expert with too few calibration tokens, quant.moe)."""
    t0 = time.perf_counter()
    W = lin.weight.data
    H = acc.hessian if acc is not None else None
    clip = cfg.calibrated and cfg.clip and H is not None and not rtn and \
        not name.rpartition(".")[2].startswith(NO_CLIP)
    shrink = search_clip(W, H, cfg) if clip else None
    if cfg.rounding != "nearest" and H is not None and not rtn:
        scale, zero = group_params(W, cfg.bits, cfg.group_size, shrink)
        seed = zlib.crc32(name.encode())  # reproducible, and independent from layer to layer
        dither = torch.Generator().manual_seed(seed) if cfg.rounding == "dithered" else None
        q = round_on_grid(W, H, scale, zero, cfg.group_size, cfg.bits, name=name, dither=dither,
                          decorrelate=cfg.decorrelate)
        res = AWQResult(q, scale, zero, cfg.group_size)
    else:
        res = quantize_weight(W, cfg, shrink)
    Wq = res.dequantize()
    res.rel_error = relative_error(W, Wq, H)  # data-free (H None): the weight-space error
    lin.weight.data = Wq.to(W.dtype)  # the next block sees the quantized layer
    entry = LayerLog(name, lin.in_features, lin.out_features, res.rel_error, None, time.perf_counter() - t0)
    log_layer(entry, "  clipped" if clip else "")
    return res, entry


def _scale_entry(prefix, group, fold, choice: ScaleChoice | None) -> dict:
    e = {"layers": [f"{prefix}.{n}" for n in group], "fold": fold.name if fold else None}
    if choice is not None:
        ratio = choice.loss / choice.rtn_loss if choice.rtn_loss > 0 else float("nan")
        e.update(alpha=choice.alpha, loss_vs_rtn=ratio)
        log.info("%s.%s: alpha %.2f, output error %.3fx round-to-nearest's (scales folded into %s)", prefix,
                 ",".join(group), choice.alpha, ratio, fold.name)
    return e


def _quantize_block(block, prefix, hidden, kwargs_list, cfg, report, norm_offset=0.0) -> dict[str, AWQResult]:
    linears = block_linears(block)
    results: dict[str, AWQResult] = {}
    if hidden is None:  # data-free round-to-nearest
        for n, lin in linears.items():
            results[n], entry = _quantize_linear(f"{prefix}.{n}", lin, None, cfg)
            report.layers.append(entry)
        return results
    groups, owner = linear_groups(block, linears, hidden[0], kwargs_list[0], true_sequential=True)
    folds = _find_folds(block, linears, groups, owner, hidden[0], kwargs_list[0], norm_offset) \
        if cfg.calibrated else {}
    per_sample = hidden[0].shape[-2]
    n_search = min(len(hidden), max(1, math.ceil(cfg.search_tokens / per_sample)))
    subset = {round(i * len(hidden) / n_search) for i in range(n_search)}
    stats = _collect(block, linears, groups, owner, hidden, kwargs_list, subset)
    experts = expert_layers(block)
    few = too_few({n: g.acc.n for group, g in zip(groups, stats) for n in group if n in experts},
                  cfg.expert_min_tokens)
    for group, g in zip(groups, stats):
        fold = folds.get(owner[group[0]]) if not few.keys() & set(group) else None
        report.scales.append(_scale_entry(prefix, group, fold, _search_group(linears, group, fold, g, cfg)))
    for group, acc in zip(groups, [g.acc for g in stats]):
        for n in group:
            if acc.n == 0 and n not in few:
                log.warning("%s.%s: no calibration token reached this layer; using round-to-nearest", prefix, n)
            results[n], entry = _quantize_linear(f"{prefix}.{n}", linears[n], acc, cfg, rtn=n in few)
            report.layers.append(entry)
    fallback = log_fallbacks(prefix, few, cfg.expert_min_tokens)
    if fallback:
        report.fallbacks.append(fallback)
    return results


def quantize_blocks_awq(model: nn.Module, calib: list[torch.Tensor] | None, cfg: AWQConfig, device=None,
                        progress: bool = True, norm_offset: float | None = None) -> AWQReport:
    """Quantize every nn.Linear inside the decoder blocks of `model` in place (they become AWQLinear).

    `calib`: a list of [1, T] token id tensors (None is fine for cfg.method 'rtn'). `device`: where blocks
    are processed (default: where the model is); the model stays on its original device. `norm_offset`: the
    blocks' norms multiply by (norm_offset + weight) (default: as the model's family description says; a model
    without a config, the merge's one-layer walker, is told by its caller).
    """
    report = AWQReport(method=cfg.method)
    if norm_offset is None:
        config = getattr(model, "config", None)
        norm_offset = describe(config).family.norms.offset if config is not None else 0.0

    def quantize_block(block, name, hidden, kwargs_list):
        linears = block_linears(block)
        results = _quantize_block(block, name, hidden, kwargs_list, cfg, report, norm_offset)
        return {n: AWQLinear.from_codes(r.q, r.scales, r.zeros, r.group_size, bias=linears[n].bias)
                for n, r in results.items()}

    return drive_blocks(model, calib if cfg.calibrated else None, report, quantize_block, device=device,
                        desc=f"{cfg.method} {cfg.bits}-bit g{cfg.group_size}", progress=progress)
