"""ggml's K-quants: super-blocks of 256 values with quantized per-sub-block scales (layouts of ggml-quants.c).

- Q4_K / Q5_K: 8 sub-blocks of 32, each x ≈ d·sc_j·q − dmin·m_j with 6-bit sc_j, m_j and 4/5-bit q.
  144 / 176 bytes: d, dmin (fp16), 12 bytes of packed 6-bit scales and mins, [32 bytes of 5th bits], 128 bytes of
  nibbles.
- Q6_K: 16 sub-blocks of 16, x ≈ d·sc_j·(q − 32) with int8 sc_j and 6-bit q. 210 bytes: 128 bytes of low
  nibbles, 64 of high 2-bit pairs, 16 int8 scales, d (fp16).

Without an importance `qw` these are ggml's reference quantizers (`quantize_row_q*_K_ref`: min/max-seeded
searches weighted by |x| + rms, scales quantized by their maximum); with one, ggml's importance searches
(`quantize_row_q*_K_impl`: per-value weights qw·sqrt(sigma2 + x²), sub-block scales quantized by a weighted
search of their own). After the scales are fixed every value is re-rounded against the stored fp16/6-bit scales.
"""

from __future__ import annotations

import torch

from quant.ggml import search
from quant.ggml.legacy import BlockFormat, Fields, f16, f16_bytes, nibbles

QK_K = 256


def _scale_min(x: torch.Tensor, qw: torch.Tensor | None, nmax: int, ref: tuple[float, float, int]) -> Fields:
    """Shared Q4_K/Q5_K search: x [B, 256] -> d, dmin [B], sc, m [B, 8] (6-bit), q [B, 256] in [0, nmax]."""
    B = x.shape[0]
    sub = x.view(B, 8, 32)
    if qw is None:
        rms = sub.pow(2).mean(-1, keepdim=True).sqrt()
        w = rms + sub.abs()
        scales, mins, L = search.asymmetric(sub.reshape(-1, 32), w.reshape(-1, 32), nmax, *ref)
        scales, mins = scales.view(B, 8), mins.view(B, 8)
        max_scale, max_min = scales.amax(-1), mins.amax(-1)
        inv_s = torch.where(max_scale > 0, search.over(63, torch.where(max_scale > 0, max_scale, 1)), 0)
        inv_m = torch.where(max_min > 0, search.over(63, torch.where(max_min > 0, max_min, 1)), 0)
        sc = torch.round(inv_s.unsqueeze(-1) * scales).clamp_(0, 63)
        m = torch.round(inv_m.unsqueeze(-1) * mins).clamp_(0, 63)
        d, dmin = max_scale / 63, max_min / 63
    else:
        sigma2 = 2 * x.pow(2).sum(-1) / QK_K
        w = qw.view(B, 8, 32) * torch.sqrt(sigma2.view(B, 1, 1) + sub * sub)
        scales, mins, L = search.asymmetric(sub.reshape(-1, 32), w.reshape(-1, 32), nmax, -0.9, 0.05, 36)
        sw = w.sum(-1)
        d, sc = search.positive_scales(scales.view(B, 8), 63, sw)
        dmin, m = search.positive_scales(mins.view(B, 8), 63, sw)
    L = L.view(B, 8, 32)
    dj = (f16(d).unsqueeze(-1) * sc).unsqueeze(-1)
    mj = (f16(dmin).unsqueeze(-1) * m).unsqueeze(-1)
    again = torch.round((sub + mj) / torch.where(dj == 0, 1, dj)).clamp_(0, nmax)
    q = torch.where(dj != 0, again, L)  # ggml keeps the search's codes where a sub-block scale rounds to 0
    return {"d": d, "dmin": dmin, "sc": sc, "m": m, "q": q.view(B, QK_K)}


