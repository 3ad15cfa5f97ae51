"""Block-by-block GPTQ over a Hugging Face decoder model, on the shared block walker (`quant.blocks`).

Inside a block, `true_sequential` quantizes the Linears in groups that share an input (q/k/v, then o, then
gate/up, then down for Llama), so later groups see the already-quantized earlier ones. Collecting a group's
inputs stops the block's forward right after the group's last Linear has been reached, which keeps the extra
passes cheap.
"""

from __future__ import annotations

import dataclasses
import logging
import time

import torch
from torch import nn

from quant.blocks import LayerLog, QuantReport, Stop, block_linears, drive_blocks, linear_groups, log_layer, run_block
from quant.feedback import HessianAccumulator, relative_error
from quant.gptq.nn import GPTQLinear
from quant.gptq.pack import V1
from quant.gptq.solver import GPTQConfig, QuantResult, gptq_quantize
from quant.moe.calibration import expert_layers, log_fallbacks, too_few

log = logging.getLogger(__name__)


@torch.no_grad()
def _collect_hessians(block, linears, group, owner, hidden, kwargs_list, device):
    owners = [n for n in group if owner[n] == n]
    acc = {n: HessianAccumulator(linears[n].in_features, device) for n in owners}
    pending: set[str] = set()

    def make_hook(name):
        def hook(_mod, args):
            acc[name].add(args[0])
            pending.discard(name)
            if not pending:
                raise Stop
        return hook

    handles = [linears[n].register_forward_pre_hook(make_hook(n)) for n in owners]
    try:
        for h, kw in zip(hidden, kwargs_list):
            pending.update(owners)
            try:
                run_block(block, h, kw)
            except Stop:
                pass
    finally:
        for hd in handles:
            hd.remove()
    return {n: acc[owner[n]] for n in group}


def _solve(name, linear: nn.Linear, acc: HessianAccumulator | None, cfg: GPTQConfig,
           rtn: bool = False) -> tuple[QuantResult, LayerLog]:
    """`rtn`: round to nearest on the method's grid (an expert with too few calibration tokens, quant.moe)."""
    t0 = time.perf_counter()
    W = linear.weight.data
    H = acc.hessian if acc is not None else None
    if acc is not None and H is None and not rtn:
        log.warning("%s: no calibration token reached this layer; using round-to-nearest", name)
    res = gptq_quantize(W, H, dataclasses.replace(cfg, method="rtn") if rtn else cfg, name=name)
    if res.rel_error is None:  # data-free: report the weight-space error instead
        res.rel_error = relative_error(W, res.dequantize(), None)
    linear.weight.data = res.dequantize(dtype=W.dtype)  # later groups/blocks see the quantized layer
    entry = LayerLog(name, linear.in_features, linear.out_features, res.rel_error, res.damp_percent,
                     time.perf_counter() - t0)
    log_layer(entry)
    return res, entry


def quantize_blocks(model: nn.Module, calib: list[torch.Tensor] | None, cfg: GPTQConfig, device=None,
                    checkpoint_format: str = V1, progress: bool = True) -> QuantReport:
    """Quantize every nn.Linear inside the decoder blocks of `model` in place (they become GPTQLinear).

    `calib` is a list of [1, T] token id tensors; it may be None for `cfg.method == "rtn"`.
    `device` is where blocks are processed (default: where the model is); the model is returned on its
    original device.
    """
    report = QuantReport(method=cfg.method)

    def quantize_block(block, name, hidden, kwargs_list):
        linears = block_linears(block)
        results: dict[str, QuantResult] = {}
        if hidden is None:
            for n, lin in linears.items():
                results[n], entry = _solve(f"{name}.{n}", lin, None, cfg)
                report.layers.append(entry)
        elif linears:
            dev = next(block.parameters()).device
            groups, owner = linear_groups(block, linears, hidden[0], kwargs_list[0], cfg.true_sequential)
            experts, fell = expert_layers(block), {}
            for group in groups:
                accs = _collect_hessians(block, linears, group, owner, hidden, kwargs_list, dev)
                few = too_few({n: accs[n].n for n in group if n in experts}, cfg.expert_min_tokens)
                for n in group:
                    results[n], entry = _solve(f"{name}.{n}", linears[n], accs[n], cfg, rtn=n in few)
                    report.layers.append(entry)
                fell.update(few)
                del accs
            fallback = log_fallbacks(name, fell, cfg.expert_min_tokens)
            if fallback:
                report.fallbacks.append(fallback)
        return {n: GPTQLinear.from_result(res, bias=linears[n].bias, checkpoint_format=checkpoint_format)
                for n, res in results.items()}

    return drive_blocks(model, calib if cfg.calibrated else None, report, quantize_block, device=device,
                        desc=f"{cfg.method} {cfg.bits}-bit", progress=progress)
