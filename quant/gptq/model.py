"""Whole-model GPTQ: quantize a float HF model, save it as an ecosystem checkpoint, load one back.

Public entry points (also used by the CLI): `quantize_model` (in memory), `quantize` (spec -> checkpoint
dir), `save_quantized`, `load_gptq_model`.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import torch
from torch import nn

from quant.blocks import QuantReport, decoder_linears
from quant.errors import UserError
from quant.moe.convert import prepare_quantization
from quant.gptq.blocks import quantize_blocks
from quant.gptq.nn import GPTQLinear
from quant.gptq.pack import QUANT_METHOD, quantization_config, read_quant_config, resolve_checkpoint_format
from quant.gptq.solver import GPTQConfig, group_count
from quant.packed import load_packed_model, local_dir, quantize_to_dir, save_packed

log = logging.getLogger(__name__)


def check_layers_fit(model: nn.Module, cfg: GPTQConfig) -> None:
    """Refuse, before any work, layers that the GPTQ format cannot hold with these settings."""
    unit = 32 if cfg.bits == 3 else 32 // cfg.bits
    partial = set()
    for name, m in decoder_linears(model).items():
        K, N = m.in_features, m.out_features
        if cfg.group_size != -1 and cfg.group_size > K:
            raise UserError(f"group size {cfg.group_size} does not fit layer {name} with in_features {K}; "
                            f"use a group size <= {K} or -1")
        if K % unit or N % unit:
            raise UserError(f"layer {name} ({N}x{K}) cannot be packed at {cfg.bits} bits: in and out features "
                            f"must be multiples of {unit}")
        if cfg.group_size != -1 and K % cfg.group_size:
            partial.add(K)
    if partial:
        # Same layout as GPTQModel (G = ceil(K/gs), last group partial); vLLM and some CPU kernels refuse it.
        log.warning("in_features %s not divisible by group size %d: the last group is partial (GPTQModel layout; "
                    "vLLM needs K %% group_size == 0)", sorted(partial), cfg.group_size)


def quantize_model(model: nn.Module, calib: list[torch.Tensor] | None, cfg: GPTQConfig, device=None,
                   checkpoint_format: str = "auto", progress: bool = True) -> QuantReport:
    """Quantize the decoder-block Linears of `model` in place; returns the per-layer report.

    `calib`: list of [1, T] token-id tensors (None is fine for method 'rtn').
    `checkpoint_format`: 'auto' (see quant.gptq.pack.resolve_checkpoint_format), 'gptq' or 'gptq_v2'.
    """
    cfg.validate()
    checkpoint_format = resolve_checkpoint_format(cfg.sym, checkpoint_format)
    prepare_quantization(model, "GPTQ")
    check_layers_fit(model, cfg)
    model.eval()
    report = quantize_blocks(model, calib, cfg, device=device, checkpoint_format=checkpoint_format,
                             progress=progress)
    model.config.quantization_config = quantization_config(cfg, checkpoint_format)
    return report


def save_quantized(model: nn.Module, out_dir, tokenizer=None, dtype=torch.float16, report: QuantReport | None = None,
                   max_shard_bytes: int = 5 * 2**30) -> Path:
    """Write `model` (after quantize_model or load_gptq_model) as a GPTQ checkpoint directory.

    Packed tensors keep their format dtypes (int32, fp16 scales and bias); every other float tensor is
    written in `dtype`. Tied tensors (lm_head = embed_tokens) are written once, as transformers does.
    """
    return save_packed(model, out_dir, QUANT_METHOD, "save_quantized: the model has no GPTQ quantization_config; "
                       "run quantize_model first", tokenizer=tokenizer, dtype=dtype,
                       report=report.to_dict() if report is not None else None, max_shard_bytes=max_shard_bytes)


def quantize(model_spec: str, out_dir, cfg: GPTQConfig, calib=None, calib_samples: int = 128,
             calib_seqlen: int = 512, text_field: str = "text", calib_split: str = "train", device=None,
             dtype=None, checkpoint_format: str = "auto", seed: int = 0, progress: bool = True,
             overwrite: bool = False) -> QuantReport:
    """`quant gptq`: load MODEL (HF dir, hub id, .gguf, pkg:...), quantize, write the checkpoint to out_dir.

    out_dir is held for the whole run (quant.files.claim_output): one writer at a time, leftovers of a killed
    earlier run undone, and an existing non-empty out_dir refused unless `overwrite`, which replaces it only
    once the new checkpoint is complete.
    """
    checkpoint_format = resolve_checkpoint_format(cfg.sym, checkpoint_format)
    return quantize_to_dir(model_spec, out_dir, cfg, quantize_model, save_quantized, calib=calib,
                           calib_samples=calib_samples, calib_seqlen=calib_seqlen, text_field=text_field,
                           calib_split=calib_split, device=device, dtype=dtype, seed=seed, overwrite=overwrite,
                           checkpoint_format=checkpoint_format, progress=progress)


def _layer_params(path, name: str, state: dict, K: int, bits: int, group_size: int) -> tuple[int, int]:
    """Bits and group size of one layer, read from its tensor shapes when they differ from the global
    config (GPTQModel's per-module `dynamic` overrides) so that such checkpoints load too."""
    rows, groups = state[f"{name}.qweight"].shape[0], state[f"{name}.scales"].shape[0]
    if rows * 32 != K * bits:
        bits = rows * 32 // K
        if bits not in (2, 3, 4, 8) or rows * 32 != K * bits:
            raise UserError(f"{path}: {name}.qweight has {rows} rows, which fits no bit width for {K} inputs")
    if groups != group_count(K, group_size):
        fits = [g for g in (2**i for i in range(4, 16)) if math.ceil(K / g) == groups]
        if groups == 1:
            group_size = -1
        elif fits:
            group_size = fits[-1]
        else:
            raise UserError(f"{path}: {name}.scales has {groups} groups, which fits no group size for {K} inputs")
    return bits, group_size


def load_gptq_model(path, device=None, dtype=None, kernel: str = "auto") -> nn.Module:
    """A GPTQ checkpoint (ours or the ecosystem's, v1 or v2, any g_idx) as an HF model with GPTQLinear layers.

    The model is built from config.json with empty weights, the Linears that have `qweight` in the
    checkpoint become GPTQLinear, and the safetensors are assigned directly (no random init, no copy).
    Non-quantized tensors are cast to `dtype` (default fp32 on CPU, fp16 on GPU).
    """
    path = local_dir(path, "GPTQ checkpoint")
    q = read_quant_config(path)

    def make_layer(name: str, old: nn.Linear, state: dict) -> GPTQLinear:
        bits, gs = _layer_params(path, name, state, old.in_features, q["bits"], q["group_size"])
        if f"{name}.g_idx" not in state:  # very old checkpoints: the default layout
            state[f"{name}.g_idx"] = (torch.arange(old.in_features) // (gs if gs != -1 else old.in_features)).to(torch.int32)
        return GPTQLinear(old.in_features, old.out_features, bits, gs, bias=f"{name}.bias" in state,
                          checkpoint_format=q["checkpoint_format"], device="meta", kernel=kernel)

    return load_packed_model(path, q["raw"], make_layer, "GPTQ", device=device, dtype=dtype)
