"""GPTQ (or RTN) requantization of the merged model, streamed one decoder layer at a time.

GPTQ minimises each layer's output error on the inputs that layer really sees, so the calibration
activations must be those of the MERGED model, already requantized up to the previous layer. The
encoder keeps exactly one set of hidden states: embeddings turn the calibration tokens into layer-0
inputs; each merged layer is then materialised, quantized, written, and run once (quantized) to give the
next layer's inputs, and dropped. Peak memory is one float layer plus the calibration activations.

Each layer is quantized by `quant.sequential.quantize_blocks`, the driver behind `quant gptq`, so merge
output and `quant gptq` output share one algorithm (true-sequential groups, damping retries, act-order,
the layer log). The driver takes a model and calibration token ids; `_OneLayer` is a model whose only
block is the current layer and whose "token ids" are indices into the stored hidden states.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn

from finetune.merge.source import Unit
from quant.errors import UserError
from quant.gptq import GPTQConfig
from quant.nn import QuantLinear
from quant.sequential import LayerLog, capture_inputs, find_blocks, quantize_blocks

log = logging.getLogger(__name__)

_RECORD_SUFFIXES = (".jsonl", ".json", ".parquet", ".csv")


class _OneLayer(nn.Module):
    def __init__(self, layer: nn.Module, hidden: list, kwargs: list):
        super().__init__()
        self.layers = nn.ModuleList([layer])
        self._hidden, self._kwargs = hidden, kwargs

    def forward(self, input_ids, use_cache=False):
        j = int(input_ids.reshape(-1)[0])
        return self.layers[0](self._hidden[j], **self._kwargs[j])


def _run_layer(layer, h, kwargs):
    out = layer(h, **kwargs)
    return out[0] if isinstance(out, (tuple, list)) else out


def _replace_with_meta(module: nn.Module, skip_prefix: str) -> None:
    """Drop the real storage of every parameter outside `skip_prefix` (the embeddings after calibration)."""
    for name, mod in module.named_modules():
        if name == skip_prefix or name.startswith(skip_prefix + "."):
            continue
        for pname, p in list(mod.named_parameters(recurse=False)):
            mod._parameters[pname] = nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=False)


class GPTQEncoder:
    """Turns each merged unit into GPTQ checkpoint tensors (see the module docstring).

    `calib`: list of [1, T] token ids; None only for cfg.method == 'rtn'. Non-quantized tensors are written
    in `out_dtype` (fp16 by default: what GPTQ readers, vLLM's kernels among them, expect).
    """

    def __init__(self, model, cfg: GPTQConfig, checkpoint_format: str, calib: list[torch.Tensor] | None,
                 device: torch.device, run_dtype: torch.dtype, out_dtype: torch.dtype):
        self.model, self.cfg, self.format = model, cfg, checkpoint_format
        self.prefix, self.blocks = find_blocks(model)
        self.calib, self.device = calib, device
        self.run_dtype, self.out_dtype = run_dtype, out_dtype
        self.hidden: list[torch.Tensor] = []
        self.kwargs: list[dict] = []
        self.layers: list[LayerLog] = []
        if cfg.method == "gptq" and not calib:
            raise ValueError("GPTQ requantization needs calibration token ids")

    def __call__(self, unit: Unit, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if unit.index is None:
            return self._outside(tensors)
        return self._layer(unit.index, tensors)

    @torch.no_grad()
    def _outside(self, tensors):
        if self.cfg.method == "gptq":
            state = {k: v.to(self.device, self.run_dtype) if v.is_floating_point() else v.to(self.device)
                     for k, v in tensors.items()}
            self.model.load_state_dict(state, strict=False, assign=True)
            self.model.tie_weights()
            for name, mod in self.model.named_modules():
                if not (name == self.prefix or name.startswith(self.prefix + ".")):
                    for bname, b in mod.named_buffers(recurse=False):
                        mod._buffers[bname] = b.to(self.device)
            missing = [n for n, p in self.model.named_parameters()
                       if p.is_meta and not n.startswith(self.prefix + ".")]
            if missing:
                raise UserError(f"the base checkpoint lacks {missing[:3]}, needed to compute calibration inputs")
            self.hidden, self.kwargs = capture_inputs(self.model, self.blocks, self.calib, self.device)
            _replace_with_meta(self.model, self.prefix)
        return {k: v.to(self.out_dtype) if v.is_floating_point() else v for k, v in tensors.items()}

    @torch.no_grad()
    def _layer(self, i: int, tensors):
        head = f"{self.prefix}.{i}."
        layer = self.blocks[i]
        state = {k[len(head):]: v.to(self.device, self.run_dtype) if v.is_floating_point() else v.to(self.device)
                 for k, v in tensors.items()}
        try:
            layer.load_state_dict(state, strict=True, assign=True)
        except RuntimeError as e:
            raise UserError(f"layer {i}: merged tensors do not fit the model: {str(e).splitlines()[-1].strip()}") \
                from None
        wrapper = _OneLayer(layer, self.hidden, self.kwargs)
        index_ids = [torch.tensor([[j]]) for j in range(len(self.hidden))] if self.cfg.method == "gptq" else None
        report = quantize_blocks(wrapper, index_ids, self.cfg, device=self.device, checkpoint_format=self.format,
                                 progress=False)
        for entry in report.layers:
            entry.name = head + entry.name.split(".", 2)[-1]
            self.layers.append(entry)
        if self.cfg.method == "gptq" and i + 1 < len(self.blocks):
            for j in range(len(self.hidden)):  # the next layer sees this layer's quantized outputs
                self.hidden[j] = _run_layer(layer, self.hidden[j], self.kwargs[j])
        quantized = {n for n, m in layer.named_modules() if isinstance(m, QuantLinear)}
        out = {}
        for k, v in layer.state_dict().items():
            keep = k.rpartition(".")[0] in quantized  # packed ints and fp16 scales/bias as the format says
            out[head + k] = v if keep or not v.is_floating_point() else v.to(self.out_dtype)
        self.blocks[i] = nn.Module()  # drop the layer: its tensors are written by the caller
        return out


# ------------------------------------------------------------------------------------------ calibration


def calibration_ids(sources: list[str], tokenizer, data_cfg, n_samples: int, seqlen: int,
                    seed: int = 0) -> list[torch.Tensor]:
    """Calibration windows from plain text (quant's sources: .txt/.md, directories, pkg:..., hub datasets) or
    from record files in any training format (chat, sharegpt, alpaca, completion, text), which are rendered
    through the training data pipeline, chat template included: what the merged model will be fed."""
    from dataclasses import replace

    from finetune.data import build_datasets
    from quant.calibration import load_texts, token_stream, token_windows

    if n_samples < 1 or seqlen < 2:
        raise UserError(f"calibration needs at least 1 sample of >= 2 tokens (got {n_samples} x {seqlen})")
    streams = []
    for src in sources:
        if Path(src).suffix in _RECORD_SUFFIXES and Path(src).is_file():
            cfg = replace(data_cfg, train=str(src), eval=None, eval_fraction=0.0, packing=False,
                          train_on_prompt=True, max_examples=None, max_length=max(seqlen, 8))
            bundle = build_datasets(cfg, tokenizer, seed)
            streams.append(torch.cat([torch.as_tensor(ex["input_ids"], dtype=torch.long) for ex in bundle.train]))
        else:
            streams.append(token_stream(load_texts(src, what="--calib"), tokenizer))
    ids = torch.cat(streams)
    if ids.numel() < 2:
        raise UserError("--calib: the calibration data tokenizes to fewer than 2 tokens")
    chunks = token_windows(ids, n_samples, seqlen, seed)
    if len(chunks) < n_samples:
        log.warning("calibration data holds only %d windows of %d tokens (asked for %d)", len(chunks), seqlen,
                    n_samples)
    return chunks
