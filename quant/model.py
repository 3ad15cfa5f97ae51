"""Whole-model GPTQ: quantize a float HF model, save it as an ecosystem checkpoint, load one back.

Public entry points (also used by the CLI): `quantize_model` (in memory), `quantize` (spec -> checkpoint
dir), `save_quantized`, `load_gptq_model`.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import torch
from torch import nn

from quant.errors import UserError
from quant.files import claim_output, safetensors_files
from quant.formats.gptq import QUANT_METHOD, quantization_config, read_quant_config, write_checkpoint
from quant.formats.gptq_pack import resolve_checkpoint_format
from quant.gptq import GPTQConfig, group_count
from quant.nn import QuantLinear
from quant.sequential import QuantReport, block_linears, find_blocks, quantize_blocks

log = logging.getLogger(__name__)


def check_layers_fit(model: nn.Module, cfg: GPTQConfig) -> None:
    """Refuse, before any work, layers that the GPTQ format cannot hold with these settings."""
    _, blocks = find_blocks(model)
    names = {f"{i}.{n}": m for i, b in enumerate(blocks) for n, m in block_linears(b).items()}
    if not names:
        raise UserError(f"{type(model).__name__} has no nn.Linear layers inside its decoder blocks to quantize")
    unit = 32 if cfg.bits == 3 else 32 // cfg.bits
    partial = set()
    for name, m in names.items():
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
    `checkpoint_format`: 'auto' (see quant.formats.gptq_pack.resolve_checkpoint_format), 'gptq' or 'gptq_v2'.
    """
    cfg.validate()
    checkpoint_format = resolve_checkpoint_format(cfg.sym, checkpoint_format)
    check_layers_fit(model, cfg)
    model.eval()
    report = quantize_blocks(model, calib, cfg, device=device, checkpoint_format=checkpoint_format,
                             progress=progress)
    model.config.quantization_config = quantization_config(cfg, checkpoint_format)
    return report


def _quant_module_names(model: nn.Module) -> set[str]:
    return {n for n, m in model.named_modules() if isinstance(m, QuantLinear)}


def save_quantized(model: nn.Module, out_dir, tokenizer=None, dtype=torch.float16, report: QuantReport | None = None,
                   max_shard_bytes: int = 5 * 2**30) -> Path:
    """Write `model` (after quantize_model or load_gptq_model) as a GPTQ checkpoint directory.

    Packed tensors keep their format dtypes (int32, fp16 scales and bias); every other float tensor is
    written in `dtype`. Tied tensors (lm_head = embed_tokens) are written once, as transformers does.
    """
    qconfig = getattr(model.config, "quantization_config", None)
    if hasattr(qconfig, "to_dict"):
        qconfig = qconfig.to_dict()
    if not isinstance(qconfig, dict) or qconfig.get("quant_method") != QUANT_METHOD:
        raise UserError("save_quantized: the model has no GPTQ quantization_config; run quantize_model first")
    qnames = _quant_module_names(model)
    tensors, seen = {}, set()
    for key, t in model.state_dict().items():
        ident = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.dtype)
        if ident in seen:
            continue
        seen.add(ident)
        owner = key.rpartition(".")[0]
        if owner not in qnames and t.is_floating_point():
            t = t.to(dtype)
        tensors[key] = t
    config_dict = model.config.to_dict()
    config_dict.pop("quantization_config", None)
    config_dict["dtype"] = str(dtype).replace("torch.", "")
    config_dict.pop("torch_dtype", None)
    if not config_dict.get("architectures"):
        config_dict["architectures"] = [type(model).__name__]

    def extras(tmp: Path) -> None:
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        gen = getattr(model, "generation_config", None)
        if gen is not None:
            gen.save_pretrained(tmp)
        if report is not None:
            (tmp / "quant_log.json").write_text(json.dumps(_report_dict(report), indent=1))

    return write_checkpoint(out_dir, tensors, config_dict, qconfig, extras, max_shard_bytes)


def _report_dict(report: QuantReport) -> dict:
    return {"method": report.method, "calib_samples": report.calib_samples, "calib_tokens": report.calib_tokens,
            "seconds": round(report.seconds, 2), "mean_rel_error": report.mean_error(),
            "layers": [vars(l) for l in report.layers]}


