"""GPTQ (docs/quantized-formats.md section A): the checkpoint's quantization_config, writing a checkpoint
directory, and the GPTQ format object: a training base loaded from its packed tensors (our `QuantLinear`) and a
merge output requantized by our GPTQ on the merged model's own activations (`quant.formats.gptq_encode`).
Bit packing and zero points are in `quant.formats.gptq_pack`.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from quant.errors import UserError
from quant.files import DEFAULT_SHARD_BYTES, ShardWriter, disk_needed, staged
from quant.formats.base import METHOD_HELP, REQUIRED, EncodeRequest, PackedFormat, PackedRebuilder, option
from quant.formats.gptq_pack import V1, resolve_checkpoint_format, zero_offset
from quant.gptq import METHODS

QUANT_METHOD = "gptq"
PARTS = ("qweight", "qzeros", "scales", "g_idx")  # the tensors of one packed Linear


def quantization_config(cfg, checkpoint_format: str = V1, tool: str = "qlora-finetune") -> dict:
    """The block written to config.json and quantize_config.json (doc A6 recommendation, plus meta)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        ver = version("qlora-finetune")
    except PackageNotFoundError:
        ver = "0"
    zero_offset(checkpoint_format)
    return {
        "quant_method": QUANT_METHOD,
        "bits": cfg.bits,
        "group_size": cfg.group_size,
        "desc_act": cfg.desc_act,
        "sym": cfg.sym,
        "true_sequential": cfg.true_sequential,
        "damp_percent": cfg.damp_percent,
        "static_groups": cfg.static_groups,
        "lm_head": False,
        "checkpoint_format": checkpoint_format,
        "format": checkpoint_format,
        "pack_dtype": "int32",
        "meta": {
            "quantizer": [f"{tool}:{ver}"],
            "method": cfg.method,
            "damp_auto_increment": cfg.damp_auto_increment,
            "mse": cfg.mse,
            "decorrelate": cfg.decorrelate,
        },
    }


def read_quant_config(path: str | os.PathLike) -> dict:
    """Normalized GPTQ settings of a checkpoint dir: bits, group_size, desc_act, sym, checkpoint_format."""
    path = Path(path)
    raw = None
    cfg_file = path / "config.json"
    if cfg_file.exists():
        raw = json.loads(cfg_file.read_text()).get("quantization_config")
    for name in ("quantize_config.json", "quant_config.json"):
        if raw is None and (path / name).exists():
            raw = json.loads((path / name).read_text())
    if raw is None:
        raise UserError(f"{path}: no quantization_config in config.json and no quantize_config.json; not a GPTQ checkpoint")
    method = raw.get("quant_method", QUANT_METHOD)
    if method != QUANT_METHOD:
        raise UserError(f"{path}: quant_method is {method!r}, expected {QUANT_METHOD!r}")
    if "bits" not in raw and "w_bit" not in raw:
        raise UserError(f"{path}: quantization_config has no 'bits'")
    fmt = raw.get("checkpoint_format") or raw.get("format") or V1
    if raw.get("is_marlin_format"):
        raise UserError(f"{path}: marlin-repacked GPTQ checkpoints are not supported; use the original gptq checkpoint")
    zero_offset(fmt)
    out = {
        "bits": int(raw.get("bits", raw.get("w_bit"))),
        "group_size": int(raw.get("group_size", raw.get("q_group_size", 128))),
        "desc_act": bool(raw.get("desc_act", False)),
        "sym": bool(raw.get("sym", True)),
        "checkpoint_format": fmt,
        "raw": raw,
    }
    if out["bits"] not in (2, 3, 4, 8):
        raise UserError(f"{path}: {out['bits']}-bit GPTQ is not supported (2, 3, 4 or 8)")
    return out


def write_checkpoint(out_dir, tensors: dict[str, torch.Tensor], config_dict: dict, qconfig: dict,
                     extra_dir_writer=None, max_shard_bytes: int = DEFAULT_SHARD_BYTES) -> Path:
    """Write tensors + config.json + quantize_config.json to a staged directory renamed to out_dir when complete.

    `extra_dir_writer(tmp_dir)` adds files such as the tokenizer before the rename. An existing out_dir
    is replaced only after the new one is complete.
    """
    out = Path(out_dir)
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    with staged(out, need=disk_needed(total, max_shard_bytes)) as tmp:
        writer = ShardWriter(tmp, max_shard_bytes)
        try:
            for k, v in tensors.items():
                writer.add({k: v})
            writer.close()
        except BaseException:
            writer.abort()
            raise
        write_quant_config(tmp, dict(config_dict, quantization_config=qconfig), qconfig)
        if extra_dir_writer is not None:
            extra_dir_writer(tmp)
    return out


def write_quant_config(directory: Path, config_dict: dict | None, qconfig: dict) -> None:
    """config.json (when given) and quantize_config.json, repeated for AutoGPTQ-style readers (doc A6)."""
    if config_dict is not None:
        (directory / "config.json").write_text(json.dumps(config_dict, indent=2, sort_keys=True))
    (directory / "quantize_config.json").write_text(json.dumps(qconfig, indent=2))