def _pack_scales(sc: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """8 six-bit scales and mins -> ggml's 12 bytes (low 6 bits of 0-3 in bytes 0-3 / 4-7, 4-7 split around)."""
    sc, m = sc.to(torch.int32), m.to(torch.int32)
    first = sc[:, :4] | ((sc[:, 4:] >> 4) << 6)
    second = m[:, :4] | ((m[:, 4:] >> 4) << 6)
    third = (sc[:, 4:] & 15) | ((m[:, 4:] & 15) << 4)
    return torch.cat([first, second, third], -1).to(torch.uint8)


def _decode_scale_min(f: Fields) -> torch.Tensor:
    B = f["q"].shape[0]
    d = (f16(f["d"]).unsqueeze(-1) * f["sc"]).unsqueeze(-1)
    dm = (f16(f["dmin"]).unsqueeze(-1) * f["m"]).unsqueeze(-1)
    return (d * f["q"].view(B, 8, 32) - dm).view(B, QK_K)


def _pack_q4_k(f: Fields) -> torch.Tensor:
    q = f["q"].view(-1, 4, 2, 32)
    qs = nibbles(q[:, :, 0], q[:, :, 1]).view(-1, 128)
    return torch.cat([f16_bytes(f["d"]), f16_bytes(f["dmin"]), _pack_scales(f["sc"], f["m"]), qs], -1)


def _pack_q5_k(f: Fields) -> torch.Tensor:
    q = f["q"].to(torch.int32).view(-1, 4, 2, 32)
    qs = nibbles(q[:, :, 0], q[:, :, 1]).view(-1, 128)
    shifts = torch.arange(8, device=q.device).view(1, 4, 2, 1)  # chunk n, half k -> bit 2n + k
    qh = (((q >> 4) & 1) << shifts).sum((1, 2)).to(torch.uint8)
    return torch.cat([f16_bytes(f["d"]), f16_bytes(f["dmin"]), _pack_scales(f["sc"], f["m"]), qh, qs], -1)


Q4_K = BlockFormat("Q4_K", QK_K, 144, lambda x, qw, _s: _scale_min(x, qw, 15, (-1.0, 0.1, 20)),
                   _pack_q4_k, _decode_scale_min)
Q5_K = BlockFormat("Q5_K", QK_K, 176, lambda x, qw, _s: _scale_min(x, qw, 31, (-0.5, 0.1, 15)),
                   _pack_q5_k, _decode_scale_min)


def _q6_k(x: torch.Tensor, qw: torch.Tensor | None, _sigma2) -> Fields:
    B = x.shape[0]
    sub = x.view(B, 16, 16)
    scales, L = search.symmetric(sub.reshape(-1, 16), 32, None if qw is None else qw.reshape(-1, 16))
    scales, L = scales.view(B, 16), L.view(B, 16, 16)
    max_scale = search.signed_max(scales)
    zero = max_scale.abs() < search.GROUP_MAX_EPS
    iscale = search.over(-128, torch.where(zero, 1, max_scale))
    d = torch.where(zero, 0, 1 / iscale)
    sc = torch.round(iscale.unsqueeze(-1) * scales).clamp_(-128, 127)
    dj = (f16(d).unsqueeze(-1) * sc).unsqueeze(-1)
    again = torch.round(sub / torch.where(dj == 0, 1, dj)).clamp_(-32, 31) + 32
    q = torch.where(dj != 0, again, L)
    q = torch.where(zero.view(B, 1, 1), 0, q)  # ggml zeroes the whole block
    sc = torch.where(zero.unsqueeze(-1), 0, sc)
    return {"d": d, "sc": sc, "q": q.view(B, QK_K)}


def _pack_q6_k(f: Fields) -> torch.Tensor:
    q = f["q"].to(torch.int32).view(-1, 2, 4, 32)  # half h, quarter j, position l
    ql = torch.cat([nibbles(q[:, :, 0], q[:, :, 2]), nibbles(q[:, :, 1], q[:, :, 3])], -1).view(-1, 128)
    shifts = (2 * torch.arange(4, device=q.device)).view(1, 1, 4, 1)
    qh = ((q >> 4) << shifts).sum(2).to(torch.uint8).view(-1, 64)
    sc = f["sc"].to(torch.int8).view(torch.uint8)
    return torch.cat([ql, qh, sc, f16_bytes(f["d"])], -1)


def _decode_q6_k(f: Fields) -> torch.Tensor:
    B = f["q"].shape[0]
    d = (f16(f["d"]).unsqueeze(-1) * f["sc"]).unsqueeze(-1)
    return (d * (f["q"].view(B, 16, 16) - 32)).view(B, QK_K)


Q6_K = BlockFormat("Q6_K", QK_K, 210, _q6_k, _pack_q6_k, _decode_q6_k)
