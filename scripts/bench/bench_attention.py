"""Causal attention forward + backward on the GPU: our flash varlen call against PyTorch SDPA's backends.

    python -m scripts.bench.bench_attention            # 8B heads (32 q, 8 kv, head dim 128), bf16

Shapes: 4 x 2048 unpacked, 4 x 2048 packed (examples of 64-1024 tokens; SDPA gets transformers' block-diagonal
mask), and single sequences of 32k and 128k tokens. Prints ms per forward+backward, TFLOP/s (causal FLOPs:
forward 2 T^2 H D per sequence, backward 2.5x that), and each output's relative difference to ours.
"""

from __future__ import annotations


import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from finetune.kernels.attention import attention, new_sequence_starts
from scripts.bench.bench_stacks import packed_positions

H, KV, D = 32, 8, 128


def flops(pos: torch.Tensor) -> float:
    seq = new_sequence_starts(pos).cumsum(-1)
    total = 0
    for row in seq:
        _, counts = row.unique_consecutive(return_counts=True)
        total += int((counts.double() ** 2).sum())
    return 3.5 * 2 * total * H * D  # causal half of 4 T^2 H D, forward + backward


def timed(fn, reps: int) -> float:
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b))
    return sorted(times)[len(times) // 2]


def sdpa(q, k, v, mask, backend):
    qh, kh, vh = (t.transpose(1, 2) for t in (q, k, v))
    with sdpa_kernel(backend):
        if mask is None:
            out = F.scaled_dot_product_attention(qh, kh, vh, is_causal=True, enable_gqa=True, scale=D ** -0.5)
        else:
            rep = H // KV
            out = F.scaled_dot_product_attention(qh, kh.repeat_interleave(rep, 1), vh.repeat_interleave(rep, 1),
                                                 attn_mask=mask, scale=D ** -0.5)
    return out.transpose(1, 2)


def main() -> None:
    g = torch.Generator().manual_seed(0)
    cases = [("4x2048", 4, 2048, False), ("4x2048 packed", 4, 2048, True), ("1x32768", 1, 32768, False),
             ("1x131072", 1, 131072, False)]
    print("| shape | kernel | ms fwd+bwd | TFLOP/s | rel. diff to ours |\n|---|---|---|---|---|")
    for label, B, T, packed in cases:
        pos = packed_positions(B, T, g) if packed else torch.arange(T).repeat(B, 1)
        f = flops(pos)
        pos = pos.cuda()
        q, k, v = (torch.randn(B, T, h, D, device="cuda", dtype=torch.bfloat16, requires_grad=True) for h in (H, KV, KV))
        dy = torch.randn(B, T, H, D, device="cuda", dtype=torch.bfloat16)
        mask = None
        if packed:
            seq = new_sequence_starts(pos).cumsum(-1)
            mask = (seq[:, None, :, None] == seq[:, None, None, :]) & torch.ones(T, T, dtype=torch.bool,
                                                                                  device="cuda").tril()
        ours = attention(q, k, v, D ** -0.5, pos)
        kernels = [("ours (flash varlen)", lambda: attention(q, k, v, D ** -0.5, pos))]
        for name, backend in (("sdpa flash", SDPBackend.FLASH_ATTENTION), ("sdpa cudnn", SDPBackend.CUDNN_ATTENTION),
                              ("sdpa efficient", SDPBackend.EFFICIENT_ATTENTION)):
            kernels.append((name, lambda b=backend: sdpa(q, k, v, mask, b)))
        reps = 3 if T > 65536 else 10
        for name, fn in kernels:
            try:
                out = fn()
                diff = float((out.float() - ours.float()).norm() / ours.float().norm())
                ms = timed(lambda: torch.autograd.backward(fn(), dy), reps)
                print(f"| {label} | {name} | {ms:.2f} | {f / ms / 1e9:.0f} | {diff:.1e} |", flush=True)
            except (RuntimeError, torch.OutOfMemoryError) as e:
                print(f"| {label} | {name} | not run: {str(e).splitlines()[0][:80]} | - | - |", flush=True)
            q.grad = k.grad = v.grad = None
        del q, k, v, dy, mask, ours
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
