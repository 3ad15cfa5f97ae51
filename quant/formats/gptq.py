"""GPTQ on-disk format (docs/quantized-formats.md section A): bit packing, zero-point conventions,
writing a checkpoint directory atomically and reading a checkpoint's quantization_config.

Packing is one LSB-first bit stream per column (qweight) or per row (qzeros): value j of every run of
32 values starts at bit bits·j of `bits` consecutive int32 words. For 2/4/8 bits no value straddles a
word, which reproduces the per-word layout of the doc; for 3 bits it is exactly the doc's 3-word scheme.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

from quant.errors import UserError
from quant.files import publish

FORMATS = ("gptq", "gptq_v2")
_WORD = 32


def _check_bits(bits: int) -> None:
    if bits not in (2, 3, 4, 8):
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
    return 1 if checkpoint_format == "gptq" else 0


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


def quantization_config(cfg, checkpoint_format: str = "gptq", tool: str = "qlora-finetune") -> dict:
    """The block written to config.json and quantize_config.json (doc A6 recommendation, plus meta)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        ver = version("qlora-finetune")
    except PackageNotFoundError:
        ver = "0"
    zero_offset(checkpoint_format)
    return {
        "quant_method": "gptq",
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
    method = raw.get("quant_method", "gptq")
    if method != "gptq":
        raise UserError(f"{path}: quant_method is {method!r}, expected 'gptq'")
    if "bits" not in raw and "w_bit" not in raw:
        raise UserError(f"{path}: quantization_config has no 'bits'")
    fmt = raw.get("checkpoint_format") or raw.get("format") or "gptq"
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


def _shard(tensors: dict[str, torch.Tensor], max_bytes: int) -> list[dict[str, torch.Tensor]]:
    shards, cur, size = [], {}, 0
    for k, t in tensors.items():
        n = t.numel() * t.element_size()
        if cur and size + n > max_bytes:
            shards.append(cur)
            cur, size = {}, 0
        cur[k], size = t, size + n
    if cur:
        shards.append(cur)
    return shards


def write_checkpoint(out_dir, tensors: dict[str, torch.Tensor], config_dict: dict, qconfig: dict,
                     extra_dir_writer=None, max_shard_bytes: int = 5 * 2**30) -> Path:
    """Write tensors + config.json + quantize_config.json to a temp dir, then rename it to out_dir.

    `extra_dir_writer(tmp_dir)` adds files such as the tokenizer before the rename. An existing out_dir
    is replaced only after the new one is complete.
    """
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        shards = _shard({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, max_shard_bytes)
        meta = {"format": "pt"}
        if len(shards) == 1:
            save_file(shards[0], str(tmp / "model.safetensors"), metadata=meta)
        else:
            weight_map, total = {}, 0
            for i, shard in enumerate(shards, 1):
                name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
                save_file(shard, str(tmp / name), metadata=meta)
                for k, v in shard.items():
                    weight_map[k] = name
                    total += v.numel() * v.element_size()
            index = {"metadata": {"total_size": total}, "weight_map": weight_map}
            (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
        config_dict = dict(config_dict, quantization_config=qconfig)
        (tmp / "config.json").write_text(json.dumps(config_dict, indent=2, sort_keys=True))
        (tmp / "quantize_config.json").write_text(json.dumps(qconfig, indent=2))
        if extra_dir_writer is not None:
            extra_dir_writer(tmp)
        publish(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def safetensors_files(path: str | os.PathLike) -> list[Path]:
    path = Path(path)
    index = path / "model.safetensors.index.json"
    if index.exists():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [path / n for n in names]
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise UserError(f"{path}: no .safetensors weights found")
    return files
