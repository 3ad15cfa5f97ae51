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

MERGE_HELP = """\
Merge a LoRA adapter into its base and write a model directory that standard tools load as is
(tokenizer included), then measure what the merge cost.

ADAPTER_OR_RUN_DIR is a `finetune sft` output directory, its adapter/, or a checkpoint-N/. The base is the
one the adapter was trained on (adapter/base.json, or an older adapter's base_model.txt, else the run's
recipe.yaml), rebuilt exactly as in training: bitsandbytes NF4/FP4/int8 bases are re-quantized from the float
checkpoint with the same settings and dequantized; GPTQ bases are dequantized from their packed weights. The
adapter is added in fp32 (delta = alpha/r * B @ A; rsLoRA and rank/alpha patterns honoured).

Which weights the delta is added to (--merge-into): by default those the adapter was trained against, except
when a bitsandbytes base is requantized onto its own grid (--format nf4 from an NF4 base, fp4 from FP4, int8
from int8): there every dequantized weight + delta rounds back to the code it came from (a LoRA delta is far
below half a quantization step), so the delta is added to the full-precision weights instead.

Formats (--format):
{formats}

Memory: one decoder layer at a time is read from the base's safetensors, merged, encoded and written
(plus, for gptq, one set of calibration activations). Output goes to a temporary directory next to
--out that is renamed only when complete; with --overwrite the previous --out is swapped out in the same
atomic step. A failed, interrupted or killed merge leaves --out as it was, never a partial model, and the
next merge for that --out removes what a killed one left (on a filesystem without an atomic exchange, e.g.
NFS, a kill at the swap leaves the old model aside under a hidden name until then). One merge per --out at a
time: a second is refused with the first one's pid. A full disk is one line with the space free and needed.

Fidelity report (merge_report.json in --out, printed as a table, logged to W&B when the run's recipe
configures it): on held-out data (--eval, default: the run's data.eval rendered like training, loss on
answer tokens) the loss/perplexity of (a) the quantized base, (b) the adapter on it, (c) the merged model;
the mean per-token KL(b||c); retention = (loss_a - loss_c) / (loss_a - loss_b), the share of the
fine-tune's improvement the merged model keeps. It loads whole models; --no-report skips it.

Examples:
  finetune merge runs/quickstart --out merged/qs-bf16 --format bf16
  finetune merge runs/quickstart --out merged/qs-nf4 --format nf4
  finetune merge runs/quickstart --out merged/qs-gptq --format gptq --calib data/quickstart/train.jsonl \\
      --group-size 64
  finetune merge runs/gptq-run --out merged/orig --format bf16 --merge-into original --base-original FLOAT_DIR

Bad input (adapter/base mismatch, unsupported combination, missing calibration data) prints one line and
exits with status 2.
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
    _merge_parser(sub)
    return p


def _formats_help() -> str:
    """One entry per output format of the registry (formats with the same description share one)."""
    import textwrap

    from quant.formats.registry import FORMATS

    entries: list[tuple[list[str], str]] = []
    for fmt in (f for f in FORMATS if f.output):
        if entries and entries[-1][1] == fmt.summary:
            entries[-1][0].append(fmt.name)
        else:
            entries.append(([fmt.name], fmt.summary))
    return "\n".join(textwrap.fill(summary, 110, initial_indent=f"  {', '.join(names):<12} ",
                                    subsequent_indent=" " * 15) for names, summary in entries)


def _merge_parser(sub) -> None:
    from finetune.merge.config import MERGE_INTO, flag, format_options
    from quant.formats.base import DTYPES, dtype_name
    from quant.formats.registry import FORMATS, output_names

    m = sub.add_parser("merge", help=f"merge an adapter into its base; write {'/'.join(output_names())}",
                       description=MERGE_HELP.replace("{formats}", _formats_help()),
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    m.add_argument("adapter", metavar="ADAPTER_OR_RUN_DIR", help="run directory, its adapter/, or checkpoint-N/")
    m.add_argument("--out", required=True, help="output model directory (must not exist unless --overwrite)")
    m.add_argument("--format", required=True, choices=output_names())
    m.add_argument("--base", help="base model to use instead of the one named in the adapter (HF dir, GPTQ dir, "
                   ".gguf, pkg:...); must be the same model the adapter was trained on")
    m.add_argument("--merge-into", choices=MERGE_INTO, default="auto",
                   help="dequantized: the weights the adapter was trained against; original: the full-precision "
                   "weights (a bnb base's own checkpoint, or --base-original); auto (default): dequantized, except "
                   "original when a bnb base is requantized onto its own grid (nf4 from nf4, ...), where rounding "
                   "the dequantized weights would erase the adapter")
    m.add_argument("--base-original", metavar="PATH", help="full-precision model a GPTQ base was quantized from "
                   "(with --merge-into original)")
    c = m.add_argument_group("calibration (formats that requantize on the merged model's activations)")
    c.add_argument("--calib", action="append", metavar="DATA", help="calibration data: text/md, jsonl/json/parquet/"
                   "csv in any training format (rendered with the chat template), directory, pkg:... or hub "
                   "dataset; repeatable; required for --format gptq --method gptq")
    c.add_argument("--calib-samples", type=int, default=128, help="calibration windows (default 128)")
    c.add_argument("--calib-seqlen", type=int, default=512, help="tokens per window (default 512)")
    groups = {}
    for name, (meta, taking) in format_options().items():
        title = f"{', '.join(taking)} output"
        group = groups.get(title) or groups.setdefault(title, m.add_argument_group(title))
        kwargs = {"action": argparse.BooleanOptionalAction} if meta["type"] is bool else \
            {"type": meta["type"], "choices": meta["choices"], "metavar": None if meta["choices"] else name.upper()}
        group.add_argument(flag(name), dest=f"option_{name}", default=None, help=meta["help"], **kwargs)
    r = m.add_argument_group("fidelity report")
    r.add_argument("--eval", dest="eval_data", metavar="DATA", help="held-out data in the run's data format "
                   "(default: the run's data.eval)")
    r.add_argument("--eval-max-batches", type=int, help="score at most this many eval batches")
    r.add_argument("--no-report", dest="report", action="store_false", help="skip the fidelity evaluation")
    defaults = ", ".join(f"{f.name} {dtype_name(f.default_dtype)}" for f in FORMATS if f.output and not f.fixed_dtype)
    m.add_argument("--dtype", choices=list(DTYPES), help="dtype of unquantized tensors (norms, embeddings, head) "
                   "of a quantized format (and a bitsandbytes output's compute dtype); default: the format's "
                   f"({defaults})")
    m.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    m.add_argument("--overwrite", action="store_true", help="replace an existing --out once the merge succeeded")
    m.add_argument("-q", "--quiet", action="store_true", help="less library logging, no progress bar")


def merge_config(args):
    """The typed MergeConfig from parsed `finetune merge` arguments (validated by the merge)."""
    from finetune.merge import MergeConfig

    options = {k.removeprefix("option_"): v for k, v in vars(args).items() if k.startswith("option_")}
    return MergeConfig(adapter=args.adapter, out=args.out, format=args.format, base=args.base,
                       merge_into=args.merge_into, base_original=args.base_original, calib=args.calib,
                       calib_samples=args.calib_samples, calib_seqlen=args.calib_seqlen, options=options,
                       eval_data=args.eval_data, eval_max_batches=args.eval_max_batches, report=args.report,
                       dtype=args.dtype, device=args.device, overwrite=args.overwrite, progress=not args.quiet)


def cmd_sft(args) -> int:
    from finetune.recipe import dump_recipe, load_recipe

    recipe = load_recipe(args.recipe, args.overrides)
    if args.print_recipe:
        print(dump_recipe(recipe), end="")
        return 0
    from finetune.train.loop import train

    train(recipe, resume=args.resume)
    return 0


def cmd_merge(args) -> int:
    import signal

    from finetune.merge import merge

    def terminate(signum, frame):
        raise KeyboardInterrupt  # unwinds through the merge, which removes its temporary directory

    previous = signal.signal(signal.SIGTERM, terminate)
    try:
        merge(merge_config(args))
    except KeyboardInterrupt:
        print(f"interrupted; nothing was written to {args.out}", file=sys.stderr)
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING if getattr(args, "quiet", False) else logging.INFO,
                        format="%(message)s")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        return {"sft": cmd_sft, "merge": cmd_merge}[args.command](args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; continue with --resume (completed checkpoints are kept)", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
