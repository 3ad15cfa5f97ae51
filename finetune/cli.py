"""`finetune` command line: argument parsing only; each command calls one public function.

Each command imports its module when it runs: `finetune --help` takes 4-7 s on a loaded 2-core box against 20-22 s
to import every command's module (docs/layout.md).
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from finetune.cli_train import TRAINING, cmd_train, train_parsers
from finetune.console import Prefixed, quiet_libraries, version_line
from quant.errors import UserError

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
(plus, for gptq and awq, one set of calibration activations). Output goes to a temporary directory next to
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
  finetune merge runs/awq-run --out merged/awq --format awq --calib data/quickstart/train.jsonl
  finetune merge runs/gptq-run --out merged/orig --format bf16 --merge-into original --base-original FLOAT_DIR

Bad input (adapter/base mismatch, unsupported combination, missing calibration data) prints one line and
exits with status 2.
"""


class _Version(argparse.Action):
    """--version as one unwrapped line (argparse's own action wraps it at the terminal width)."""

    def __init__(self, option_strings, dest, **kwargs):
        super().__init__(option_strings, dest, nargs=0, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        print(version_line())
        parser.exit()


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="finetune", description="QLoRA fine-tuning on quantized bases.")
    p.add_argument("--version", action=_Version, help="print the versions of finetune and its main libraries")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    train_parsers(sub)
    _merge_parser(sub)
    _report_parser(sub)
    _chat_parser(sub)
    _generate_parser(sub)
    _eval_parser(sub)
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
    from finetune.merge.report import CPU_EVAL_MAX_BATCHES
    from quant.formats.base import DTYPES, dtype_name
    from quant.formats.registry import FORMATS, output_names

    m = sub.add_parser("merge", help=f"merge an adapter into its base; write {'/'.join(output_names())}",
                       description=MERGE_HELP.replace("{formats}", _formats_help()),
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    m.add_argument("adapter", metavar="ADAPTER_OR_RUN_DIR", help="run directory, its adapter/, or checkpoint-N/")
    m.add_argument("--out", required=True, metavar="DIR", help="the merged model's directory (must not exist unless "
                   "--overwrite; never the run, its adapter or base, nor a folder holding one; RUN/merges/NAME is the "
                   "run's place for merges: docs/outputs.md)")
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
                   "dataset; repeatable; required for --format gptq and awq (unless --method rtn), optional for gguf "
                   "(importance-weighted scale searches)")
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
    r.add_argument("--eval-max-batches", type=int, metavar="N", help="score the first N eval batches of "
                   "train.micro_batch_size rows (default: all on a GPU, {cpu_cap} on CPU, where each batch runs "
                   "three models; the report names the rows used)".replace("{cpu_cap}", str(CPU_EVAL_MAX_BATCHES)))
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


REPORT_HELP = """\
Write one self-contained HTML page (charts embedded) and the charts as PNGs from one or more run directories:
training loss (raw and smoothed), eval loss/perplexity, learning rate, grad norm, tokens/s and peak memory,
each against step and against tokens seen, every run overlaid in its own colour; the recipe keys that differ
between the runs; the data summary (rows kept/dropped, truncated examples, tokens trained on; from the run's
data_report.json); and the merges' fidelity (retention and KL per output format, from merge_report.json).

Merges of a run: RUN/merges/*/ (finetune merge RUN --out RUN/merges/NAME ...), plus those in --merges DIR (a
merge output or a folder of them) made from one of the runs' adapters.

When a run's recipe configures W&B, the run's charts (wandb.Image, report/<chart>) and its merge reports
(wandb.Table, report/merge_reports) are logged to its W&B run; --no-wandb skips that.

  finetune report runs/quickstart
  finetune report runs/lr-1e-3 runs/lr-3e-4 --out reports/lr --merges merged/
"""

GEN_EPILOG = """\
RUN_OR_MODEL: a `finetune sft` run directory, its adapter/ or checkpoint-N/ (the adapter on its quantized base,
rebuilt as in training), or a model directory (finetune merge output or any Hugging Face checkpoint: bf16/fp16/
fp32, bitsandbytes nf4/fp4/int8, GPTQ). Prompts are rendered with the model's chat template (as training did).
"""


def _add_model_args(p) -> None:
    p.add_argument("model", metavar="RUN_OR_MODEL", help="run directory, adapter, checkpoint-N/ or model directory")
    p.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    p.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], help="compute dtype of a model directory "
                   "(default: float32 on CPU, its stored half precision on GPU); an adapter uses its recipe's")
    p.add_argument("-q", "--quiet", action="store_true", help="less library logging")


