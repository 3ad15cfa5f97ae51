"""`finetune merge`: adapter + base -> dequantize as trained -> add LoRA -> write bf16/fp16/nf4/fp4/int8/gptq,
streamed one decoder layer at a time into a temporary directory that is renamed to --out only when the
model, its config, tokenizer and merge_report.json are all complete.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from finetune.merge import report as fidelity_report
from finetune.merge.adapter import AdapterSource, read_adapter
from finetune.merge.source import (BaseWeights, Checkpoint, block_prefix, bnb_linear_names, compute_dtype,
                                   plan_units, skeleton, storage_dtype)
from finetune.merge.stream import PeakMemory, check_adapter_fits, stream_units
from finetune.merge.writers import (DEFAULT_SHARD_BYTES, Bnb4Encoder, FloatEncoder, Int8Encoder, ShardWriter,
                                    bnb_quantization_config, write_config, write_extras)
from quant.errors import UserError
from quant.files import publish

log = logging.getLogger(__name__)

FORMATS = ("bf16", "fp16", "nf4", "fp4", "int8", "gptq")
MERGE_INTO = ("auto", "dequantized", "original")
METHODS = ("gptq", "rtn")
_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


@dataclass
class MergeResult:
    out_dir: Path
    format: str
    base_quantization: str
    merge_into: str
    modules_merged: int
    seconds: float
    memory: dict
    report: dict  # everything in merge_report.json
    fidelity: dict | None = field(default=None)


def _gptq_config(base_dir: str, base_quantization: str, method: str, bits, group_size, desc_act):
    """Default: the GPTQ base's own settings (bits, group size, act-order, sym, damping), else 4-bit g128."""
    from quant.formats.gptq import read_quant_config
    from quant.gptq import GPTQConfig

    cfg = GPTQConfig(bits=4, group_size=128)
    if base_quantization == "gptq":
        q = read_quant_config(base_dir)
        raw = q["raw"]
        cfg = GPTQConfig(bits=q["bits"], group_size=q["group_size"], desc_act=q["desc_act"], sym=q["sym"],
                         damp_percent=float(raw.get("damp_percent", 0.01)),
                         static_groups=bool(raw.get("static_groups", False)),
                         true_sequential=bool(raw.get("true_sequential", True)),
                         mse=float((raw.get("meta") or {}).get("mse", 0.0)))
    cfg.method = method
    if bits is not None:
        cfg.bits = bits
    if group_size is not None:
        cfg.group_size = group_size
    if desc_act is not None:
        cfg.desc_act = desc_act
    return cfg.validate()


def _source_checkpoint(source: AdapterSource, merge_into: str, base_original: str | None) -> tuple[Checkpoint, str]:
    """The checkpoint streamed and how its Linear weights become what the adapter is added to."""
    quant = source.base.quantization
    base_is_gptq = lambda c: (c.quantization_config() or {}).get("quant_method") == "gptq"  # noqa: E731
    if merge_into == "original":
        if base_original:
            from quant.loading import materialize

            ckpt = Checkpoint(materialize(base_original, "--base-original"), "--base-original")
        elif quant == "gptq":
            raise UserError("--merge-into original on a GPTQ-trained adapter needs --base-original PATH: the "
                            "full-precision model the GPTQ base was quantized from")
        else:
            ckpt = Checkpoint(source.base.model_dir)  # a bitsandbytes base is stored in full precision
        if ckpt.quantization_config():
            raise UserError(f"{ckpt.path} is a quantized checkpoint "
                            f"({ckpt.quantization_config().get('quant_method')}); --merge-into original needs "
                            "the full-precision weights")
        return ckpt, "float"
    if base_original:
        raise UserError("--base-original is only used with --merge-into original")
    ckpt = Checkpoint(source.base.model_dir)
    if quant == "gptq" and not base_is_gptq(ckpt):
        raise UserError(f"the adapter was trained on a GPTQ base but {ckpt.path} is not a GPTQ checkpoint")
    if quant != "gptq" and base_is_gptq(ckpt):
        raise UserError(f"the adapter was trained on a {quant} base but {ckpt.path} is a GPTQ checkpoint")
    if quant != "gptq" and ckpt.quantization_config():
        raise UserError(f"{ckpt.path} is stored quantized ({ckpt.quantization_config().get('quant_method')}); the "
                        f"{quant} base is rebuilt from full-precision weights: pass --base with those")
    return ckpt, {"nf4": "bnb4", "fp4": "bnb4", "int8": "int8", "gptq": "gptq", "none": "float"}[quant]


