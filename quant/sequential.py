"""Block-by-block GPTQ over a Hugging Face decoder model.

Only one decoder block and the calibration activations live on the compute device at a time: the inputs
of block 0 are captured by a hook that stops the forward there, each block is moved to the device,
quantized, run once more to produce the (quantized) inputs of the next block, and moved back.

Inside a block, `true_sequential` quantizes the Linears in groups that share an input (q/k/v, then o,
then gate/up, then down for Llama), so later groups see the already-quantized earlier ones. Collecting
a group's inputs stops the block's forward right after the group's last Linear has been reached, which
keeps the extra passes cheap.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from quant.errors import UserError
from quant.formats.gptq_pack import V1
from quant.gptq import GPTQConfig, HessianAccumulator, QuantResult, gptq_quantize
from quant.nn import QuantLinear

log = logging.getLogger(__name__)

# Where the decoder blocks sit in common architectures (optimum's BLOCK_PATTERNS plus a few newer ones).
BLOCK_PATTERNS = ("model.layers", "model.language_model.layers", "model.decoder.layers", "transformer.h",
                  "gpt_neox.layers", "transformer.blocks", "model.transformer.h")


class _Stop(Exception):
    """Raised from a hook to abandon a forward pass once the needed inputs have been seen."""


@dataclass
class LayerLog:
    name: str
    in_features: int
    out_features: int
    rel_error: float | None
    damp_percent: float | None
    seconds: float


@dataclass
class QuantReport:
    method: str
    layers: list[LayerLog] = field(default_factory=list)
    calib_samples: int = 0
    calib_tokens: int = 0
    seconds: float = 0.0

    def mean_error(self) -> float | None:
        errs = [l.rel_error for l in self.layers if l.rel_error is not None]
        return sum(errs) / len(errs) if errs else None


def find_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    for path in BLOCK_PATTERNS:
        try:
            mod = model.get_submodule(path)
        except AttributeError:
            continue
        if isinstance(mod, nn.ModuleList) and len(mod):
            return path, mod
    lists = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.ModuleList) and len(m)]
    if not lists:
        raise UserError(f"{type(model).__name__} has no list of decoder blocks to quantize")
    return max(lists, key=lambda nm: len(nm[1]))


def block_linears(block: nn.Module) -> dict[str, nn.Linear]:
    return {n: m for n, m in block.named_modules() if isinstance(m, nn.Linear)}


def _move_outside(model: nn.Module, prefix: str, device) -> None:
    """Move every parameter and buffer that is not inside `prefix` (the block list) to `device`."""
    for name, mod in model.named_modules():
        if name == prefix or name.startswith(prefix + "."):
            continue
        for pname, p in mod.named_parameters(recurse=False):
            p.data = p.data.to(device)
        for bname, b in mod.named_buffers(recurse=False):
            if b is not None:
                mod._buffers[bname] = b.to(device)


def _to(obj, device):
    if torch.is_tensor(obj):
        return obj.to(device)
    if isinstance(obj, (tuple, list)):
        return type(obj)(_to(o, device) for o in obj)
    if isinstance(obj, dict):
        return {k: _to(v, device) for k, v in obj.items()}
    return obj


@torch.no_grad()
def capture_inputs(model, blocks: nn.ModuleList, calib: list[torch.Tensor], device) -> tuple[list, list]:
    """Hidden states and keyword arguments (masks, rotary embeddings, ...) that reach block 0 per sample."""
    hidden, kwargs_list = [], []

    def hook(_mod, args, kwargs):
        kwargs = dict(kwargs)
        h = args[0] if args else kwargs.pop("hidden_states")
        hidden.append(h)
        kwargs_list.append(kwargs)
        raise _Stop

    handle = blocks[0].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for ids in calib:
            try:
                model(input_ids=ids.to(device), use_cache=False)
            except _Stop:
                pass
    finally:
        handle.remove()
    return hidden, kwargs_list


def _run_block(block, h, kwargs):
    out = block(h, **kwargs)
    return out[0] if isinstance(out, (tuple, list)) else out


def _linear_groups(block, linears, h, kwargs, true_sequential: bool):
    """Call-ordered groups of Linears, plus for each Linear the member whose input it shares."""
    seen: list[tuple[str, torch.Tensor]] = []
    handles = [m.register_forward_pre_hook(lambda _m, a, n=n: seen.append((n, a[0]))) for n, m in linears.items()]
    try:
        _run_block(block, h, kwargs)
    finally:
        for hd in handles:
            hd.remove()
    owner: dict[str, str] = {}
    order: list[str] = []
    for name, x in seen:
        if name in owner:
            continue  # a Linear called twice (shared weights) keeps its first input group
        owner[name] = next((n for n, y in seen if y is x and n in owner), name)
        order.append(name)
    never_called = [n for n in linears if n not in owner]
    for n in never_called:
        owner[n] = n
    if not true_sequential:
        return [order + never_called], owner
    groups: list[list[str]] = []
    for name in order:
        if owner[name] == name:
            groups.append([name])
        else:
            next(g for g in groups if owner[name] in g).append(name)
    if never_called:
        groups.append(never_called)
    return groups, owner


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
                raise _Stop
        return hook

    handles = [linears[n].register_forward_pre_hook(make_hook(n)) for n in owners]
    try:
        for h, kw in zip(hidden, kwargs_list):
            pending.update(owners)
            try:
                _run_block(block, h, kw)
            except _Stop:
                pass
    finally:
        for hd in handles:
            hd.remove()
    return {n: acc[owner[n]] for n in group}


def _solve(name, linear: nn.Linear, acc: HessianAccumulator | None, cfg: GPTQConfig) -> tuple[QuantResult, LayerLog]:
    t0 = time.perf_counter()
    W = linear.weight.data
    H = acc.H if acc is not None and acc.n > 0 else None
    if acc is not None and acc.n == 0:
        log.warning("%s: no calibration token reached this layer; using round-to-nearest", name)
    res = gptq_quantize(W, H, cfg, name=name)
    if res.rel_error is None:  # data-free: report the weight-space error instead
        Wq = res.dequantize()
        res.rel_error = ((W.float() - Wq).pow(2).sum() / W.float().pow(2).sum().clamp(min=1e-30)).item()
    linear.weight.data = res.dequantize(dtype=W.dtype)  # later groups/blocks see the quantized layer
    entry = LayerLog(name, linear.in_features, linear.out_features, res.rel_error, res.damp_percent,
                     time.perf_counter() - t0)
    log.info("%-48s %5dx%-5d rel_err %.3e  damp %s  %.2fs", name, entry.out_features, entry.in_features,
             entry.rel_error, f"{entry.damp_percent:.3f}" if entry.damp_percent else "-", entry.seconds)
    return res, entry


def _swap_in(block: nn.Module, name: str, res: QuantResult, linear: nn.Linear, fmt: str) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = block.get_submodule(parent_name) if parent_name else block
    setattr(parent, child, QuantLinear.from_result(res, bias=linear.bias, checkpoint_format=fmt))


@torch.no_grad()
def quantize_blocks(model: nn.Module, calib: list[torch.Tensor] | None, cfg: GPTQConfig, device=None,
                    checkpoint_format: str = V1, progress: bool = True) -> QuantReport:
    """Quantize every nn.Linear inside the decoder blocks of `model` in place (they become QuantLinear).

    `calib` is a list of [1, T] token id tensors; it may be None for `cfg.method == "rtn"`.
    `device` is where blocks are processed (default: where the model is); the model is returned on its
    original device.
    """
    t_start = time.perf_counter()
    prefix, blocks = find_blocks(model)
    home = next(model.parameters()).device
    device = torch.device(device) if device is not None else home
    report = QuantReport(method=cfg.method)
    data_free = cfg.method == "rtn"
    if not data_free and not calib:
        raise UserError("GPTQ needs calibration data: the calibration set is empty")
    hidden, kwargs_list = [], []
    if not data_free:
        report.calib_samples = len(calib)
        report.calib_tokens = sum(int(c.numel()) for c in calib)
        _move_outside(model, prefix, device)
        hidden, kwargs_list = capture_inputs(model, blocks, calib, device)
        _move_outside(model, prefix, home)

    bar = tqdm(total=len(blocks), desc=f"{cfg.method} {cfg.bits}-bit", unit="block", disable=not progress)
    for i, block in enumerate(blocks):
        block.to(device)
        linears = block_linears(block)
        results: dict[str, QuantResult] = {}
        if data_free:
            for n, lin in linears.items():
                results[n], entry = _solve(f"{prefix}.{i}.{n}", lin, None, cfg)
                report.layers.append(entry)
        elif linears:
            groups, owner = _linear_groups(block, linears, hidden[0], kwargs_list[0], cfg.true_sequential)
            for group in groups:
                accs = _collect_hessians(block, linears, group, owner, hidden, kwargs_list, device)
                for n in group:
                    results[n], entry = _solve(f"{prefix}.{i}.{n}", linears[n], accs[n], cfg)
                    report.layers.append(entry)
                del accs
        if not data_free and i + 1 < len(blocks):
            for j in range(len(hidden)):  # outputs overwrite inputs: one set of activations at a time
                hidden[j] = _run_block(block, hidden[j], kwargs_list[j])
        for n, res in results.items():
            _swap_in(block, n, res, linears[n], checkpoint_format)
        block.to(home)
        errs = [e.rel_error for e in report.layers[len(report.layers) - len(results):]]
        bar.set_postfix(rel_err=f"{sum(errs) / len(errs):.2e}" if errs else "-")
        bar.update(1)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    bar.close()
    report.seconds = time.perf_counter() - t_start
    return report
