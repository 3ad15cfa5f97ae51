"""Whole-model AWQ: quantize a float HF model, save it as an AWQ gemm checkpoint, load one back.

Public entry points (also used by the CLI): `quantize_model_awq` (in memory), `quantize_awq` (spec ->
checkpoint dir), `save_awq`, `load_awq_model`.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import torch
from torch import nn

from quant.awq.blocks import AWQReport, quantize_blocks_awq
from quant.awq.nn import AWQLinear
from quant.awq.pack import PACK, QUANT_METHOD, layer_group_size, quantization_config, read_quant_config
from quant.awq.solver import AWQConfig
from quant.blocks import decoder_linears
from quant.errors import UserError
from quant.moe.convert import prepare_quantization
from quant.packed import load_packed_model, local_dir, quantize_to_dir, save_packed

log = logging.getLogger(__name__)


def check_layers_fit_awq(model: nn.Module, cfg: AWQConfig) -> None:
    """Refuse, before any work, layers the AWQ format cannot hold; warn about partial last groups."""
    partial = set()
    for name, m in decoder_linears(model).items():
        if m.out_features % PACK:
            raise UserError(f"layer {name} ({m.out_features}x{m.in_features}) cannot be packed in AWQ format: "
                            f"out_features must be a multiple of {PACK}")
        if m.in_features % cfg.group_size:
            partial.add(m.in_features)
    if partial:
        # Our loader reads G = ceil(K / group_size) groups; vLLM, transformers and GPTQModel need K % group_size == 0.
        log.warning("in_features %s not divisible by group size %d: the last group is partial, which our loader "
                    "reads but vLLM, transformers and GPTQModel refuse; choose a group size dividing %s for serving",
                    sorted(partial), cfg.group_size, sorted(partial))


def checkpoint_config(cfg: AWQConfig) -> dict:
    """The quantization_config of a checkpoint quantized with `cfg`: the format's keys, and every other setting in
    its meta (what `recorded_settings` reads back)."""
    meta = {k: v for k, v in cfg.to_dict().items() if k not in ("bits", "group_size")}
    return quantization_config(cfg.bits, cfg.group_size, meta=meta)


def recorded_settings(q: dict) -> dict:
    """The AWQConfig fields a checkpoint records, from its normalized settings (`read_quant_config`): bits and
    group size, and those of its meta (ours records every one; other tools' none)."""
    meta = q["raw"].get("meta") if isinstance(q["raw"].get("meta"), dict) else {}
    names = {f.name for f in dataclasses.fields(AWQConfig)}
    return {"bits": q["bits"], "group_size": q["group_size"], **{k: v for k, v in meta.items() if k in names}}


def quantize_model_awq(model: nn.Module, calib: list[torch.Tensor] | None, cfg: AWQConfig, device=None,
                       progress: bool = True) -> AWQReport:
    """Quantize the decoder-block Linears of `model` in place (they become AWQLinear); the per-layer report.

    `calib`: list of [1, T] token-id tensors (None is fine for method 'rtn'). Norms and projections that
    absorbed AWQ scales are changed in place too; the model's float function is unchanged by them.
    """
    cfg.validate()
    prepare_quantization(model, "AWQ")
    check_layers_fit_awq(model, cfg)
    model.eval()
    report = quantize_blocks_awq(model, calib, cfg, device=device, progress=progress)
    model.config.quantization_config = checkpoint_config(cfg)
    return report


def save_awq(model: nn.Module, out_dir, tokenizer=None, dtype=torch.float16, report: AWQReport | None = None,
             max_shard_bytes: int = 5 * 2**30) -> Path:
    """Write `model` (after quantize_model_awq or load_awq_model) as an AWQ gemm checkpoint directory."""
    return save_packed(model, out_dir, QUANT_METHOD, "save_awq: the model has no AWQ quantization_config; run "
                       "quantize_model_awq first", tokenizer=tokenizer, dtype=dtype,
                       report=report.to_dict() if report is not None else None, max_shard_bytes=max_shard_bytes)


def quantize_awq(model_spec: str, out_dir, cfg: AWQConfig, calib=None, calib_samples: int = 128,
                 calib_seqlen: int = 512, text_field: str = "text", calib_split: str = "train", device=None,
                 dtype=None, seed: int = 0, progress: bool = True, overwrite: bool = False) -> AWQReport:
    """`quant awq`: load MODEL (HF dir, hub id, .gguf, pkg:...), quantize, write the checkpoint to out_dir.

    out_dir is held for the whole run as in `quant gptq` (quant.packed.quantize_to_dir): an existing non-empty
    out_dir is refused unless `overwrite`, which replaces it only once the new checkpoint is complete.
    """
    return quantize_to_dir(model_spec, out_dir, cfg, quantize_model_awq, save_awq, calib=calib,
                           calib_samples=calib_samples, calib_seqlen=calib_seqlen, text_field=text_field,
                           calib_split=calib_split, device=device, dtype=dtype, seed=seed, overwrite=overwrite,
                           progress=progress)


def load_awq_model(path, device=None, dtype=None) -> nn.Module:
    """An AWQ gemm checkpoint (ours, GPTQModel's, AutoAWQ's) as an HF model with AWQLinear layers.

    The model is built from config.json with empty weights, the Linears with `qweight` in the checkpoint
    become AWQLinear, and the safetensors are assigned directly. Non-quantized tensors are cast to `dtype`
    (default fp32 on CPU, fp16 on GPU); packed tensors keep their format dtypes.
    """
    path = local_dir(path, "AWQ checkpoint")
    q = read_quant_config(path)

    def make_layer(name: str, old: nn.Linear, state: dict) -> AWQLinear:
        scales = state[f"{name}.scales"]
        gs = layer_group_size(old.in_features, scales.shape[0], q["group_size"], f"{path}: {name}")
        if f"{name}.bias" in state:
            state[f"{name}.bias"] = state[f"{name}.bias"].to(scales.dtype)
        return AWQLinear(old.in_features, old.out_features, gs, bias=f"{name}.bias" in state, device="meta",
                         scales_dtype=scales.dtype)

    return load_packed_model(path, q["raw"], make_layer, "AWQ", device=device, dtype=dtype)