def resolve_merge_into(merge_into: str, fmt: str, base_quantization: str) -> tuple[str, str]:
    """'auto': the dequantized weights, except when a bitsandbytes base is requantized onto its own grid.

    Rounding (dequantized + delta) back onto the grid the dequantized weights came from returns almost every
    weight to the code it started from: a LoRA delta is typically ~20x smaller than an NF4 step (measured on
    the quickstart: 0 of 2.3M codes changed, retention 0.09). Rounding (original + delta) instead keeps the
    delta in expectation and reproduces the trained base wherever the delta is zero (retention 0.997).
    A bitsandbytes base always has its full-precision checkpoint, so that path is free.
    """
    if merge_into != "auto":
        return merge_into, "as requested"
    if base_quantization in ("nf4", "fp4", "int8") and fmt == base_quantization:
        return "original", (f"auto: the {fmt} output grid is the base's own, where rounding the dequantized "
                            "weights + delta would round the delta away")
    return "dequantized", "auto: the weights the adapter was trained against"


def _check_out(out: Path, overwrite: bool, source: AdapterSource) -> None:
    if out.exists() and not overwrite and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"--out {out} already exists; pass --overwrite to replace it (only after a successful merge)")
    for other in (source.adapter_dir, source.run_dir, Path(source.base.model_dir)):
        if other is not None and out.resolve() == Path(other).resolve():
            raise UserError(f"--out {out} is the adapter, run or base directory; choose a new directory")


