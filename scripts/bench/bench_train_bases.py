"""NF4 vs GPTQ-4bit bases of one shape, trained by `finetune sft` in the same process run: tokens/s, peak memory.

    python -m scripts.bench.bench_train_bases [--shape llama-3.1-8b] [--steps 12] [--seq 2048] [--mbs 1]

Builds a random bf16 model of the shape on the GPU, saves it, makes a GPTQ 4-bit g128 checkpoint of it with
our quantizer (RTN: the weights are random, so calibration would change nothing measured here), then trains
LoRA r=16 on all linear layers over the same synthetic text with each base. Prints one table.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from finetune.recipe import recipe_from_dict
from finetune.synthetic import random_model, save_model_dir, save_rtn_gptq, synthetic_text
from finetune.train.loop import train
from quant.formats.registry import base_format

REPO = Path(__file__).resolve().parents[2]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="llama-3.1-8b")
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--mbs", type=int, default=1)
    ap.add_argument("--bases", default="nf4,gptq")
    ap.add_argument("--workdir", default=None, help="keep model directories here (default: a temp dir)")
    args = ap.parse_args()

    cuda = torch.cuda.is_available()  # CPU only for a smoke run of the script itself (--shape tiny)
    dev, dtype = ("cuda", torch.bfloat16) if cuda else ("cpu", torch.float32)
    tmp = Path(args.workdir or tempfile.mkdtemp(prefix="bench-bases-"))
    t0 = time.perf_counter()
    model = random_model(args.shape, dtype=dtype, device=dev)
    save_model_dir(model, tmp / "bf16")
    made = {"bf16": time.perf_counter() - t0}
    bases = args.bases.split(",")
    # A stored-quantized base (GPTQ) trains from an RTN GPTQ copy of the model; the others from the float one.
    stored = {b for b in bases if base_format(b, f"--bases {b!r}").stored_quantized}
    if stored:
        t0 = time.perf_counter()
        save_rtn_gptq(model, tmp / "gptq", group_size=128 if args.shape != "tiny" else 32)
        made["gptq"] = time.perf_counter() - t0
    del model
    data = synthetic_text(tmp / "text.jsonl", rows=max(64, args.steps * args.mbs * 2), chars=args.seq + 64)

    rows = []
    for base in bases:
        if cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        recipe = recipe_from_dict({
            "base": {"model": str(tmp / ("gptq" if base in stored else "bf16")), "quantization": base,
                     "compute_dtype": "bfloat16" if cuda else "float32"},
            "lora": {"r": 16, "alpha": 16, "dropout": 0.0},
            "data": {"train": str(data), "format": "text", "max_length": args.seq, "packing": True},
            "train": {"max_steps": args.steps, "micro_batch_size": args.mbs, "learning_rate": 1e-4,
                      "gradient_checkpointing": True, "log_every": 1, "lr_scheduler": "constant"},
            "output": {"dir": str(tmp / f"run-{base}")},
            "tracking": {"wandb": {"mode": "disabled"}},
        })
        train(recipe)
        metrics = [json.loads(line) for line in (tmp / f"run-{base}" / "metrics.jsonl").read_text().splitlines()]
        steady = [m for m in metrics if "tokens_per_s" in m][2:]  # first steps include allocator/kernel warm-up
        tps = sum(m["tokens_per_s"] for m in steady) / max(len(steady), 1)
        peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else max(m["peak_mem_mb"] for m in steady) / 1024
        rows.append((base, tps, peak, steady[-1]["loss"] if steady else None))

    print(f"\nshape {args.shape}, {args.mbs} x {args.seq} tokens, LoRA r=16 all-linear, bf16, grad ckpt;"
          f" model build s: {', '.join(f'{k} {v:.0f}' for k, v in made.items())}")
    print(f"{'base':<6}{'tok/s':>10}{'peak GiB':>10}{'last loss':>11}{'vs ' + rows[0][0]:>8}")
    ref = rows[0][1]  # the first base of --bases is the reference
    for base, tps, peak, loss in rows:
        ratio = f"{tps / ref:.2f}" if ref else "-"
        print(f"{base:<6}{tps:>10.0f}{peak:>10.2f}{loss if loss is not None else float('nan'):>11.4f}{ratio:>8}")


if __name__ == "__main__":
    main()