def _add_sampling_args(p, max_new_tokens: int = 256) -> None:
    g = p.add_argument_group("generation")
    g.add_argument("--max-new-tokens", type=int, default=max_new_tokens, help=f"(default {max_new_tokens})")
    g.add_argument("--temperature", type=float, default=0.0, help="0 (default) = greedy; > 0 samples")
    g.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass when sampling (default 1.0)")
    g.add_argument("--seed", type=int, help="seed for sampling")


def _report_parser(sub) -> None:
    r = sub.add_parser("report", help="HTML report with charts of one or more runs", description=REPORT_HELP,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    r.add_argument("runs", nargs="+", metavar="RUN", help="`finetune sft` output directories")
    r.add_argument("--out", metavar="DIR", help="the report's directory (default: the first RUN's report/); an "
                   "earlier report there is replaced when the new one is complete, anything else only with --overwrite")
    r.add_argument("--overwrite", action="store_true", help="replace an existing --out that is not a report")
    r.add_argument("--merges", action="append", default=[], metavar="DIR",
                   help="a merge output, or a folder of them, to include (matched to the runs by adapter); repeatable")
    r.add_argument("--smooth", type=float, default=0.6, help="EMA weight of the smoothed loss, 0 to <1 (default 0.6)")
    r.add_argument("--no-wandb", dest="wandb", action="store_false", help="do not log to the runs' W&B runs")
    r.add_argument("-q", "--quiet", action="store_true", help="less library logging")


def _chat_parser(sub) -> None:
    c = sub.add_parser("chat", help="talk to a trained adapter or merged model in the terminal",
                       description="Interactive chat: each reply is streamed as it is generated and followed by its "
                       "tokens/s. The conversation so far is the prompt; /reset clears it, /quit or end of input "
                       "leaves. Reads lines from standard input, so it can be driven by a pipe.",
                       epilog=GEN_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_model_args(c)
    c.add_argument("--system", help="system prompt")
    _add_sampling_args(c)


def _generate_parser(sub) -> None:
    g = sub.add_parser("generate", help="complete prompts with a trained adapter or merged model",
                       description="Complete each prompt, streaming the text to standard output (progress and "
                       "tokens/s on standard error).", epilog=GEN_EPILOG,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_model_args(g)
    src = g.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", action="append", help="a prompt (the user's message); repeatable")
    src.add_argument("--prompts", metavar="FILE", help="jsonl rows with 'prompt' or 'messages' (a trailing "
                     "assistant turn is dropped), or a text file with one prompt per line")
    g.add_argument("--raw", action="store_true", help="text prompts as plain text, without the chat template "
                   "(for completion-format runs)")
    g.add_argument("--out", metavar="FILE", help="a JSONL file to also write, one row per prompt: prompt, "
                   "completion, new_tokens, tokens_per_s (a new file, or with --overwrite an existing one; never an "
                   "input)")
    g.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    _add_sampling_args(g)


def _eval_parser(sub) -> None:
    e = sub.add_parser("eval", help="held-out loss and generation metrics of runs and merged models, one table",
                       description="Score each RUN_OR_MODEL on held-out data: a run gives a row for its quantized "
                       "base alone and one for the adapter on it; a merged model one row. Metrics: loss (and "
                       "perplexity) on answer tokens, rendered by the training data pipeline with the first run's "
                       "data settings; exact_match (greedy answer == reference answer, whitespace-stripped); "
                       "json_valid (greedy answer parses as JSON).",
                       epilog=GEN_EPILOG + "\nExample: finetune eval runs/quickstart merged/qs-bf16 merged/qs-gptq "
                       "--data data/quickstart/eval.jsonl", formatter_class=argparse.RawDescriptionHelpFormatter)
    e.add_argument("models", nargs="+", metavar="RUN_OR_MODEL")
    e.add_argument("--data", help="eval file in any training format (default: the first run's data.eval)")
    e.add_argument("--metric", default="loss,exact_match,json_valid", help="comma-separated: loss, exact_match, "
                   "json_valid (default: all)")
    e.add_argument("--no-base", dest="include_base", action="store_false", help="no 'base' row for runs")
    e.add_argument("--limit", type=int, help="score only the first N rows")
    e.add_argument("--batch-size", type=int, default=8, help="(default 8)")
    e.add_argument("--max-new-tokens", type=int, help="generation cap (default: longest reference + 32 tokens)")
    e.add_argument("--lm-eval", metavar="TASKS", help="also run lm-evaluation-harness tasks (names or task YAML "
                   "files, comma-separated; needs the lmeval extra and the task data available)")
    e.add_argument("--out", metavar="FILE", help="a JSON file to also write the table's rows to (a new file, or "
                   "with --overwrite an existing one; never an input)")
    e.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    e.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    e.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], help="compute dtype of model directories")
    e.add_argument("-q", "--quiet", action="store_true", help="less library logging")


def _positive(value, name: str, zero_ok: bool = False) -> None:
    if value is not None and (value < 0 or (value == 0 and not zero_ok)):
        raise UserError(f"{name} {value}: must be {'>= 0' if zero_ok else '> 0'}")


def _gen_config(args):
    from finetune.generation import GenConfig

    _positive(args.max_new_tokens, "--max-new-tokens")
    _positive(args.temperature, "--temperature", zero_ok=True)
    if not 0 < args.top_p <= 1:
        raise UserError(f"--top-p {args.top_p}: must be in (0, 1]")
    return GenConfig(args.max_new_tokens, args.temperature, args.top_p, args.seed)


def cmd_report(args) -> int:
    from finetune.report import report

    report(args.runs, args.out, args.merges, args.smooth, args.wandb, overwrite=args.overwrite)
    return 0


def cmd_chat(args) -> int:
    from finetune.chat import chat

    chat(args.model, _gen_config(args), args.system, args.device, args.dtype)
    return 0


def cmd_generate(args) -> int:
    from finetune.chat import generate_prompts, read_prompts

    cfg = _gen_config(args)
    prompts = read_prompts(args.prompts) if args.prompts else [{"text": t} for t in args.prompt]
    generate_prompts(args.model, prompts, cfg, args.raw, args.out, args.device, args.dtype, overwrite=args.overwrite,
                     read=(args.prompts, "--prompts"))
    return 0


def cmd_eval(args) -> int:
    from finetune.evaluate import evaluate, parse_metrics

    metrics = parse_metrics(args.metric)
    _positive(args.limit, "--limit")
    _positive(args.batch_size, "--batch-size")
    _positive(args.max_new_tokens, "--max-new-tokens")
    evaluate(args.models, args.data, metrics, args.include_base, args.batch_size, args.max_new_tokens, args.limit,
             args.lm_eval, args.device, args.dtype, args.out, overwrite=args.overwrite)
    return 0


def cmd_merge(args) -> int:
    import signal

    from finetune.merge import merge
    from finetune.merge.pipeline import ScoringInterrupted

    def terminate(signum, frame):
        raise KeyboardInterrupt  # unwinds through the merge, which removes its temporary directory

    previous = signal.signal(signal.SIGTERM, terminate)
    try:
        merge(merge_config(args))
    except ScoringInterrupted:
        print(f"interrupted while scoring; the merged model is complete in {args.out} (its merge_report.json has "
              "no fidelity)", file=sys.stderr)
        return 130
    except KeyboardInterrupt:
        print(f"interrupted; nothing was written to {args.out}", file=sys.stderr)
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous)
    return 0


def main(argv: list[str] | None = None) -> int:
    quiet_libraries()  # first: the settings must precede transformers' import (finetune.console imports none)
    args = _parser().parse_args(argv)
    handler = logging.StreamHandler()
    handler.setFormatter(Prefixed("%(message)s"))
    logging.basicConfig(level=logging.WARNING if getattr(args, "quiet", False) else logging.INFO,
                        handlers=[handler])
    if hasattr(sys.stdout, "reconfigure"):
        sys.stdout.reconfigure(errors="backslashreplace")  # text from users' files may not be encodable
    try:
        commands = {**{name: cmd_train for name in TRAINING}, "merge": cmd_merge, "report": cmd_report,
                    "chat": cmd_chat, "generate": cmd_generate, "eval": cmd_eval}
        return commands[args.command](args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except (OSError, RuntimeError) as e:
        from finetune.train.diskspace import is_no_space, no_space_message

        if not is_no_space(e):
            raise
        print(f"error: {no_space_message(Path(e.filename or '.') if isinstance(e, OSError) else Path('.'))}",
              file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; continue with --resume (completed checkpoints are kept)" if args.command in TRAINING
              else "interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
