"""AWQ "gemm" on-disk format (quant/formats/AWQ.md): nibble packing in AWQ's interleaved order, the
quantization_config block, reading a checkpoint's settings, and the AWQ format object: a training base loaded
from its packed tensors (our `AWQLinear`) and a merge output requantized by our AWQ on the merged model's own
activations (`quant.formats.awq_encode`).

Per quantized Linear with K inputs, N outputs and G = ceil(K / group_size) groups:
qweight int32 [K, N/8] and qzeros int32 [G, N/8], both packed along the output dimension; scales fp16
[G, N]; W[k, n] = (q[k, n] - z[k // group_size, n]) * s[k // group_size, n]; no g_idx, no zero offset.
Within each int32 word, nibble i (bits 4i..4i+3) holds output column 8c + AWQ_ORDER[i] of the word's run
of eight columns.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from quant.errors import UserError
from quant.formats.base import METHOD_HELP, REQUIRED, EncodeRequest, PackedFormat, PackedRebuilder, option

BITS = 4
PACK = 32 // BITS  # codes per int32 word
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # nibble i holds column AWQ_ORDER[i] of its run of 8
AWQ_REVERSE = (0, 4, 1, 5, 2, 6, 3, 7)  # column j of a run of 8 sits in nibble AWQ_REVERSE[j]
GROUP_SIZES = (32, 64, 128)
METHODS = ("awq", "rtn")  # scale search + clipping, or plain round-to-nearest on the same grid
VERSION = "gemm"
QUANT_METHOD = "awq"
PARTS = ("qweight", "qzeros", "scales")  # the packed tensors of one layer (plus an optional bias)
_SHIFTS = tuple(BITS * i for i in range(PACK))


def group_count(in_features: int, group_size: int) -> int:
    return math.ceil(in_features / group_size)


def _to_int32(words: torch.Tensor) -> torch.Tensor:
    """int64 holding unsigned 32-bit patterns -> the same bits as int32 (two's complement)."""
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def pack(codes: torch.Tensor) -> torch.Tensor:
    """4-bit codes [R, C] (C a multiple of 8) -> int32 [R, C/8], packed along dim 1 in AWQ order."""
    R, C = codes.shape
    if C % PACK:
        raise ValueError(f"{C} columns cannot be packed in AWQ format: need a multiple of {PACK}")
    q = (codes.to(torch.int64) & 0xF).view(R, C // PACK, PACK)[:, :, list(AWQ_ORDER)]
    shifts = torch.tensor(_SHIFTS, dtype=torch.int64, device=codes.device)
    return _to_int32((q << shifts).sum(dim=-1))


def unpack(words: torch.Tensor) -> torch.Tensor:
    """Inverse of pack: int32 [R, W] -> int32 codes [R, 8W] in column order."""
    R, W = words.shape
    shifts = torch.tensor(_SHIFTS, dtype=torch.int32, device=words.device)
    # Arithmetic shifts of negative words sign-extend, but the mask keeps only the nibble.
    nibbles = (words.to(torch.int32).unsqueeze(-1) >> shifts) & 0xF  # [R, W, 8], nibble order
    return nibbles[:, :, list(AWQ_REVERSE)].reshape(R, W * PACK)


def encode(q: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor) -> dict[str, torch.Tensor]:
    """Checkpoint tensors of one layer from codes q [N, K] (nn.Linear layout), scales and zeros [N, G]."""
    if int(q.min()) < 0 or int(q.max()) > 15 or int(zeros.min()) < 0 or int(zeros.max()) > 15:
        raise ValueError("AWQ codes and zero points must lie in 0..15")
    return {"qweight": pack(q.T.contiguous()), "qzeros": pack(zeros.round().T.contiguous()),
            "scales": scales.T.contiguous().to(torch.float16)}


def layer_group_size(in_features: int, scales_rows: int, group_size: int, where: str = "layer") -> int:
    """One layer's group size: the config's, checked against the rows of its scales (one row is one group,
    which is also what group_size -1 in a config means)."""
    if scales_rows == 1:
        return in_features
    if group_size <= 0 or scales_rows != group_count(in_features, group_size):
        raise UserError(f"{where}: scales has {scales_rows} groups, which {in_features} inputs in groups of "
                        f"{group_size} do not make")
    return group_size


def dequantize_layer(parts: dict[str, torch.Tensor], group_size: int, dtype=torch.float32) -> torch.Tensor:
    """nn.Linear-layout weight [out, in] of one layer from its qweight / qzeros / scales (as stored)."""
    from quant.kernels.torch_awq import awq_dequantize

    return awq_dequantize(parts["qweight"], parts["qzeros"], parts["scales"], group_size, out_dtype=dtype).T.contiguous()


def quantization_config(bits: int, group_size: int, meta: dict | None = None,
                        modules_to_not_convert: list[str] | None = None) -> dict:
    """The config.json block vLLM (awq, awq_marlin), transformers (AwqConfig) and GPTQModel read."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        ver = version("qlora-finetune")
    except PackageNotFoundError:
        ver = "0"
    return {
        "quant_method": QUANT_METHOD,
        "bits": bits,
        "group_size": group_size,
        "zero_point": True,
        "version": VERSION,
        "modules_to_not_convert": modules_to_not_convert,
        # For readers that go through a GPTQ-style config (transformers' AwqConfig subclasses GPTQConfig,
        # whose default sym is True): the grid has zero points and no activation order.
        "sym": False,
        "desc_act": False,
        "meta": {"quantizer": [f"qlora-finetune:{ver}"], **(meta or {})},
    }


def raw_quant_config(path: str | os.PathLike) -> dict | None:
    """The quantization_config of a model directory (config.json, else quant_config/quantize_config.json)."""
    path = Path(path)
    cfg = path / "config.json"
    if cfg.exists():
        raw = json.loads(cfg.read_text()).get("quantization_config")
        if raw is not None:
            return raw
    for name in ("quant_config.json", "quantize_config.json"):
        if (path / name).exists():
            return json.loads((path / name).read_text())
    return None


def is_awq_checkpoint(path: str | os.PathLike) -> bool:
    raw = raw_quant_config(path) if Path(path).is_dir() else None
    return isinstance(raw, dict) and str(raw.get("quant_method", "")).lower() == QUANT_METHOD


def read_quant_config(path: str | os.PathLike) -> dict:
    """Normalized AWQ settings of a checkpoint dir: bits, group_size, zero_point, version, modules_to_not_convert.

    Accepts the transformers keys (bits, group_size, version/format) and AutoAWQ's (w_bit, q_group_size).
    Refuses, in one line, what our reader cannot decode.
    """
    raw = raw_quant_config(path)
    if raw is None:
        raise UserError(f"{path}: no quantization_config in config.json and no quant_config.json; not an AWQ checkpoint")
    method = str(raw.get("quant_method", QUANT_METHOD)).lower()
    if method != QUANT_METHOD:
        raise UserError(f"{path}: quant_method is {method!r}, expected {QUANT_METHOD!r}")
    bits = raw.get("bits", raw.get("w_bit"))
    group_size = raw.get("group_size", raw.get("q_group_size"))
    if bits is None or group_size is None:
        raise UserError(f"{path}: quantization_config needs 'bits' and 'group_size' (or w_bit / q_group_size)")
    version_ = str(raw.get("version") or raw.get("format") or VERSION).lower()
    if version_ != VERSION:
        raise UserError(f"{path}: AWQ version {version_!r} is not supported; only 'gemm' checkpoints can be read "
                        "(gemv/gemv_fast/marlin/llm-awq pack the codes differently)")
    if int(bits) != BITS:
        raise UserError(f"{path}: {bits}-bit AWQ is not supported; the gemm format is 4-bit")
    # zero_point false (GPTQModel's symmetric AWQ) still stores qzeros (all 2^(b-1)) in the gemm layout,
    # so it decodes the same way.
    return {"bits": BITS, "group_size": int(group_size), "zero_point": bool(raw.get("zero_point", True)),
            "version": VERSION,
            "modules_to_not_convert": raw.get("modules_to_not_convert"), "raw": raw}


# ------------------------------------------------------------------------------------------ the format object

# The AWQConfig fields a checkpoint records in quantization_config.meta that a requantization reuses.
_SEARCH_SETTINGS = ("method", "clip", "n_grid", "max_shrink", "duo_scaling", "search_tokens")


class _AWQRebuilder(PackedRebuilder):
    """Packed layers come back dequantized (quant's reference kernel) as `<module>.weight` in fp32, exactly the
    weights AWQLinear computes with."""

    label, parts, in_features_of = "AWQ", PARTS, "qweight"

    def __init__(self, ckpt, device):
        super().__init__(ckpt, device)
        self.group_size = read_quant_config(ckpt.path)["group_size"]

    def dequantize(self, module, parts):
        K = parts["qweight"].shape[0]
        gs = layer_group_size(K, parts["scales"].shape[0], self.group_size, f"{self.ckpt.path}: {module}")
        return dequantize_layer(parts, gs)


@dataclass
class AWQOptions:
    method: str | None = option(METHOD_HELP, str, METHODS)
    bits: int | None = option("default: 4, the only width of the AWQ gemm format", int, (BITS,))
    group_size: int | None = option("default: the AWQ base's, else 128 (32 or 64 for in_features like SmolLM2's "
                                    "576, which vLLM needs divisible)", int, GROUP_SIZES)


class AWQFormat(PackedFormat):
    name = "awq"
    label = "AWQ"
    summary = ("our AWQ on --calib data, run on the merged model's own activations layer by layer (default "
               "settings: those of an AWQ base, or 4-bit g128 with zero points); --method rtn for round-to-nearest on "
               "the same grid (no calibration). Loads with "
               "quant.awq_model.load_awq_model, vLLM (awq, awq_marlin), transformers and GPTQModel "
               "(quant/formats/AWQ.md).")
    quant_method = QUANT_METHOD
    options = AWQOptions
    packed_what = "AWQ scales"
    folds_scales = True
    calib_hint = ", or use --method rtn"

    def declares(self, quantization_config, model_dir):
        if super().declares(quantization_config, model_dir):
            return True
        # AutoAWQ-era directories: no quantization_config in config.json, a quant_config.json next to it.
        return quantization_config is None and model_dir is not None and is_awq_checkpoint(model_dir)

    def settings(self, model_dir, double_quant, quant_storage, compute_dtype):
        q = read_quant_config(model_dir)
        meta = q["raw"].get("meta") or {}
        return {"bits": q["bits"], "group_size": q["group_size"], "zero_point": q["zero_point"],
                "version": q["version"], **{k: meta[k] for k in _SEARCH_SETTINGS if k in meta}}

    def load_packed(self, model_dir, device, dtype):
        from quant.awq_model import load_awq_model

        return load_awq_model(model_dir, device=device, dtype=dtype)

    def rebuilder(self, spec, ckpt, model, device):
        return _AWQRebuilder(ckpt, device)

    def calibration(self, options):
        return REQUIRED if (getattr(options, "method", None) or METHODS[0]) == METHODS[0] else None

    def awq_config(self, base, options: AWQOptions | None):
        """Default: an AWQ base's own settings (group size, search settings), else 4-bit g128; the options
        override method, bits and group size."""
        from quant.awq import AWQConfig

        options = options or AWQOptions()
        cfg = AWQConfig(group_size=128)
        if base.format == self.name:
            cfg = AWQConfig(group_size=base.settings["group_size"],
                            **{k: v for k, v in base.settings.items() if k in _SEARCH_SETTINGS})
        # The merged weights are new, so scales are searched again unless --method rtn asks for plain rounding
        # (an RTN base is requantized with the search too: its recorded method describes the base, not the merge).
        cfg.method = METHODS[0]
        for key in ("method", "bits", "group_size"):
            if getattr(options, key) is not None:
                setattr(cfg, key, getattr(options, key))
        # On the base's own grid nearest rounding returns most weights to the base's codes and drops the adapter
        # (quickstart retention 0.57); dithered rounding keeps it in expectation (AWQConfig.rounding).
        cfg.rounding = "dithered" if cfg.calibrated else "nearest"
        return cfg.validate()

    def encoder(self, request: EncodeRequest):
        from quant.awq_model import check_layers_fit_awq
        from quant.formats.awq_encode import AWQEncoder

        cfg = self.awq_config(request.base, request.options)
        check_layers_fit_awq(request.model, cfg)
        run_dtype = torch.float32 if request.device.type == "cpu" else torch.float16
        return AWQEncoder(request.model, cfg, request.calib, request.device, run_dtype, request.dtype)
