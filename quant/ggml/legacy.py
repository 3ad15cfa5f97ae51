"""ggml's blocks of 32: Q8_0, Q4_0, Q4_1, Q5_0, Q5_1 (layouts and quantizers of ggml-quants.c).

Each format is a `BlockFormat` with `quantize(x, qw, sigma2) -> fields`, `pack(fields) -> bytes` and
`decode(fields) -> float` (the values the bytes mean, computed in the order ggml's dequantizer computes them).
Without an importance `qw` the quantizers are ggml's reference ones (bit-exact with the `gguf` package's
numpy quantizers, which copy them); with one they are ggml's importance-weighted searches, with per-value
weights qw·sqrt(sigma2 + x²) (sigma2: the mean square of the row).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from quant.ggml import search

Fields = dict[str, torch.Tensor]


@dataclass(frozen=True)
class BlockFormat:
    name: str
    block: int
    nbytes: int
    quantize: Callable[[torch.Tensor, torch.Tensor | None, torch.Tensor | None], Fields]
    pack: Callable[[Fields], torch.Tensor]
    decode: Callable[[Fields], torch.Tensor]


def f16_bytes(v: torch.Tensor) -> torch.Tensor:
    """[B] float -> [B, 2] little-endian fp16 bytes (fp16 rounding: nearest even, as GGML_FP32_TO_FP16)."""
    return v.to(torch.float16).contiguous().view(torch.uint8).view(-1, 2)


def f16(v: torch.Tensor) -> torch.Tensor:
    """The value a stored fp16 field reads back as."""
    return v.to(torch.float16).float()


def nibbles(lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    return ((lo.to(torch.int32) & 15) | ((hi.to(torch.int32) & 15) << 4)).to(torch.uint8)


def high_bits32(q: torch.Tensor) -> torch.Tensor:
    """Bit 4 of each of the 32 codes of a block as one little-endian uint32 ([B, 4] bytes), code j at bit j."""
    bits = ((q.to(torch.int64) >> 4) & 1) << torch.arange(32, device=q.device)
    word = bits.sum(-1, keepdim=True)
    return ((word >> torch.arange(0, 32, 8, device=q.device)) & 255).to(torch.uint8)


def _weights(x: torch.Tensor, qw: torch.Tensor, sigma2: torch.Tensor) -> torch.Tensor:
    return qw * torch.sqrt(sigma2.unsqueeze(-1) + x * x)


def _inverse(d: torch.Tensor) -> torch.Tensor:
    return torch.where(d == 0, torch.zeros_like(d), 1 / torch.where(d == 0, torch.ones_like(d), d))


# ---- Q8_0: d, 32 x int8; d = amax/127, q = roundf(x/d); an importance matrix does not change it (as in ggml).

def _q8_0(x, qw, sigma2) -> Fields:
    d = x.abs().amax(-1) / 127
    q = search.round_away(x * _inverse(d).unsqueeze(-1))
    return {"d": d, "q": q}


Q8_0 = BlockFormat(
    "Q8_0", 32, 34, _q8_0,
    pack=lambda f: torch.cat([f16_bytes(f["d"]), f["q"].to(torch.int8).view(torch.uint8)], -1),
    decode=lambda f: f["q"] * f16(f["d"]).unsqueeze(-1),
)


# ---- Q4_0 / Q5_0: d, codes q in [0, 2^b) meaning (q - 2^(b-1))·d.

def _symmetric(bits: int):
    half = 1 << (bits - 1)

    def quantize(x, qw, sigma2) -> Fields:
        if qw is not None:
            d, q = search.symmetric(x, half, _weights(x, qw, sigma2))
            return {"d": d, "q": q}
        d = search.signed_max(x) / -half
        q = torch.floor(x * _inverse(d).unsqueeze(-1) + (half + 0.5)).clamp_(0, 2 * half - 1)
        return {"d": d, "q": q}

    return quantize


def _decode_symmetric(bits: int):
    return lambda f: f16(f["d"]).unsqueeze(-1) * (f["q"] - (1 << (bits - 1)))


Q4_0 = BlockFormat(
    "Q4_0", 32, 18, _symmetric(4),
    pack=lambda f: torch.cat([f16_bytes(f["d"]), nibbles(f["q"][:, :16], f["q"][:, 16:])], -1),
    decode=_decode_symmetric(4),
)

Q5_0 = BlockFormat(
    "Q5_0", 32, 22, _symmetric(5),
    pack=lambda f: torch.cat([f16_bytes(f["d"]), high_bits32(f["q"]), nibbles(f["q"][:, :16], f["q"][:, 16:])], -1),
    decode=_decode_symmetric(5),
)


# ---- Q4_1 / Q5_1: d, m, codes q in [0, 2^b) meaning q·d + m.

def _offset(bits: int):
    nmax = (1 << bits) - 1

    def quantize(x, qw, sigma2) -> Fields:
        if qw is not None:
            d, the_min, q = search.asymmetric(x, _weights(x, qw, sigma2), nmax, -0.9, 0.05, 36)
            return {"d": d, "m": -the_min, "q": q}
        lo, hi = x.amin(-1), x.amax(-1)
        d = (hi - lo) / nmax
        q = torch.floor((x - lo.unsqueeze(-1)) * _inverse(d).unsqueeze(-1) + 0.5).clamp_(0, nmax)
        return {"d": d, "m": lo, "q": q}

    return quantize


def _decode_offset(f: Fields) -> torch.Tensor:
    return f16(f["d"]).unsqueeze(-1) * f["q"] + f16(f["m"]).unsqueeze(-1)


Q4_1 = BlockFormat(
    "Q4_1", 32, 20, _offset(4),
    pack=lambda f: torch.cat([f16_bytes(f["d"]), f16_bytes(f["m"]), nibbles(f["q"][:, :16], f["q"][:, 16:])], -1),
    decode=_decode_offset,
)

Q5_1 = BlockFormat(
    "Q5_1", 32, 24, _offset(5),
    pack=lambda f: torch.cat([f16_bytes(f["d"]), f16_bytes(f["m"]), high_bits32(f["q"]),
                              nibbles(f["q"][:, :16], f["q"][:, 16:])], -1),
    decode=_decode_offset,
)
