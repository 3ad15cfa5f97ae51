"""Where a training step's GPU time goes: torch.profiler over a few steps, kernels put into buckets.

Buckets: 4-bit dequantize, GEMMs (split into base / LoRA / LM head by the shapes of the aten ops that launched
them: a dimension of at most 4r is LoRA, the vocabulary is the head), attention, our Triton pointwise kernels,
other pointwise work (eager norms, rotary, SiLU, casts, residual adds, the loss's softmax), optimizer, copies,
and idle (step wall time the GPU was not busy: launch gaps, host syncs). Recomputation under gradient
checkpointing is inside each bucket (the forward kernels run twice).
"""

from __future__ import annotations

import re
import time
from collections import defaultdict

import torch
from torch.autograd import DeviceType

GEMM_KERNEL = re.compile(r"gemm|nvjet|xmma|cutlass|gemv|splitk|cublas", re.I)
KERNEL_BUCKETS = [
    ("dequantize", re.compile(r"dequant", re.I)),
    ("attention", re.compile(r"flash|fmha|attention|attn", re.I)),
    ("pointwise (our Triton)", re.compile(r"_rms_norm|_rotary|_swiglu")),
    ("optimizer", re.compile(r"adam|multi_tensor", re.I)),
    ("copies", re.compile(r"memcpy|memset|copy_kernel|Memcpy|Memset", re.I)),
]
GEMM_OPS = {"aten::mm", "aten::addmm", "aten::addmm_", "aten::bmm", "aten::baddbmm"}


def _gemm_class(shapes, rank: int, vocab: int | None) -> str:
    dims = [d for s in shapes if s for d in s]
    if vocab in dims:
        return "GEMM: LM head + loss"
    mats = [s for s in shapes if s and len(s) == 2]
    if any(min(s) <= 4 * rank for s in mats):
        return "GEMM: LoRA"
    return "GEMM: base"


def kernel_buckets(prof, rank: int, vocab: int | None) -> dict[str, float]:
    """GPU microseconds of a profile's kernels by bucket (the GEMMs split by the shapes of the ops that ran them)."""
    buckets: dict = defaultdict(float)
    gemm_split: dict = defaultdict(float)
    for e in prof.events():
        if e.device_type == DeviceType.CUDA:
            us = e.time_range.elapsed_us()
            name = e.name
            if GEMM_KERNEL.search(name):
                buckets["GEMM"] += us
                continue
            for bucket, pat in KERNEL_BUCKETS:
                if pat.search(name):
                    buckets[bucket] += us
                    break
            else:
                buckets["other pointwise / reductions"] += us
        elif e.name in GEMM_OPS:
            gemm_split[_gemm_class(e.input_shapes or [], rank, vocab)] += getattr(
                e, "self_device_time_total", 0) or 0
    gemm = buckets.pop("GEMM", 0.0)
    split_total = sum(gemm_split.values())
    for k, v in gemm_split.items():
        buckets[k] = gemm * v / split_total if split_total else 0.0
    if not split_total:
        buckets["GEMM: all"] = gemm
    return dict(buckets)


def profile_steps(loss_of, opt, batches, train_steps, rank: int, vocab: int, warmup: int = 3) -> dict:
    train_steps(loss_of, opt, batches[:warmup])
    steps = batches[warmup:]
    acts = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=acts, record_shapes=True) as prof:
        t = time.perf_counter()
        train_steps(loss_of, opt, steps)
        wall_ms = (time.perf_counter() - t) * 1e3
    n = len(steps)
    buckets = kernel_buckets(prof, rank, vocab)
    busy = sum(buckets.values()) / 1e3
    out = {k: v / 1e3 / n for k, v in buckets.items()}
    out["idle (GPU not busy)"] = max(0.0, wall_ms - busy) / n
    return {"step_ms": wall_ms / n, "buckets": out, "tokens": steps[0][0].numel()}


def profile_table(rows, title: str) -> str:
    rows = [r for r in rows if "profile" in r]
    keys = []
    for r in rows:
        keys += [k for k in r["profile"]["buckets"] if k not in keys]
    head = " | ".join(f"{r['stack']} ms | %" for r in rows)
    out = [f"\n{title}; GPU time per step by bucket", f"| bucket | {head} |", "|---" * (1 + 2 * len(rows)) + "|"]
    for k in sorted(keys, key=lambda k: -max(r["profile"]["buckets"].get(k, 0) for r in rows)):
        cells = []
        for r in rows:
            p = r["profile"]
            v = p["buckets"].get(k, 0.0)
            cells.append(f"{v:.1f} | {v / p['step_ms']:.0%}")
        out.append(f"| {k} | {' | '.join(cells)} |")
    out.append("| step (wall) | " + " | ".join(f"{r['profile']['step_ms']:.1f} | "
                                                f"{r['profile']['tokens'] / r['profile']['step_ms'] * 1e3:.0f} tok/s"
                                                for r in rows) + " |")
    return "\n".join(out)
