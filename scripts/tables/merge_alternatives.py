"""What the alternatives `finetune merge` suggests when a merge keeps less than half of the fine-tune keep on a
real adapter: SmolLM2-135M-Instruct (NF4) + 20 steps on ShareGPT (recipes/sharegpt.yaml),
merged to GGUF Q4_K_M as a user would, then the alternatives: other GGUF types, --calib with the training data,
--merge-into original, and bf16 as the reference. All outputs are scored on one pass over every held-out row.

    PYTHONPATH=. python -m scripts.tables.merge_alternatives --run runs/sharegpt-20 --threads 2

Trains the run first when RUN has no adapter (about 6 min on an idle 2-core box, at max_length 512). Merged models
are kept under RUN/merges/ (--reuse scores them again without merging).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from scripts.tables import merge_fidelity_table

FORMATS = ("bf16,gguf,gguf@gguf_type=Q6_K,gguf@gguf_type=Q8_0,gguf+calib,gguf:original,gguf+calib:original,"
           "gguf@gguf_type=Q6_K:original")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", default="runs/sharegpt-20", help="run directory (trained here if it has no adapter)")
    p.add_argument("--recipe", default="recipes/sharegpt.yaml")
    p.add_argument("--formats", default=FORMATS)
    p.add_argument("--calib-samples", type=int, default=64)
    p.add_argument("--threads", type=int)
    p.add_argument("--reuse", action="store_true")
    p.add_argument("--json", help="write the rows as JSON here")
    args = p.parse_args()
    run = Path(args.run)
    if not (run / "adapter" / "adapter_config.json").exists():
        import torch

        from finetune.data.check import write_eval_split
        from finetune.recipe import load_recipe
        from finetune.train.loop import train

        if args.threads:
            torch.set_num_threads(args.threads)
        recipe = load_recipe(args.recipe, [f"output.dir={run}"])
        train(recipe)
        write_eval_split(recipe.data, recipe.train.seed, run)
    argv = [str(run), "--formats", args.formats, "--calib-samples", str(args.calib_samples),
            "--eval-max-batches", "1000000", "--out-dir", str(run / "merges")]
    argv += ["--threads", str(args.threads)] if args.threads else []
    argv += ["--reuse"] if args.reuse else []
    argv += ["--json", args.json] if args.json else []
    merge_fidelity_table.main(argv)


if __name__ == "__main__":
    main()
