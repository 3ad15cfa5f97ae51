"""`quant` command line: `quant gptq` / `quant awq` (quantize to a GPTQ / AWQ checkpoint), `quant gguf` (export
for llama.cpp) and `quant eval` (perplexity).

Parsing only; each subcommand calls one public function. The quantizer flags are generated from the fields of
GPTQConfig / AWQConfig (quant.settings), so their defaults are the dataclasses'. A UserError becomes one line on
stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys

import torch

from quant.awq.model import quantize_awq
from quant.awq.solver import AWQConfig
from quant.calibration import check_sources
from quant.errors import UserError
from quant.eval import evaluate
from quant.export import export_gguf
from quant.files import check_output
from quant.formats.registry import AUTO, base_names
from quant.ggml.mix import FILE_TYPES
from quant.gptq.model import quantize
from quant.gptq.pack import FORMATS as CHECKPOINT_FORMATS
from quant.gptq.solver import GPTQConfig
from quant.loading import source_inputs
from quant.settings import add_flags, from_flags


def _output_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, metavar="DIR", help="output checkpoint directory (must not exist, or be "
                   "empty, unless --overwrite)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out once the new checkpoint is "
                   "complete (in one atomic step: a kill at any moment leaves the old or the new one)")


def _calibration_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--calib", action="append", help="text/md/jsonl/parquet file, directory, pkg:... or hub dataset "
                   "(repeatable)")
    p.add_argument("--calib-samples", type=int, default=128)
    p.add_argument("--calib-seqlen", type=int, default=512)
    p.add_argument("--calib-split", default="train")
    p.add_argument("--text-field", default="text")


def _version() -> str:
    from importlib import metadata

    try:
        return metadata.version("qlora-finetune")
    except metadata.PackageNotFoundError:
        return "(not installed)"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="quant", description="GPTQ and AWQ quantization, GGUF export and perplexity "
                                "evaluation")
    p.add_argument("--version", action="version", version=f"quant (qlora-finetune) {_version()}")
    p.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (on a busy small box 1 is often fastest)")
    sub = p.add_subparsers(dest="command", required=True)

    g = sub.add_parser("gptq", help="quantize MODEL (HF dir, hub id, .gguf, pkg:...) to a GPTQ checkpoint")
    g.add_argument("model")
    _output_args(g)
    add_flags(g, GPTQConfig)
    g.add_argument("--asym", dest="sym", action="store_false", help=argparse.SUPPRESS)
    _calibration_args(g)
    g.add_argument("--format", dest="checkpoint_format", choices=(AUTO,) + CHECKPOINT_FORMATS, default=AUTO,
                   help="auto: gptq (v1) when symmetric, gptq_v2 when asymmetric")
    g.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--no-progress", dest="progress", action="store_false")
    g.set_defaults(run=_run_gptq)

    w = sub.add_parser("awq", help="quantize MODEL (HF dir, hub id, .gguf, pkg:...) to an AWQ (gemm) checkpoint",
                       description="Activation-aware weight quantization: per input channel, scales "
                       "s = mean|x|^alpha (alpha searched on a grid) that minimise the output error of the "
                       "attention/MLP block on the calibration data are folded into the preceding norm or "
                       "projection, then each group of weights is clipped (searched) and rounded to 4 bits with a "
                       "zero point (by default with GPTQ's error feedback). The checkpoint loads in vLLM (awq, "
                       "awq_marlin), transformers and GPTQModel.")
    w.add_argument("model")
    _output_args(w)
    add_flags(w, AWQConfig)
    _calibration_args(w)
    w.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    w.add_argument("--seed", type=int, default=0)
    w.add_argument("--no-progress", dest="progress", action="store_false")
    w.set_defaults(run=_run_awq)

    _gguf_parser(sub)

    e = sub.add_parser("eval", help="perplexity of MODEL on held-out text")
    e.add_argument("model")
    e.add_argument("--data", action="append", required=True, help="text/md/jsonl/parquet file, directory, pkg:... "
                   "or hub dataset (repeatable)")
    e.add_argument("--seqlen", type=int, default=512)
    e.add_argument("--max-chunks", type=int, default=None)
    e.add_argument("--quantization", choices=(AUTO,) + base_names(), default=AUTO,
                   help="auto: as the checkpoint is stored (GPTQ, AWQ), else unquantized; bitsandbytes formats are "
                   "quantized on load")
    e.add_argument("--text-field", default="text")
    e.add_argument("--device", default=None)
    e.add_argument("--no-progress", dest="progress", action="store_false")
    e.set_defaults(run=_run_eval)
    return p


def _gguf_parser(sub) -> None:
    g = sub.add_parser(
        "gguf", help="write MODEL as one .gguf file for llama.cpp / Ollama",
        description="Write MODEL (HF dir, hub id, .gguf, pkg:..., or a GPTQ or AWQ checkpoint) as one .gguf file: "
        "llama.cpp's architecture metadata, tokenizer and tensor names, quantized by our own K-quant/legacy packing with "
        "llama.cpp's per-tensor mixes (q4_k_m: Q4_K with Q6_K for the head and for attn_v/ffn_down of a third of "
        "the layers; rows that are not a multiple of 256 fall back to Q5_0/Q5_1/Q8_0 as in llama.cpp). Llama, "
        "Mistral, Qwen2, Qwen3, Gemma 3, Phi-3/4, Ministral 3, Qwen3-MoE, Mixtral and gpt-oss (docs/architectures.md).")
    g.add_argument("model")
    g.add_argument("--out", required=True, metavar="FILE.gguf", help="output .gguf file, not a directory (must "
                   "not exist unless --overwrite; written under a temporary name, then renamed)")
    g.add_argument("--overwrite", action="store_true", help="replace an existing --out once the new file is complete")
    g.add_argument("--type", dest="gguf_type", default="q4_k_m", choices=list(FILE_TYPES),
                   help="file type (default q4_k_m); f32/f16/bf16 store the weights unquantized")
    g.add_argument("--calib", action="append", help="calibration text (file, directory, pkg:..., hub dataset; "
                   "repeatable): weight the scale searches by each column's activation energy on it, like "
                   "llama.cpp's importance matrix (no effect on f32/f16/bf16/q8_0)")
    g.add_argument("--calib-samples", type=int, default=128)
    g.add_argument("--calib-seqlen", type=int, default=512)
    g.add_argument("--calib-split", default="train")
    g.add_argument("--text-field", default="text")
    g.add_argument("--name", default=None, help="general.name in the file (default: the model's file/dir name)")
    g.add_argument("--device", default=None, help="cpu or cuda, for calibration and the scale searches")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--no-progress", dest="progress", action="store_false")
    g.set_defaults(run=_run_gguf)


def _check_io(a, action: str, file: bool = False) -> None:
    """--out (the output rule, docs/outputs.md) and --calib checked before any model loads."""
    check_output(a.out, a.overwrite, action=action, inputs=source_inputs(a.model, a.calib), file=file)
    if a.calib:
        check_sources(a.calib, a.text_field)


def _run_gguf(a) -> None:
    _check_io(a, "export", file=True)
    report = export_gguf(a.model, a.out, a.gguf_type, calib=a.calib, calib_samples=a.calib_samples,
                         calib_seqlen=a.calib_seqlen, text_field=a.text_field, calib_split=a.calib_split,
                         name=a.name, device=a.device, seed=a.seed, progress=a.progress,
                         overwrite=a.overwrite)
    print("wrote " + report.summary())


def _run_gptq(a) -> None:
    _check_io(a, "quantization")
    cfg = from_flags(GPTQConfig, a)
    report = quantize(a.model, a.out, cfg, calib=a.calib, calib_samples=a.calib_samples,
                      calib_seqlen=a.calib_seqlen, text_field=a.text_field, calib_split=a.calib_split,
                      device=a.device, checkpoint_format=a.checkpoint_format, seed=a.seed, progress=a.progress,
                      overwrite=a.overwrite)
    _print_written(a.out, cfg, report)


def _run_awq(a) -> None:
    _check_io(a, "quantization")
    cfg = from_flags(AWQConfig, a)
    report = quantize_awq(a.model, a.out, cfg, calib=a.calib, calib_samples=a.calib_samples,
                          calib_seqlen=a.calib_seqlen, text_field=a.text_field, calib_split=a.calib_split,
                          device=a.device, seed=a.seed, progress=a.progress, overwrite=a.overwrite)
    _print_written(a.out, cfg, report)


def _print_written(out, cfg, report) -> None:
    err = report.mean_error()
    print(f"wrote {out}: {len(report.layers)} layers, {cfg.method} {cfg.bits}-bit g{cfg.group_size}, "
          f"mean rel. error {err:.3e}, {report.seconds:.1f}s" if err is not None else f"wrote {out}")


def _run_eval(a) -> None:
    res = evaluate(a.model, a.data, seqlen=a.seqlen, max_chunks=a.max_chunks, quantization=a.quantization,
                   device=a.device, text_field=a.text_field, progress=a.progress)
    print(json.dumps(res))
    print(f"perplexity {res['ppl']:.3f} over {res['tokens']} tokens ({res['chunks']} x {res['seqlen']}, "
          f"{res['quantization']}) in {res['seconds']:.1f}s", file=sys.stderr)


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=getattr(logging, args.log_level), format="%(levelname)s %(name)s: %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        args.run(args)
    except UserError as e:
        print("error: " + " ".join(str(e).split()), file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        out = getattr(args, "out", None)
        print("interrupted" + (f"; {out} was left as it was" if out else ""), file=sys.stderr)
        sys.exit(130)
    finally:
        signal.signal(signal.SIGTERM, previous)
    return 0


def _interrupt(signum, frame):
    raise KeyboardInterrupt  # unwinds through quant.files.staged, which removes its temporary directory


if __name__ == "__main__":
    sys.exit(main())
