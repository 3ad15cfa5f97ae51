"""Walking a Hugging Face decoder model block by block: what every quantization method shares.

Only one decoder block and the calibration activations live on the compute device at a time: one forward with
every block passing its input through untouched captures the inputs of block 0 and the keyword arguments (masks,
rotary embeddings) the model hands each block (`capture_inputs`): Gemma 3 and gpt-oss give sliding-window and
full-attention layers different masks and rotary bases, so one block's arguments do not serve the others. Each
block is then moved to the device, quantized by the method, run once more to produce the (quantized) inputs of
the next block, and moved back (`drive_blocks`).

Inside a block, `linear_groups` orders the Linears in groups that share an input (q/k/v, then o, then gate/up,
then down for Llama), found by watching one forward, so a method can quantize them group by group and let later
groups see the already-quantized earlier ones.

`OneLayer` turns one decoder layer plus stored hidden states into a model the driver can walk: the merge's
layer-by-layer encoders and the GGUF importance pass use it. Nothing here knows a method; where the block list
sits is the model family's description (quant.arch).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from quant.arch import describe
from quant.errors import UserError

log = logging.getLogger(__name__)


class Stop(Exception):
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
    fallbacks: list[dict] = field(default_factory=list)  # per block: the experts rounded to nearest (quant.moe)

    def mean_error(self) -> float | None:
        errs = [l.rel_error for l in self.layers if l.rel_error is not None]
        return sum(errs) / len(errs) if errs else None

    def to_dict(self) -> dict:
        """What quant_log.json records (a method's report may add its own keys)."""
        return {"method": self.method, "calib_samples": self.calib_samples, "calib_tokens": self.calib_tokens,
                "seconds": round(self.seconds, 2), "mean_rel_error": self.mean_error(),
                "layers": [vars(l) for l in self.layers], **({"expert_fallbacks": self.fallbacks}
                                                             if self.fallbacks else {})}


def find_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """(path, module list) of the decoder blocks: where the model's family puts them (an architecture we do not
    know is refused), or for a model without a config (`OneLayer`) its longest module list."""
    config = getattr(model, "config", None)
    if config is not None:
        path = describe(config).blocks
        try:
            return path, model.get_submodule(path)
        except AttributeError:
            raise UserError(f"{type(model).__name__} has no decoder blocks at {path}") from None
    lists = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.ModuleList) and len(m)]
    if not lists:
        raise UserError(f"{type(model).__name__} has no list of decoder blocks to quantize")
    return max(lists, key=lambda nm: len(nm[1]))


def block_linears(block: nn.Module) -> dict[str, nn.Linear]:
    return {n: m for n, m in block.named_modules() if isinstance(m, nn.Linear)}


def decoder_linears(model: nn.Module) -> dict[str, nn.Linear]:
    """Every nn.Linear inside the decoder blocks, named '<block index>.<name in block>' (what a method checks
    before any work); a model without any is refused."""
    _, blocks = find_blocks(model)
    layers = {f"{i}.{n}": m for i, b in enumerate(blocks) for n, m in block_linears(b).items()}
    if not layers:
        raise UserError(f"{type(model).__name__} has no nn.Linear layers inside its decoder blocks to quantize")
    return layers


