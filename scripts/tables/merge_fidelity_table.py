"""Fidelity of every merge output of one run, side by side: retention, KL and losses for bf16/nf4/int8/gptq/rtn
(and any other output format of quant.formats.registry).

Each output is written by `finetune.merge.merge` (report off), then all of them are scored on ONE pass over
the eval data, so (a) the quantized base and (b) the adapter on it are computed once and every row compares
against the same numbers. Prints a markdown table; --json writes the rows.

    python -m scripts.tables.merge_fidelity_table runs/quickstart --group-size 64 --threads 1
    python -m scripts.tables.merge_fidelity_table /tmp/qs-gptq --formats bf16,gptq,gptq@method=rtn,bf16:original \\
        --base-original ~/.cache/qlora-finetune/gguf/SmolLM2-135M-Instruct.Q4_1-<hash>

Format specs: FORMAT[@OPTION=VALUE...][+calib][:INTO]. FORMAT is a `finetune merge --format` (bf16, fp16, nf4, fp4,
int8, gptq: GPTQ requantization on --calib, gguf), options are that format's merge options (`gptq@method=rtn`: GPTQ
format, round to nearest; `gptq@bits=3@group_size=64`; `gguf@gguf_type=Q6_K`); `+calib` passes --calib to a
format where it is optional (gguf: importance-weighted scale searches), formats that need it always get it;
':original' or ':dequantized' chooses the weights the delta is added to (default: merge's 'auto', which the table
reports as resolved).
--calib defaults to the run's training data (rendered with its chat template).
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import torch

from finetune.merge import MergeConfig, merge
from finetune.merge.adapter import read_adapter
from finetune.merge.config import MERGE_INTO, format_options
from finetune.merge.report import fidelity_many, locate
from quant.formats.base import REQUIRED
from quant.formats.registry import output_names


def _value(text: str):
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    return int(text) if text.lstrip("-").isdigit() else text


def _spec(text: str) -> dict:
    head, _, into = text.partition(":")
    head, plus, calib = head.partition("+")
    if plus and calib != "calib":
        raise SystemExit(f"bad format spec {text!r}: the only '+' suffix is +calib")
    fmt, *opts = head.split("@")
    if fmt not in output_names() or (into and into not in MERGE_INTO) or not all("=" in o for o in opts):
        raise SystemExit(f"bad format spec {text!r} (FORMAT[@OPTION=VALUE...][:INTO], FORMAT one of "
                         f"{', '.join(output_names())})")
    options = {k: _value(v) for k, v in (o.split("=", 1) for o in opts)}
    return {"label": text, "format": fmt, "options": options, "merge_into": into or "auto", "calib": bool(plus)}


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", help="run directory (or adapter / checkpoint directory)")
    p.add_argument("--formats", default="bf16,nf4,int8,gptq,gptq@method=rtn")
    p.add_argument("--calib", action="append", help="gptq calibration data (default: the run's data.train)")
    p.add_argument("--calib-samples", type=int, default=128)
    p.add_argument("--calib-seqlen", type=int, default=512)
    p.add_argument("--group-size", type=int, default=None, help="group size of every format that has one "
                   "(default: merge's default)")
    p.add_argument("--base-original", help="full-precision model for ':original' rows of a GPTQ-trained adapter")
    p.add_argument("--eval", dest="eval_data", help="eval data (default: the run's data.eval)")
    p.add_argument("--eval-max-batches", type=int)
    p.add_argument("--out-dir", help="keep the merged models here (default: a temporary directory, removed)")
    p.add_argument("--reuse", action="store_true", help="score outputs already in --out-dir instead of merging again")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (1 on a shared box)")
    p.add_argument("--json", help="write the rows as JSON here")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    source = read_adapter(args.run)
    calib = args.calib
    if calib is None and source.data and source.data.train:
        calib = [locate(source.data.train, source.run_dir)]
    work = Path(args.out_dir) if args.out_dir else Path(tempfile.mkdtemp(prefix="merge-fidelity-"))
    work.mkdir(parents=True, exist_ok=True)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    rows, outputs = [], {}
    try:
        for spec in map(_spec, args.formats.split(",")):
            out = work / spec["label"].replace(":", "-")
            cfg = MergeConfig(adapter=args.run, out=out, format=spec["format"], merge_into=spec["merge_into"],
                              options=dict(spec["options"]), report=False, overwrite=True, device=device)
            if args.group_size is not None and spec["format"] in format_options().get("group_size", ({}, []))[1]:
                cfg.options.setdefault("group_size", args.group_size)
            need = cfg.fmt.calibration(cfg.fmt.options(**spec["options"]) if cfg.fmt.options else None)
            if need == REQUIRED or (need and spec["calib"]):
                cfg.calib, cfg.calib_samples, cfg.calib_seqlen = calib, args.calib_samples, args.calib_seqlen
            if spec["merge_into"] == "original" and args.base_original:
                cfg.base_original = args.base_original
            if args.reuse and (out / "merge_report.json").exists():
                report = json.loads((out / "merge_report.json").read_text())
            else:
                report = merge(cfg).report
            size = sum(f.stat().st_size for f in out.glob("*.safetensors"))
            rows.append({**spec, "merged_into": report["merge_into"], "merge_s": report["stream_seconds"],
                         "peak_anon_increase_mb": report["memory"]["peak_anon_increase_mb"],
                         "peak_rss_mb": report["memory"]["peak_rss_mb"], "size_mb": round(size / 2**20, 1),
                         "encoding": report.get(spec["format"])})
            outputs[spec["label"]] = (out, spec["format"])
            print(f"merged {spec['label']} in {report['stream_seconds']:.1f}s", flush=True)
        started = time.perf_counter()
        scores = fidelity_many(source, outputs, torch.device(device), args.eval_data, args.eval_max_batches,
                               progress=True)
        print(f"scored {len(outputs)} outputs in {time.perf_counter() - started:.0f} s", flush=True)
    finally:
        if not args.out_dir:
            shutil.rmtree(work, ignore_errors=True)
    for row in rows:
        row.update(scores[row["label"]])

    first = rows[0]
    print(f"\n{source.adapter_dir} (base {source.base.model}, {source.base.format}); "
          f"{first['label_tokens']} label tokens of {first['eval_examples']} examples from {first['eval_data']}\n")
    print("| model | merged into | loss | ppl | KL(b‖c) | retention | merge s | peak anon RSS +MiB | size MiB |")
    print("|---|---|---|---|---|---|---|---|---|")
    print(f"| (a) base ({source.base.format}) | | {first['loss_base']:.4f} | {first['ppl_base']:.3f} | | | | | |")
    print(f"| (b) base + adapter | | {first['loss_adapter']:.4f} | {first['ppl_adapter']:.3f} | | | | | |")
    for r in rows:
        ret = f"{r['retention']:.4f}" if r["retention"] is not None else "n/a"
        print(f"| (c) {r['label']} | {r['merged_into']} | {r['loss_merged']:.4f} | {r['ppl_merged']:.3f} | {r['kl_adapter_merged']:.5f} | "
              f"{ret} | {r['merge_s']:.1f} | {r['peak_anon_increase_mb']:.0f} | {r['size_mb']:.0f} |")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1, default=str))
    return rows


if __name__ == "__main__":
    main()
