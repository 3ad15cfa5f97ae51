"""Step time of exact-merge adapters (lora.merge_target, finetune.exact) against plain LoRA on the same packed base,
measured in one process, interleaved (plain, exact, plain, exact, ...), so the ratio holds on a busy machine.

A step is forward + backward of a fixed [batch, seq] batch through the model with LoRA r 16 on every linear
layer (peft's modules for both: the fused kernels do not take the exact variants). Prints the median seconds per
step of each and the ratio exact / plain.

    python -m scripts.bench.bench_exact_step BASE_DIR --target gptq --seq 128 --batch 2 --repeats 5 --threads 1
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from finetune.model import attach_lora, load_base
from finetune.recipe import BaseConfig, LoraConfig


def step_seconds(model, ids: torch.Tensor) -> float:
    started = time.perf_counter()
    model(input_ids=ids, labels=ids).loss.backward()
    model.zero_grad(set_to_none=True)
    return time.perf_counter() - started


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("base", help="a GPTQ or AWQ checkpoint directory")
    p.add_argument("--target", required=True, choices=("gptq", "awq"))
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    models = {}
    for target in ("none", args.target):
        base = load_base(BaseConfig(model=args.base, quantization="auto", compute_dtype="float32"),
                         torch.device("cpu"))
        models[target] = attach_lora(base.model, LoraConfig(r=16, alpha=32, dropout=0.0, merge_target=target),
                                     gradient_checkpointing=False).train()
    ids = torch.randint(0, 1000, (args.batch, args.seq))
    times = {k: [] for k in models}
    for model in models.values():
        step_seconds(model, ids)  # warm-up (the exact layers decode their grids once)
    for _ in range(args.repeats):
        for k, model in models.items():
            times[k].append(step_seconds(model, ids))
    plain, exact = (statistics.median(times[k]) for k in models)
    print(f"{args.base}: [{args.batch}, {args.seq}] tokens, {args.repeats} interleaved steps each, "
          f"{args.threads} thread(s)")
    print(f"plain LoRA {plain:.3f} s/step, merge_target {args.target} {exact:.3f} s/step, ratio {exact / plain:.2f}")


if __name__ == "__main__":
    main()
