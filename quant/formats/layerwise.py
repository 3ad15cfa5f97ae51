"""Requantizing a merged model one decoder layer at a time, on the merged model's own activations: what the
GPTQ and AWQ merge outputs share (`GPTQEncoder` in quant.formats.gptq, `AWQEncoder` in quant.formats.awq).

GPTQ and AWQ minimise each layer's output error on the inputs that layer really sees, so the calibration
activations must be those of the MERGED model, already requantized up to the previous layer. The encoder
keeps exactly one set of hidden states: embeddings turn the calibration tokens into layer-0 inputs; each
merged layer is then materialised, quantized, written, and run once (quantized) to give the next layer's
inputs, and dropped. Peak memory is one float layer plus the calibration activations.

Each layer is quantized by the block driver behind `quant gptq` / `quant awq` (`quant.blocks.drive_blocks`),
so a merge output and a `quant` output share one algorithm. The driver takes a model and calibration token ids;
`quant.blocks.OneLayer` is a model whose only block is the current layer and whose "token ids" are indices into
the stored hidden states.
"""

from __future__ import annotations

import torch
from torch import nn

from quant.blocks import BlockKwargs, LayerLog, OneLayer, QuantReport, capture_inputs, find_blocks, run_block
from quant.errors import UserError
from quant.formats.base import Encoder
from quant.moe.convert import architecture
from quant.moe.layout import defused_tensors
from quant.packed import with_router_kept


def _replace_with_meta(module: nn.Module, skip_prefix: str) -> None:
    """Drop the real storage of every parameter outside `skip_prefix` (the embeddings after calibration)."""
    for name, mod in module.named_modules():
        if name == skip_prefix or name.startswith(skip_prefix + "."):
            continue
        for pname, p in list(mod.named_parameters(recurse=False)):
            mod._parameters[pname] = nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=False)


@torch.no_grad()
def layer0_inputs(model, prefix: str, blocks, tensors: dict[str, torch.Tensor], calib: list[torch.Tensor], device,
                  run_dtype) -> tuple[list, BlockKwargs]:
    """The calibration inputs of decoder layer 0 (hidden states per window) and every layer's keyword arguments
    (quant.blocks.BlockKwargs): the tensors outside the layers (embeddings, ...) are loaded into the skeleton
    `model`, run on `calib`, and dropped again."""
    state = {k: v.to(device, run_dtype) if v.is_floating_point() else v.to(device) for k, v in tensors.items()}
    model.load_state_dict(state, strict=False, assign=True)
    model.tie_weights()
    for name, mod in model.named_modules():
        if not (name == prefix or name.startswith(prefix + ".")):
            for bname, b in mod.named_buffers(recurse=False):
                mod._buffers[bname] = b.to(device)
    missing = [n for n, p in model.named_parameters() if p.is_meta and not n.startswith(prefix + ".")]
    if missing:
        raise UserError(f"the base checkpoint lacks {missing[:3]}, needed to compute calibration inputs")
    hidden, kwargs = capture_inputs(model, blocks, calib, device)
    _replace_with_meta(model, prefix)
    return hidden, kwargs


class LayerwiseEncoder(Encoder):
    """Turns each merged unit into packed checkpoint tensors (see the module docstring).

    Subclasses set `packed` (the packed layer type, whose tensors keep their format dtypes) and implement
    `quantize_layer`. `calib`: list of [1, T] token ids; None only when `calibrated` is False (round-to-nearest).
    Non-quantized tensors are written in `out_dtype`.
    """

    packed: type = nn.Module

    def __init__(self, model, calibrated: bool, calib: list[torch.Tensor] | None, device: torch.device,
                 run_dtype: torch.dtype, out_dtype: torch.dtype):
        self.model = model
        self.arch = architecture(model)  # a mixture of experts: layers take the experts per expert (quant.moe)
        self.prefix, self.blocks = find_blocks(model)
        self.calib, self.device = calib, device
        self.run_dtype, self.out_dtype = run_dtype, out_dtype
        self.hidden: list[torch.Tensor] = []
        self.kwargs: BlockKwargs | None = None
        self.layers: list[LayerLog] = []
        self.fallbacks: list[dict] = []  # experts rounded to nearest for too few calibration tokens, per layer
        self.calibrated = calibrated
        if self.calibrated and not calib:
            raise ValueError(f"{type(self).__name__} needs calibration token ids")

    def quantize_layer(self, wrapper: nn.Module, index_ids: list[torch.Tensor] | None, head: str) -> QuantReport:
        """Quantize the one block of `wrapper` in place (its Linears become `packed`); `head` is the layer's
        checkpoint prefix ('model.layers.3.'), for names in the report."""
        raise NotImplementedError

    def keep_routers(self, qconfig: dict) -> dict:
        """The output's quantization_config, a mixture of experts' routers listed as not converted."""
        return with_router_kept(qconfig, self.arch) if self.arch is not None else qconfig

    def log(self) -> dict:
        """The per-layer log (quant_log.json): every quantized Linear's relative output error."""
        layers = [vars(entry) for entry in self.layers]
        errs = [entry["rel_error"] for entry in layers if entry["rel_error"] is not None]
        return {"mean_rel_error": sum(errs) / len(errs) if errs else None, "layers": layers,
                **({"expert_fallbacks": self.fallbacks} if self.fallbacks else {})}

    def __call__(self, layer: int | None, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if layer is None:
            return self._outside(tensors)
        return self._layer(layer, tensors)

    @torch.no_grad()
    def _outside(self, tensors):
        if self.calibrated:
            self.hidden, self.kwargs = layer0_inputs(self.model, self.prefix, self.blocks, tensors, self.calib,
                                                     self.device, self.run_dtype)
        return {k: v.to(self.out_dtype) if v.is_floating_point() else v for k, v in tensors.items()}

    @torch.no_grad()
    def _layer(self, i: int, tensors):
        head = f"{self.prefix}.{i}."
        layer = self.blocks[i]
        state = {k[len(head):]: v.to(self.device, self.run_dtype) if v.is_floating_point() else v.to(self.device)
                 for k, v in defused_tensors(self.arch, tensors).items()}
        try:
            layer.load_state_dict(state, strict=True, assign=True)
        except RuntimeError as e:
            raise UserError(f"layer {i}: merged tensors do not fit the model: {str(e).splitlines()[-1].strip()}") \
                from None
        wrapper = OneLayer(layer, self.hidden, self.kwargs[i] if self.calibrated else [])
        index_ids = OneLayer.index_ids(len(self.hidden)) if self.calibrated else None
        report = self.quantize_layer(wrapper, index_ids, head)
        for entry in report.layers:
            entry.name = head + entry.name.split(".", 2)[-1]
            self.layers.append(entry)
        self.fallbacks += [{**f, "block": head.rstrip(".")} for f in report.fallbacks]
        if self.calibrated and i + 1 < len(self.blocks):
            for j in range(len(self.hidden)):  # the next layer sees this layer's quantized outputs
                self.hidden[j] = run_block(layer, self.hidden[j], self.kwargs[i][j])
        quantized = {n for n, m in layer.named_modules() if isinstance(m, self.packed)}
        out = {}
        for k, v in layer.state_dict().items():
            keep = k.rpartition(".")[0] in quantized  # packed ints and fp16 scales/bias as the format says
            out[head + k] = v if keep or not v.is_floating_point() else v.to(self.out_dtype)
        self.blocks[i] = nn.Module()  # drop the layer: its tensors are written by the caller
        return out