def merge(adapter_or_run_dir, out, fmt: str, base: str | None = None, merge_into: str = "auto",
          base_original: str | None = None, calib=None, method: str = "gptq", eval_data: str | None = None,
          report: bool = True, *, bits: int | None = None, group_size: int | None = None,
          desc_act: bool | None = None, calib_samples: int = 128, calib_seqlen: int = 512, dtype: str | None = None,
          device: str | None = None, overwrite: bool = False, eval_max_batches: int | None = None,
          max_shard_bytes: int = DEFAULT_SHARD_BYTES, progress: bool = True, echo=print) -> MergeResult:
    """Merge the LoRA adapter at `adapter_or_run_dir` into its base and write a `fmt` model directory at `out`.

    `merge_into`: 'dequantized' adds the adapter to the weights it was trained against (the quantized base,
    dequantized); 'original' to the full-precision weights (the bnb base's float checkpoint, or
    `base_original` for a GPTQ base); 'auto' picks (see resolve_merge_into). `calib` (gptq): text/jsonl/parquet
    file(s), directory, pkg:... or hub dataset, or a list of [1, T] token-id tensors. `report`: measure fidelity
    on `eval_data` (default: the run's data.eval) and print the table.
    """
    started = time.perf_counter()
    for value, allowed, what in ((fmt, FORMATS, "--format"), (merge_into, MERGE_INTO, "--merge-into"),
                                 (method, METHODS, "--method")):
        if value not in allowed:
            raise UserError(f"{what} must be one of {', '.join(allowed)} (got {value!r})")
    if dtype is not None and dtype not in _DTYPES:
        raise UserError(f"--dtype must be one of {', '.join(_DTYPES)} (got {dtype!r})")
    if fmt != "gptq" and (calib or bits is not None or group_size is not None or desc_act is not None):
        raise UserError("--calib/--bits/--group-size/--desc-act apply to --format gptq only")
    if dtype is not None and fmt in ("bf16", "fp16"):
        raise UserError(f"--dtype applies to quantized formats; --format {fmt} already fixes the dtype")
    calib = None if calib is None else [calib] if isinstance(calib, (str, Path)) else list(calib)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    source = read_adapter(adapter_or_run_dir, base)
    out = Path(out)
    _check_out(out, overwrite, source)
    merge_into, merge_into_reason = resolve_merge_into(merge_into, fmt, source.base.quantization)
    ckpt, mode = _source_checkpoint(source, merge_into, base_original)

    model = skeleton(ckpt.config)
    prefix, n_layers = block_prefix(model)
    bnb_names = bnb_linear_names(model)
    rebuild_dtype = compute_dtype(source.base.compute_dtype, device)
    weights = BaseWeights(ckpt, mode, quant_type=source.base.quantization, double_quant=source.base.double_quant,
                          quant_storage=storage_dtype(source.base.quant_storage, rebuild_dtype), dtype=rebuild_dtype,
                          bnb_names=bnb_names,
                          gptq=_read_gptq(ckpt.path) if mode == "gptq" else None, device=device)
    check_adapter_fits(source.loras, weights, n_layers)
    units = plan_units(ckpt.keys(), prefix, n_layers)

    out_dtype = _DTYPES[dtype] if dtype else {"bf16": torch.bfloat16, "fp16": torch.float16,
                                              "gptq": torch.float16}.get(fmt, torch.bfloat16)
    quant_config, gptq_cfg = None, None
    if fmt in ("bf16", "fp16"):
        encoder = FloatEncoder(out_dtype)
    elif fmt in ("nf4", "fp4"):
        encoder = Bnb4Encoder(bnb_names, fmt, True, out_dtype)
        quant_config = bnb_quantization_config(fmt, out_dtype)
    elif fmt == "int8":
        encoder = Int8Encoder(bnb_names, out_dtype)
        quant_config = bnb_quantization_config(fmt, out_dtype)
    else:
        encoder, gptq_cfg, quant_config = _gptq_encoder(source, model, method, bits, group_size, desc_act, calib,
                                                        calib_samples, calib_seqlen, device, out_dtype)

    info = {"adapter": str(source.adapter_dir), "base": source.base.spec, "base_dir": str(ckpt.path),
            "base_quantization": source.base.quantization, "merge_into": merge_into,
            "merge_into_reason": merge_into_reason, "format": fmt,
            "dtype": str(out_dtype).replace("torch.", ""), "rebuild_dtype": str(rebuild_dtype).replace("torch.", ""),
            "device": str(device), "lora_rank": source.rank, "adapted_modules": len(source.loras)}
    if gptq_cfg is not None:
        info["gptq"] = {**gptq_cfg.to_dict(), "checkpoint_format": quant_config["checkpoint_format"],
                        "calib": [str(c) if not torch.is_tensor(c) else "token ids" for c in calib] if calib else None,
                        "calib_samples": len(encoder.calib) if encoder.calib else 0, "calib_seqlen": calib_seqlen}

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.merge-", dir=out.parent))
    writer = ShardWriter(tmp, max_shard_bytes)
    try:
        bar = tqdm(total=len(units), desc=f"merge -> {fmt}", unit="layer", disable=not progress)
        stream_started = time.perf_counter()
        with PeakMemory(device) as mem:
            merged = stream_units(weights, units, source.loras, encoder, writer.add, lambda u: bar.update(1))
            writer.close()
        bar.close()
        merge_seconds = time.perf_counter() - started
        stream_seconds = time.perf_counter() - stream_started
        write_config(tmp, ckpt.config, out_dtype, quant_config)
        write_extras(tmp, source.tokenizer_dir, Path(source.base.model_dir))
        if gptq_cfg is not None:
            _write_gptq_extras(tmp, quant_config, encoder)
        info.update(modules_merged=merged, merge_seconds=round(merge_seconds, 2),
                    stream_seconds=round(stream_seconds, 2), memory=mem.as_dict(), output_bytes=writer.total)
        fidelity = None
        if report:
            fidelity = fidelity_report.fidelity(source, tmp, fmt, device, eval_data, eval_max_batches)
            info["fidelity"] = fidelity
        fidelity_report.write_report(tmp / "merge_report.json", info)
        publish(tmp, out)
    except BaseException:
        writer.abort()
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    echo(f"merged {merged} modules of {source.adapter_dir} ({merge_into} weights, {merge_into_reason}) into {fmt} "
         f"in {merge_seconds:.1f}s "
         f"(peak RSS {mem.peak_rss / 2**20:.0f} MiB"
         + (f", GPU {mem.peak_gpu / 2**20:.0f} MiB" if mem.peak_gpu is not None else "") + f") -> {out}")
    if fidelity is not None:
        echo(fidelity_report.table(fidelity, fmt if fmt != "gptq" else f"gptq, {method}", source.base.quantization))
        try:
            fidelity_report.log_to_wandb(source, info, fmt)
        except Exception as e:  # the model and its report are already in place; tracking is best effort
            log.warning("W&B logging of the merge report failed: %s", e)
    return MergeResult(out, fmt, source.base.quantization, merge_into, merged, time.perf_counter() - started,
                       mem.as_dict(), info, fidelity)


