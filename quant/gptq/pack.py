"""The GPTQ checkpoint layout (docs/quantized-formats.md section A): bit packing, zero points and the
quantization_config block, which GPTQLinear, the kernels, the checkpoint writer and the merge all share.

Packing is one LSB-first bit stream per column (qweight) or per row (qzeros): value j of every run of
32 values starts at bit bits·j of `bits` consecutive int32 words. For 2/4/8 bits no value straddles a
word, which reproduces the per-word layout of the doc; for 3 bits it is exactly the doc's 3-word scheme.

Zero points: checkpoint_format 'gptq' (v1) stores z - 1, 'gptq_v2' stores z (doc A3); `zero_offset` is the
one place that says so.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from quant.errors import UserError
from quant.grid import VALID_BITS
from quant.packed import quantizer_tag, raw_quant_config

V1, V2 = "gptq", "gptq_v2"
FORMATS = (V1, V2)  # checkpoint_format values
_WORD = 32


QUANT_METHOD = "gptq"
PARTS = ("qweight", "qzeros", "scales", "g_idx")  # the tensors of one packed Linear


def _check_bits(bits: int) -> None:
    if bits not in VALID_BITS:
        raise ValueError(f"unsupported bit width {bits}")


def packed_len(n: int, bits: int) -> int:
    """Words needed for n values; n must fill whole words (and whole 32-value runs for 3 bits)."""
    _check_bits(bits)
    unit = _WORD if bits == 3 else _WORD // bits
    if n % unit:
        raise ValueError(f"{n} values cannot be packed at {bits} bits: need a multiple of {unit}")
    return n * bits // _WORD


def _to_int32(words: torch.Tensor) -> torch.Tensor:
    """int64 holding unsigned 32-bit patterns -> the same bits as int32 (two's complement)."""
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def pack_rows(Q: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack integer codes Q [R, C] along dim 0 into int32 [R·bits/32, C]."""
    R, C = Q.shape
    n_words = packed_len(R, bits)
    q = Q.to(torch.int64) & (2**bits - 1)
    if bits != 3:
        per = _WORD // bits
        q = q.reshape(R // per, per, C)
        shifts = (torch.arange(per, device=Q.device) * bits).view(1, per, 1)
        return _to_int32((q << shifts).sum(dim=1))
    q = q.reshape(R // _WORD, _WORD, C)
    words = torch.zeros(n_words // 3, 3, C, dtype=torch.int64, device=Q.device)
    for j in range(_WORD):
        bit = bits * j
        w, s = divmod(bit, _WORD)
        words[:, w] |= (q[:, j] << s) & 0xFFFFFFFF
        if s + bits > _WORD:  # the value straddles into the next word
            words[:, w + 1] |= q[:, j] >> (_WORD - s)
    return _to_int32(words.view(-1, C))


def unpack_rows(P: torch.Tensor, bits: int, rows: int | None = None) -> torch.Tensor:
    """Inverse of pack_rows: int32 [R·bits/32, C] -> int32 codes [R, C] (R = rows, default all)."""
    _check_bits(bits)
    W, C = P.shape
    mask = 2**bits - 1
    if bits != 3:
        per = _WORD // bits
        shifts = (torch.arange(per, device=P.device, dtype=torch.int32) * bits).view(1, per, 1)
        # int32 arithmetic shifts sign-extend, but the mask drops everything above the field.
        q = ((P.to(torch.int32).unsqueeze(1) >> shifts) & mask).reshape(W * per, C)
    else:
        words = (P.to(torch.int64) & 0xFFFFFFFF).view(W // 3, 3, C)
        q = torch.empty(W // 3, _WORD, C, dtype=torch.int32, device=P.device)
        for j in range(_WORD):
            w, s = divmod(bits * j, _WORD)
            v = words[:, w] >> s
            if s + bits > _WORD:
                v = v | (words[:, w + 1] << (_WORD - s))
            q[:, j] = v & mask
        q = q.view(-1, C)
    return q if rows is None else q[:rows]


def pack_cols(Z: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack Z [R, C] along dim 1 (the qzeros layout) into int32 [R, C·bits/32]."""
    return pack_rows(Z.T.contiguous(), bits).T.contiguous()


def unpack_cols(P: torch.Tensor, bits: int, cols: int | None = None) -> torch.Tensor:
    return unpack_rows(P.T.contiguous(), bits, cols).T.contiguous()


def zero_offset(checkpoint_format: str) -> int:
    """What readers add to a stored zero: v1 stores z - 1 (doc A3)."""
    if checkpoint_format not in FORMATS:
        raise UserError(f"unknown GPTQ checkpoint_format {checkpoint_format!r}; expected one of {', '.join(FORMATS)}")
    return 1 if checkpoint_format == V1 else 0


def encode_zeros(zeros: torch.Tensor, bits: int, checkpoint_format: str) -> torch.Tensor:
    """Real zero points [G, N] -> packed qzeros in the given format."""
    stored = zeros.to(torch.int64) - zero_offset(checkpoint_format)
    if stored.min() < 0:
        raise ValueError("zero point 0 cannot be stored in GPTQ v1; write gptq_v2 (doc A3 hazard)")
    return pack_cols(stored, bits)


def decode_zeros(qzeros: torch.Tensor, bits: int, checkpoint_format: str, cols: int | None = None) -> torch.Tensor:
    """Packed qzeros -> real zero points (int32). A v1 field 2^b-1 decodes to 2^b, as vLLM and
    AutoGPTQ's qlinear_cuda read it; we never write such a field."""
    return unpack_cols(qzeros, bits, cols) + zero_offset(checkpoint_format)


def convert_qzeros(qzeros: torch.Tensor, bits: int, src: str, dst: str) -> torch.Tensor:
    """Re-encode packed zeros between v1 and v2 field by field (no word arithmetic: 3-bit fields straddle)."""
    if src == dst:
        return qzeros
    z = decode_zeros(qzeros, bits, src)
    return encode_zeros(z, bits, dst)


def resolve_checkpoint_format(sym: bool, checkpoint_format: str = "auto") -> str:
    """'auto': v1 for symmetric grids, read by every GPTQ tool; v2 for asymmetric ones, because GPTQModel (and
    transformers through it) refuses any sym=False v1 checkpoint not written by itself. Asymmetric zeros are
    kept >= 1 either way, so an explicit v1 asym checkpoint is still safe for v1-only readers (AutoGPTQ, older
    vLLM)."""
    if checkpoint_format == "auto":
        return V1 if sym else V2
    zero_offset(checkpoint_format)
    return checkpoint_format


# ------------------------------------------------------------------------------------------ quantization_config

# Keys of quantization_config (top level, as every GPTQ tool writes them) and of its `meta` (ours and GPTQModel's)
# that are GPTQConfig fields: what a checkpoint records of the settings it was quantized with.
CONFIG_KEYS = ("bits", "group_size", "desc_act", "sym", "true_sequential", "damp_percent", "static_groups")
META_KEYS = ("method", "damp_auto_increment", "mse", "decorrelate", "expert_min_tokens")


def quantization_config(cfg, checkpoint_format: str = V1) -> dict:
    """The block written to config.json and quantize_config.json for a GPTQConfig `cfg` (doc A6, plus meta)."""
    zero_offset(checkpoint_format)
    return {
        "quant_method": QUANT_METHOD,
        **{k: getattr(cfg, k) for k in CONFIG_KEYS},
        "lm_head": False,
        "checkpoint_format": checkpoint_format,
        "format": checkpoint_format,
        "pack_dtype": "int32",
        "meta": {"quantizer": [quantizer_tag()], **{k: getattr(cfg, k) for k in META_KEYS}},
    }


def read_quant_config(path: str | os.PathLike) -> dict:
    """Normalized GPTQ settings of a checkpoint dir: bits, group_size, desc_act, sym, checkpoint_format, the
    GPTQConfig fields it records (`recorded`) and the block as stored (`raw`)."""
    path = Path(path)
    raw = raw_quant_config(path, ("quantize_config.json", "quant_config.json"))
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
    if out["bits"] not in VALID_BITS:
        raise UserError(f"{path}: {out['bits']}-bit GPTQ is not supported (2, 3, 4 or 8)")
    meta = raw.get("meta") if isinstance(raw.get("meta"), dict) else {}
    recorded = {k: raw[k] for k in CONFIG_KEYS if raw.get(k) is not None}
    recorded.update({k: meta[k] for k in META_KEYS if meta.get(k) is not None})
    out["recorded"] = {**recorded, **{k: out[k] for k in ("bits", "group_size", "desc_act", "sym")}}
    return out
