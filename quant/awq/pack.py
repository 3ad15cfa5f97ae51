"""The AWQ "gemm" checkpoint layout (docs/awq-format.md): nibble packing in AWQ's interleaved order, encoding one
layer's codes, the quantization_config block and reading a checkpoint's settings.

Per quantized Linear with K inputs, N outputs and G = ceil(K / group_size) groups:
qweight int32 [K, N/8] and qzeros int32 [G, N/8], both packed along the output dimension; scales fp16
[G, N]; W[k, n] = (q[k, n] - z[k // group_size, n]) * s[k // group_size, n]; no g_idx, no zero offset.
Within each int32 word, nibble i (bits 4i..4i+3) holds output column 8c + AWQ_ORDER[i] of the word's run
of eight columns.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import torch

from quant.errors import UserError
from quant.packed import quantizer_tag, raw_quant_config

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


def quantization_config(bits: int, group_size: int, meta: dict | None = None,
                        modules_to_not_convert: list[str] | None = None) -> dict:
    """The config.json block vLLM (awq, awq_marlin), transformers (AwqConfig) and GPTQModel read."""
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
        "meta": {"quantizer": [quantizer_tag()], **(meta or {})},
    }


_FALLBACKS = ("quant_config.json", "quantize_config.json")  # AutoAWQ's file first


def is_awq_checkpoint(path: str | os.PathLike) -> bool:
    raw = raw_quant_config(path, _FALLBACKS) if Path(path).is_dir() else None
    return isinstance(raw, dict) and str(raw.get("quant_method", "")).lower() == QUANT_METHOD


def read_quant_config(path: str | os.PathLike) -> dict:
    """Normalized AWQ settings of a checkpoint dir: bits, group_size, zero_point, version, modules_to_not_convert.

    Accepts the transformers keys (bits, group_size, version/format) and AutoAWQ's (w_bit, q_group_size).
    Refuses, in one line, what our reader cannot decode.
    """
    raw = raw_quant_config(path, _FALLBACKS)
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