def base_gptq_config(settings: dict):
    """The GPTQConfig a checkpoint was quantized with, from its normalized settings (`read_quant_config`)."""
    from quant.gptq import GPTQConfig

    return GPTQConfig(bits=settings["bits"], group_size=settings["group_size"], desc_act=settings["desc_act"],
                      sym=settings["sym"], damp_percent=settings["damp_percent"],
                      static_groups=settings["static_groups"], true_sequential=settings["true_sequential"],
                      mse=settings["mse"])


def dequantize_gptq(parts: dict[str, torch.Tensor], bits: int, zero_offset: int) -> torch.Tensor:
    """nn.Linear-layout fp32 weight [out, in] of one GPTQ layer from qweight/qzeros/scales/g_idx."""
    from quant.kernels.torch_ref import gptq_dequantize

    return gptq_dequantize(parts["qweight"], parts["qzeros"], parts["scales"], parts["g_idx"], bits, zero_offset,
                           out_dtype=torch.float32).T.contiguous()


class _GPTQRebuilder(PackedRebuilder):
    """Packed layers come back dequantized (quant's reference kernel) as `<module>.weight` in fp32."""

    label, parts, in_features_of = "GPTQ", PARTS, "g_idx"

    def __init__(self, ckpt, device):
        super().__init__(ckpt, device)
        q = read_quant_config(ckpt.path)
        self.bits, self.zero_offset = q["bits"], zero_offset(q["checkpoint_format"])

    def dequantize(self, module, parts):
        return dequantize_gptq(parts, self.bits, self.zero_offset)


@dataclass
class GPTQOptions:
    method: str | None = option(METHOD_HELP, str, METHODS)
    # bits and group_size are shared with the AWQ output (one flag each, this help): say both formats' values.
    bits: int | None = option("default: a GPTQ/AWQ base's own, else 4 (awq: 4 only)", int, (2, 3, 4, 8))
    group_size: int | None = option("default: a GPTQ/AWQ base's own, else 128; gptq: -1 = one group per row; awq: "
                                    "32, 64 or 128", int)
    desc_act: bool | None = option("act-order; default: the GPTQ base's, else off", bool)


class GPTQFormat(PackedFormat):
    name = "gptq"
    label = "GPTQ"
    summary = ("our GPTQ on --calib data, run on the merged model's own activations layer by layer (default "
               "settings: those of a GPTQ base, or 4-bit g128 symmetric); --method rtn for round-to-nearest (no "
               "calibration). Loads with quant.model.load_gptq_model, transformers + GPTQModel/optimum and vLLM "
               "(docs/quantized-formats.md A).")
    quant_method = QUANT_METHOD
    options = GPTQOptions
    packed_what = "GPTQ scales"
    calib_hint = ", or use --method rtn"

    def declares(self, quantization_config, model_dir):
        if super().declares(quantization_config, model_dir):
            return True
        # AutoGPTQ-era directories: no config.json, only quantize_config.json.
        return (quantization_config is None and model_dir is not None and not (model_dir / "config.json").exists()
                and (model_dir / "quantize_config.json").exists())

    def settings(self, model_dir, double_quant, quant_storage, compute_dtype):
        q = read_quant_config(model_dir)
        raw = q["raw"]
        return {"bits": q["bits"], "group_size": q["group_size"], "desc_act": q["desc_act"], "sym": q["sym"],
                "checkpoint_format": q["checkpoint_format"], "damp_percent": float(raw.get("damp_percent", 0.01)),
                "static_groups": bool(raw.get("static_groups", False)),
                "true_sequential": bool(raw.get("true_sequential", True)),
                "mse": float((raw.get("meta") or {}).get("mse", 0.0))}

    def load_packed(self, model_dir, device, dtype):
        from quant.model import load_gptq_model

        return load_gptq_model(model_dir, device=device, dtype=dtype)

    def rebuilder(self, spec, ckpt, model, device):
        return _GPTQRebuilder(ckpt, device)

    def calibration(self, options):
        return REQUIRED if (getattr(options, "method", None) or METHODS[0]) == METHODS[0] else None

    def gptq_config(self, base, options: GPTQOptions | None):
        """Default: a GPTQ base's own settings (bits, group size, act-order, sym, damping), else 4-bit g128;
        the options override bits, group size and act-order."""
        from quant.gptq import GPTQConfig

        options = options or GPTQOptions()
        cfg = base_gptq_config(base.settings) if base.format == self.name else GPTQConfig(bits=4, group_size=128)
        cfg.method = options.method or METHODS[0]
        for key in ("bits", "group_size", "desc_act"):
            if getattr(options, key) is not None:
                setattr(cfg, key, getattr(options, key))
        return cfg.validate()

    def encoder(self, request: EncodeRequest):
        from quant.formats.gptq_encode import GPTQEncoder
        from quant.model import check_layers_fit

        cfg = self.gptq_config(request.base, request.options)
        check_layers_fit(request.model, cfg)
        run_dtype = torch.float32 if request.device.type == "cpu" else torch.float16
        return GPTQEncoder(request.model, cfg, resolve_checkpoint_format(cfg.sym), request.calib, request.device,
                           run_dtype, request.dtype)
