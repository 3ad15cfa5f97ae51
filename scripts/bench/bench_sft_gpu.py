"""The quickstart recipe on a Llama-3.2-1B-shaped random model, on one GPU: tokens/s and peak memory.

    python -m scripts.bench.bench_sft_gpu [--shape llama-3.2-1b] [--steps 30] [--quantization nf4]

Random weights are enough for speed and memory; the data is the quickstart's, tokenized with a byte-level
tokenizer (so sequences are longer than with the real one). Prints one table row per run.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch

from finetune.recipe import load_recipe
from finetune.synthetic import save_random_model
from finetune.train.loop import train
from quant.formats.registry import DEFAULT_BASE, base_format, base_names

REPO = Path(__file__).resolve().parents[2]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="llama-3.2-1b")
    ap.add_argument("--steps", type=int, default=30)
    quantized_on_load = [n for n in base_names() if not base_format(n).stored_quantized]  # from the float model
    ap.add_argument("--quantization", default=DEFAULT_BASE, choices=quantized_on_load)
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    args = ap.parse_args()

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        base = save_random_model(args.shape, Path(tmp) / "base", dtype=torch.bfloat16, device="cuda")
        torch.cuda.empty_cache()
        recipe = load_recipe(REPO / "recipes" / "quickstart.yaml", [
            f"base.model={base}", f"base.quantization={args.quantization}", f"train.max_steps={args.steps}",
            f"output.dir={tmp}/run", "train.save_every=0", "samples.count=0", "train.log_every=5",
            "tracking.wandb.project=null", *args.overrides])
        result = train(recipe)
        metrics = [json.loads(line) for line in (Path(tmp) / "run" / "metrics.jsonl").read_text().splitlines()]
        steady = [m for m in metrics if "tokens_per_s" in m][1:]  # first window includes warm-up
        tps = sum(m["tokens_per_s"] for m in steady) / max(len(steady), 1)
        rows.append((args.shape, args.quantization, recipe.train.micro_batch_size, recipe.data.max_length,
                     tps, torch.cuda.max_memory_allocated() / 2**30, result.eval_loss_before, result.eval_loss_after))
    print(f"\n{'shape':<14}{'base':<6}{'mbs':>4}{'seq':>6}{'tok/s':>10}{'peak GiB':>10}{'eval before':>13}{'after':>8}")
    for r in rows:
        print(f"{r[0]:<14}{r[1]:<6}{r[2]:>4}{r[3]:>6}{r[4]:>10.0f}{r[5]:>10.2f}{r[6]:>13.3f}{r[7]:>8.3f}")


if __name__ == "__main__":
    main()