def _read_gptq(path) -> dict:
    from quant.formats.gptq import read_quant_config

    return read_quant_config(path)


def _gptq_encoder(source, model, method, bits, group_size, desc_act, calib, calib_samples, calib_seqlen, device,
                  out_dtype):
    from transformers import AutoTokenizer

    from finetune.merge.requant import GPTQEncoder, calibration_ids
    from finetune.recipe import DataConfig
    from quant.formats.gptq import quantization_config
    from quant.model import check_layers_fit, resolve_format

    if method == "gptq" and not calib:
        raise UserError("--format gptq needs calibration data: pass --calib DATA (text/jsonl/parquet file, "
                        "directory or pkg:...), e.g. the training data, or use --method rtn")
    cfg = _gptq_config(source.base.model_dir, source.base.quantization, method, bits, group_size, desc_act)
    check_layers_fit(model, cfg)
    checkpoint_format = resolve_format(cfg, "auto")
    ids = None
    if method == "gptq":
        if all(torch.is_tensor(c) for c in calib):  # Python API: token ids [1, T] already
            ids = [c.reshape(1, -1).long() for c in calib]
        else:
            tokenizer = AutoTokenizer.from_pretrained(str(source.tokenizer_dir))
            ids = calibration_ids([str(c) for c in calib], tokenizer, source.data or DataConfig(), calib_samples,
                                  calib_seqlen)
    run_dtype = torch.float32 if device.type == "cpu" else torch.float16
    encoder = GPTQEncoder(model, cfg, checkpoint_format, ids, device, run_dtype, out_dtype)
    return encoder, cfg, quantization_config(cfg, checkpoint_format)


def _write_gptq_extras(tmp: Path, quant_config: dict, encoder) -> None:
    """quantize_config.json (format doc A6: repeated for AutoGPTQ-style readers) and the per-layer log."""
    import json

    (tmp / "quantize_config.json").write_text(json.dumps(quant_config, indent=2))
    layers = [vars(entry) for entry in encoder.layers]
    errs = [entry["rel_error"] for entry in layers if entry["rel_error"] is not None]
    (tmp / "quant_log.json").write_text(json.dumps({"method": encoder.cfg.method, "mean_rel_error":
                                                    sum(errs) / len(errs) if errs else None, "layers": layers},
                                                   indent=1))
