"""`finetune` command line: argument parsing only; each command calls one public function."""

from __future__ import annotations

import argparse
import logging
import os
import sys

from quant.errors import UserError

SFT_HELP = """\
Fine-tune LoRA adapters on a quantized base, as described by a recipe YAML file.

The recipe has sections base, lora, data, train, output, tracking, samples (see recipes/quickstart.yaml
and README.md for every key). Any key can be overridden on the command line with --set, whose value is
parsed as YAML:

  finetune sft recipes/quickstart.yaml --set train.max_steps=10 --set lora.r=8
  finetune sft recipes/quickstart.yaml --set base.quantization=int8 --set output.dir=runs/int8
  finetune sft recipes/quickstart.yaml --set "lora.target_modules=[q_proj, v_proj]"

Output (output.dir): metrics.jsonl (one JSON object per logged step), checkpoint-<step>/ (adapter,
optimizer, scheduler, RNG and data position; newest train.save_total_limit kept), adapter/ (final peft
adapter with tokenizer and resolved recipe; load with peft.PeftModel.from_pretrained), recipe.yaml.

An interrupted run continues from its newest complete checkpoint with --resume and ends with the same
adapter as an uninterrupted run. Multi-GPU: accelerate launch --config_file recipes/accelerate/ddp.yaml
-m finetune sft RECIPE. Bad input prints one line naming the key or file and exits with status 2.
"""


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="finetune", description="QLoRA fine-tuning on quantized bases.")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    sft = sub.add_parser("sft", help="train LoRA adapters from a recipe", description=SFT_HELP,
                         formatter_class=argparse.RawDescriptionHelpFormatter)
    sft.add_argument("recipe", help="recipe YAML file, e.g. recipes/quickstart.yaml")
    sft.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                     help="override a recipe key (dotted path; value parsed as YAML); repeatable")
    sft.add_argument("--resume", action="store_true", help="continue from the newest complete checkpoint in output.dir")
    sft.add_argument("--print-recipe", action="store_true", help="print the resolved recipe and exit")
    sft.add_argument("-q", "--quiet", action="store_true", help="less library logging")
    return p


def cmd_sft(args) -> int:
    from finetune.recipe import dump_recipe, load_recipe

    recipe = load_recipe(args.recipe, args.overrides)
    if args.print_recipe:
        print(dump_recipe(recipe), end="")
        return 0
    from finetune.train.loop import train

    train(recipe, resume=args.resume)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING if getattr(args, "quiet", False) else logging.INFO,
                        format="%(message)s")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        return {"sft": cmd_sft}[args.command](args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; continue with --resume (completed checkpoints are kept)", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