def quantize(model_spec: str, out_dir, cfg: GPTQConfig, calib=None, calib_samples: int = 128,
             calib_seqlen: int = 512, text_field: str = "text", calib_split: str = "train", device=None,
             dtype=None, checkpoint_format: str = "auto", seed: int = 0, progress: bool = True,
             overwrite: bool = False) -> QuantReport:
    """`quant gptq`: load MODEL (HF dir, hub id, .gguf, pkg:...), quantize, write the checkpoint to out_dir.

    out_dir is held for the whole run (quant.files.claim_output): one writer at a time, leftovers of a killed
    earlier run undone, and an existing non-empty out_dir refused unless `overwrite`, which replaces it only
    once the new checkpoint is complete.
    """
    from transformers import AutoTokenizer

    from quant.calibration import calibration_chunks, load_texts
    from quant.loading import load_float_model, materialize

    cfg.validate()
    checkpoint_format = resolve_checkpoint_format(cfg.sym, checkpoint_format)
    if cfg.calibrated and not calib:
        raise UserError("--calib is required for --method gptq (a text/jsonl/parquet file, directory or hub dataset)")
    with claim_output(out_dir, overwrite, action="quantization"):
        src = materialize(model_spec)
        if Path(out_dir).resolve() == Path(src).resolve():
            raise UserError(f"--out {out_dir} is the source model directory; choose another directory")
        tokenizer = AutoTokenizer.from_pretrained(src)
        chunks = None
        if cfg.calibrated:
            texts = load_texts(calib, text_field=text_field, split=calib_split)
            chunks = calibration_chunks(texts, tokenizer, calib_samples, calib_seqlen, seed=seed)
            if len(chunks) < calib_samples:
                log.warning("calibration text holds only %d samples of %d tokens (asked for %d)",
                            len(chunks), calib_seqlen, calib_samples)
        device = torch.device(device) if device else torch.device("cuda" if torch.cuda.is_available() else "cpu")
        dtype = dtype or (torch.float32 if device.type == "cpu" else torch.float16)
        model = load_float_model(src, dtype=dtype)
        report = quantize_model(model, chunks, cfg, device=device, checkpoint_format=checkpoint_format,
                                progress=progress)
        save_quantized(model, out_dir, tokenizer=tokenizer, report=report)
    return report


def _local_dir(path) -> Path:
    from quant.loading import resolve_model_path

    local = Path(resolve_model_path(str(path), what="GPTQ checkpoint"))
    if local.exists():
        return local
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(str(path)))


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
    """A GPTQ checkpoint (ours or the ecosystem's, v1 or v2, any g_idx) as an HF model with QuantLinear layers.

    The model is built from config.json with empty weights, the Linears that have `qweight` in the
    checkpoint become QuantLinear, and the safetensors are assigned directly (no random init, no copy).
    Non-quantized tensors are cast to `dtype` (default fp32 on CPU, fp16 on GPU).
    """
    from accelerate import init_empty_weights
    from safetensors import safe_open
    from transformers import AutoConfig, AutoModelForCausalLM

    path = _local_dir(path)
    q = read_quant_config(path)
    device = torch.device(device) if device else torch.device("cpu")
    dtype = dtype or (torch.float32 if device.type == "cpu" else torch.float16)
    config = AutoConfig.from_pretrained(path)
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # otherwise transformers would hand the model to optimum/gptqmodel
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)

    files = safetensors_files(path)
    state = {}
    for f in files:
        with safe_open(str(f), framework="pt", device="cpu") as fh:
            for k in fh.keys():
                state[k] = fh.get_tensor(k)
    qnames = sorted(k[: -len(".qweight")] for k in state if k.endswith(".qweight"))
    if not qnames:
        raise UserError(f"{path}: no '*.qweight' tensors; not a GPTQ checkpoint")
    for name in qnames:
        try:
            old = model.get_submodule(name)
        except AttributeError:
            raise UserError(f"{path}: tensor {name}.qweight names no module of {type(model).__name__}") from None
        if not isinstance(old, nn.Linear):
            raise UserError(f"{path}: {name} is a {type(old).__name__}, not a Linear; cannot hold GPTQ weights")
        bits, gs = _layer_params(path, name, state, old.in_features, q["bits"], q["group_size"])
        new = QuantLinear(old.in_features, old.out_features, bits, gs, bias=f"{name}.bias" in state,
                          checkpoint_format=q["checkpoint_format"], device="meta", kernel=kernel)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, new)
        if f"{name}.g_idx" not in state:  # very old checkpoints: the default layout
            state[f"{name}.g_idx"] = (torch.arange(old.in_features) // (gs if gs != -1 else old.in_features)).to(torch.int32)
    for k, t in state.items():
        if t.is_floating_point() and k.rpartition(".")[0] not in qnames:
            state[k] = t.to(dtype)
    try:
        result = model.load_state_dict(state, strict=False, assign=True)
    except RuntimeError as e:
        raise UserError(f"{path}: tensors do not match the config: {str(e).splitlines()[-1].strip()}") from None
    if result.unexpected_keys:
        log.warning("%s: ignored %d tensors not in the model, e.g. %s", path, len(result.unexpected_keys),
                    result.unexpected_keys[:3])
    model.tie_weights()
    still_meta = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if still_meta:
        raise UserError(f"{path}: checkpoint lacks {len(still_meta)} tensors, e.g. {still_meta[:3]}")
    model.config.quantization_config = q["raw"]
    model.to(device)
    model.eval()
    return model