def set_submodule(block: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(block.get_submodule(parent_name) if parent_name else block, child, module)


def run_block(block, h, kwargs):
    """The hidden states a decoder block returns for input `h` (blocks return a tuple or a tensor)."""
    out = block(h, **kwargs)
    return out[0] if isinstance(out, (tuple, list)) else out


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


class BlockKwargs:
    """The keyword arguments (masks, rotary embeddings, ...) the model hands each block, per calibration sample.
    Blocks of one layer type get the same tensors from the model, so they are held once per distinct set."""

    def __init__(self, n_blocks: int):
        self.per_block: list[list[dict]] = [[] for _ in range(n_blocks)]

    def add(self, sample: list[dict]) -> None:
        distinct: list[dict] = []
        for i, kw in enumerate(sample):
            same = next((d for d in distinct if d.keys() == kw.keys() and all(d[k] is kw[k] for k in kw)), None)
            if same is None:
                distinct.append(kw)
            self.per_block[i].append(same if same is not None else kw)

    def __getitem__(self, i: int) -> list[dict]:
        """Block i's keyword arguments, one dict per sample."""
        return self.per_block[i]

    def distinct(self) -> int:
        """How many different sets of arguments the blocks of the first sample get (its layer types)."""
        firsts = {id(b[0]) for b in self.per_block if b}
        return len(firsts)


@torch.no_grad()
def capture_inputs(model, blocks: nn.ModuleList, calib: list[torch.Tensor], device) -> tuple[list, BlockKwargs]:
    """Hidden states that reach block 0, and the keyword arguments each block gets, per sample: one forward per
    sample in which every block hands its input on untouched (no block computes; the model's own code prepares
    each block's mask and rotary embedding as it does in a real forward) and the last one stops it."""
    hidden, kwargs = [], BlockKwargs(len(blocks))
    seen: list[dict] = []

    def passthrough(i):
        def forward(*args, **kw):
            h = args[0] if args else kw.pop("hidden_states")
            if i == 0:
                hidden.append(h)
            seen.append(kw)
            if i == len(blocks) - 1:
                raise Stop
            return h
        return forward

    before = [b.__dict__.get("forward") for b in blocks]
    for i, b in enumerate(blocks):
        b.forward = passthrough(i)
    try:
        for ids in calib:
            seen.clear()
            try:
                model(input_ids=ids.to(device), use_cache=False)
            except Stop:
                pass
            if len(seen) != len(blocks):
                raise RuntimeError(f"{type(model).__name__}'s forward reached {len(seen)} of {len(blocks)} blocks")
            kwargs.add(list(seen))
    finally:
        for b, f in zip(blocks, before):
            if f is None:
                del b.forward
            else:
                b.forward = f
    return hidden, kwargs


def linear_groups(block, linears, h, kwargs, true_sequential: bool):
    """Call-ordered groups of Linears, plus for each Linear the member whose input it shares."""
    seen: list[tuple[str, torch.Tensor]] = []
    handles = [m.register_forward_pre_hook(lambda _m, a, n=n: seen.append((n, a[0]))) for n, m in linears.items()]
    try:
        run_block(block, h, kwargs)
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
    # Not called on this sample (an expert the router sent none of its tokens): whether two of them would share an
    # input is unknown, so each is a group of its own, after the others, in module order.
    groups.extend([n] for n in never_called)
    return groups, owner


@torch.no_grad()
def drive_blocks(model: nn.Module, calib: list[torch.Tensor] | None, report: QuantReport, quantize_block,
                 device=None, desc: str = "", progress: bool = True) -> QuantReport:
    """The block-by-block loop every method runs through (see the module docstring).

    `quantize_block(block, name, hidden, kwargs_list)` quantizes one block's Linears in place (their weights
    become the dequantized values, so the block's outputs are the quantized model's), appends to `report`,
    and returns {linear name: packed layer}; the packed layers replace the Linears once the block has made
    the next block's inputs. `hidden`/`kwargs_list` are the block's calibration inputs (hidden states and that
    block's own keyword arguments, per sample), None when `calib` is None (data-free); an empty `calib` is
    refused. `device` is where blocks are processed (default: where the
    model is); the model is returned on its original device.
    """
    if calib is not None and not calib:
        raise UserError(f"{report.method.upper()} needs calibration data: the calibration set is empty")
    t_start = time.perf_counter()
    prefix, blocks = find_blocks(model)
    home = next(model.parameters()).device
    device = torch.device(device) if device is not None else home
    hidden = kwargs = None
    if calib is not None:
        report.calib_samples = len(calib)
        report.calib_tokens = sum(int(c.numel()) for c in calib)
        _move_outside(model, prefix, device)
        hidden, kwargs = capture_inputs(model, blocks, calib, device)
        _move_outside(model, prefix, home)

    bar = tqdm(total=len(blocks), desc=desc, unit="block", disable=not progress)
    for i, block in enumerate(blocks):
        block.to(device)
        first = len(report.layers)
        block_kwargs = kwargs[i] if kwargs is not None else None
        packed = quantize_block(block, f"{prefix}.{i}", hidden, block_kwargs)
        if hidden is not None and i + 1 < len(blocks):
            for j in range(len(hidden)):  # outputs overwrite inputs: one set of activations at a time
                hidden[j] = run_block(block, hidden[j], block_kwargs[j])
        for n, layer in packed.items():
            set_submodule(block, n, layer)
        block.to(home)
        errs = [e.rel_error for e in report.layers[first:]]
        bar.set_postfix(rel_err=f"{sum(errs) / len(errs):.2e}" if errs else "-")
        bar.update(1)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    bar.close()
    report.seconds = time.perf_counter() - t_start
    return report


def log_layer(entry: LayerLog, note: str = "") -> None:
    """One line per quantized Linear (INFO): its shape, relative output error, damping where the method damps."""
    damp = f"  damp {entry.damp_percent:.3f}" if entry.damp_percent else ""
    log.info("%-48s %5dx%-5d rel_err %.3e%s%s  %.2fs", entry.name, entry.out_features, entry.in_features,
             entry.rel_error, damp, note, entry.seconds)


class OneLayer(nn.Module):
    """A model whose only block is `layer` and whose "token ids" index the stored hidden states, so that
    `drive_blocks` (and any forward hook) can walk one decoder layer of a model that is never whole in memory.
    With `advance`, each call also replaces the state it read by the layer's output (the next layer's input): a
    pass that measures while it walks (the GGUF importance), instead of a separate walk after it."""

    def __init__(self, layer: nn.Module, hidden: list, kwargs: list, advance: bool = False):
        super().__init__()
        self.layers = nn.ModuleList([layer])
        self._hidden, self._kwargs, self._advance = hidden, kwargs, advance

    def forward(self, input_ids, use_cache=False):
        j = int(input_ids.reshape(-1)[0])
        if not self._advance:
            return self.layers[0](self._hidden[j], **self._kwargs[j])
        self._hidden[j] = run_block(self.layers[0], self._hidden[j], self._kwargs[j])
        return self._hidden[j]

    @staticmethod
    def index_ids(n: int) -> list[torch.Tensor]:
        """The "token ids" that make the wrapper read stored states 0..n-1, one per calibration window."""
        return [torch.tensor([[j]]) for j in range(n)]
