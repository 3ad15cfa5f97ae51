"""End to end: `finetune sft` itself against unsloth's trainer path, on the same data, tokenizer and recipe.

    python -m scripts.bench.bench_e2e --shape llama-3.2-1b --regimes 1x512,8x2048 --steps 30
    python -m scripts.bench.bench_train --e2e 1x512,8x2048 --shape llama-3.2-1b      # the same, from bench_train
    python -m scripts.bench.bench_e2e --stacks ours --set train.gradient_checkpointing=false   # a recipe change

For each regime (micro-batch x max_length), each stack in a process of its own (unsloth imported first):
  ours     `finetune.train.loop.train` on recipes/quickstart.yaml (its data) with the bare step's settings: the
           random-weight model of --shape as an NF4 + double quant base, bf16, LoRA r=16 alpha 16 without dropout on
           all linear layers, packing, gradient checkpointing, fused AdamW at a constant 1e-4, clipping at 1.0, a log
           line every 5 steps, evaluation and a checkpoint every 10, two greedy samples before and after. Every
           phase's peak memory is recorded (bench_phases.py): set-up, evaluation, samples, the first step, the
           other steps, checkpoints, the adapter.
  bare     in the same process first: bench_train's `ours@packed` and `ours` steps (random tokens, packed as
           `finetune sft` packs, and plain rows) at the same micro-batch: the loop's ceiling.
  unsloth  its FastLanguageModel (load_in_4bit, the same LoRA, its own offloaded checkpointing) with TRL's SFTTrainer
           and the same hyperparameters, on the examples our data pipeline tokenized with the same tokenizer
           (input_ids and labels, before packing): TRL packs them itself (best-fit decreasing, padding-free).
Throughput counts the tokens of training steps only, from step 6 (ours: the run's metrics.jsonl windows, which
time the steps including fetching their batch; unsloth: the intervals between step ends, with a device sync at
each, leaving out every interval that held a log line, an evaluation or a checkpoint). Peak memory is torch's
max_memory_allocated over the whole run. `--profile N` profiles our run's last 2N steps (torch.profiler, then
cProfile): GPU busy and idle time, kernels and host syncs per step, the CPU ops and Python functions that cost
most; the log windows holding them are left out of tokens/s.
finetune, transformers and TRL are imported inside the functions: the unsloth worker runs this module and must
import unsloth before transformers (unsloth patches it on import).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import torch

REPO = Path(__file__).resolve().parents[2]
QUICKSTART = REPO / "recipes" / "quickstart.yaml"
TIMED_FROM = 6  # steps before this one are warm-up
LOG_EVERY, EVAL_EVERY, SAVE_EVERY = 5, 10, 10


def parse_regimes(text: str) -> list[tuple[int, int]]:
    out = []
    for part in text.split(","):
        b, _, t = part.partition("x")
        out.append((int(b), int(t)))
    return out


def recipe_overrides(model_dir: Path, out_dir: Path, batch: int, seq: int, steps: int, extra: list[str]) -> list[str]:
    """The bench recipe: the quickstart's data on the --shape model with the bare step's training settings."""
    return [f"base.model={model_dir}", "base.quantization=nf4", "base.double_quant=true",
            "base.compute_dtype=bfloat16", "lora.r=16", "lora.alpha=16", "lora.dropout=0.0",
            f"data.max_length={seq}", "data.packing=true", f"train.micro_batch_size={batch}",
            "train.gradient_accumulation=1", "train.learning_rate=1e-4", "train.lr_scheduler=constant",
            "train.warmup_steps=0", "train.optimizer=adamw", "train.max_grad_norm=1.0",
            "train.gradient_checkpointing=true", f"train.max_steps={steps}", f"train.log_every={LOG_EVERY}",
            f"train.eval_every={EVAL_EVERY}", f"train.save_every={SAVE_EVERY}", "train.save_total_limit=2",
            "samples.count=2", "samples.max_new_tokens=16", f"output.dir={out_dir}",
            "tracking.wandb.project=null", *extra]


# ------------------------------------------------------------------------------------------ ours


def ours_regime(model_dir: Path, batch: int, seq: int, args) -> dict:
    from finetune.recipe import load_recipe
    from finetune.train.loop import train
    from scripts.bench import bench_phases
    from scripts.bench.bench_train import run_stack

    row = {"stack": "ours", "batch": batch, "seq": seq}
    bare_args = SimpleNamespace(batch=batch, seq=seq, steps=args.steps, rank=16, long=None, profile=False)
    for name in args.bare.split(",") if args.bare else []:
        bare = run_stack(name, {"bf16": model_dir}, bare_args)
        row[f"bare {name}"] = {"tok_s": bare["tok_s"], "peak_gib": bare["peak_gib"]}
    out = Path(tempfile.mkdtemp(prefix="e2e-ours-"))
    recipe = load_recipe(QUICKSTART, recipe_overrides(model_dir, out / "run", batch, seq, args.steps, args.set))
    torch.cuda.reset_peak_memory_stats()
    phases = bench_phases.PhaseMemory(profile_steps=args.profile, profile_from=args.steps - 2 * args.profile + 1)
    t0 = time.perf_counter()
    with phases.installed():
        result = train(recipe, echo=lambda *a, **k: None)
    row["wall_s"] = time.perf_counter() - t0
    metrics = [json.loads(x) for x in (out / "run" / "metrics.jsonl").read_text().splitlines()]
    windows = [m for m in metrics if "tokens_per_s" in m and m["step"] >= TIMED_FROM + LOG_EVERY - 1
               and not any(phases.profiled(s) for s in range(m["step"] - LOG_EVERY + 1, m["step"] + 1))]
    row["tok_s"] = sum(m["tokens_per_s"] for m in windows) / max(len(windows), 1)
    row["tokens"] = max(m.get("tokens", 0) for m in metrics)
    row["losses"] = [m["loss"] for m in metrics if "loss" in m]
    row["eval_loss"] = [result.eval_loss_before, result.eval_loss_after]
    row["phases"] = phases.peaks_gib()
    row["peak_gib"] = phases.run_peak_gib()
    if phases.profile is not None:
        row["profile"] = phases.profile
    print(f"ours {batch}x{seq}: {row['tok_s']:.0f} tok/s, peak {row['peak_gib']:.2f} GiB, phases " +
          ", ".join(f"{k} {v:.2f}" for k, v in row["phases"].items()), flush=True)
    return row


# ------------------------------------------------------------------------------------------ unsloth


def _token_rows(examples):
    from datasets import Dataset

    return Dataset.from_dict({"input_ids": [[int(t) for t in ex["input_ids"]] for ex in examples],
                              "labels": [[int(t) for t in ex["labels"]] for ex in examples]})


def _step_clock():
    """A TrainerCallback timing the intervals between step ends (synced), dropping those that held a log line,
    an evaluation or a checkpoint; plus a forward pre-hook counting training tokens and step-peak memory."""
    from transformers import TrainerCallback

    class StepClock(TrainerCallback):
        def __init__(self):
            self.last, self.dirty, self.tokens, self.intervals = None, False, 0, []
            self.step_peak, self.run_peak = 0, 0

        def count(self, module, args, kwargs):
            if module.training:
                ids = kwargs.get("input_ids", args[0] if args else None)
                mask = kwargs.get("attention_mask")
                self.tokens += int(mask.sum()) if mask is not None else ids.numel()

        def on_step_begin(self, args, state, control, **kw):
            self.run_peak = max(self.run_peak, torch.cuda.max_memory_allocated())
            torch.cuda.reset_peak_memory_stats()

        def on_step_end(self, args, state, control, **kw):
            torch.cuda.synchronize()
            now = time.perf_counter()
            self.step_peak = max(self.step_peak, torch.cuda.max_memory_allocated())
            if self.last is not None and not self.dirty and state.global_step >= TIMED_FROM:
                self.intervals.append((now - self.last, self.tokens))
            self.last, self.dirty, self.tokens = now, False, 0

        def on_log(self, *a, **k):
            self.dirty = True

        on_evaluate = on_save = on_log

    return StepClock()


def unsloth_regime(model_dir: Path, batch: int, seq: int, args) -> dict:
    from unsloth import FastLanguageModel
    from trl import SFTConfig, SFTTrainer

    from finetune.data import build_datasets
    from finetune.recipe import load_recipe
    from quant.loading import load_tokenizer
    from scripts.bench.bench_stacks import TARGETS

    out = Path(tempfile.mkdtemp(prefix="e2e-unsloth-"))
    recipe = load_recipe(QUICKSTART, recipe_overrides(model_dir, out, batch, seq, args.steps,
                                                      [*args.set, "data.packing=false"]))
    data = build_datasets(recipe.data, load_tokenizer(str(model_dir), "base.model"), recipe.train.seed)
    torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    model, tokenizer = FastLanguageModel.from_pretrained(model_name=str(model_dir), max_seq_length=seq,
                                                         dtype=torch.bfloat16, load_in_4bit=True)
    model = FastLanguageModel.get_peft_model(model, r=16, lora_alpha=16, lora_dropout=0.0, bias="none",
                                             target_modules=TARGETS, use_gradient_checkpointing="unsloth",
                                             random_state=recipe.train.seed)
    load_gib = torch.cuda.max_memory_allocated() / 2**30
    config = SFTConfig(
        output_dir=str(out), per_device_train_batch_size=batch, per_device_eval_batch_size=batch,
        gradient_accumulation_steps=1, max_steps=args.steps, learning_rate=1e-4, lr_scheduler_type="constant",
        warmup_steps=0, optim="adamw_torch_fused", weight_decay=0.0, max_grad_norm=1.0, bf16=True,
        logging_steps=LOG_EVERY, eval_strategy="steps", eval_steps=EVAL_EVERY, save_strategy="steps",
        save_steps=SAVE_EVERY, save_total_limit=2, packing=True, max_length=seq, report_to="none",
        seed=recipe.train.seed, dataloader_num_workers=0)
    trainer = SFTTrainer(model=model, processing_class=tokenizer, args=config,
                         train_dataset=_token_rows(data.train), eval_dataset=_token_rows(data.eval))
    clock = _step_clock()
    trainer.add_callback(clock)
    model.register_forward_pre_hook(clock.count, with_kwargs=True)
    t1 = time.perf_counter()
    trainer.train()
    wall = time.perf_counter() - t1
    run_peak = max(clock.run_peak, torch.cuda.max_memory_allocated()) / 2**30
    seconds = sum(s for s, _ in clock.intervals)
    row = {"stack": "unsloth", "batch": batch, "seq": seq, "tok_s": sum(n for _, n in clock.intervals) / max(seconds, 1e-9),
           "timed_steps": len(clock.intervals), "peak_gib": max(run_peak, load_gib), "wall_s": wall + t1 - t0,
           "phases": {"load": load_gib, "steps": clock.step_peak / 2**30},
           "losses": [h["loss"] for h in trainer.state.log_history if "loss" in h]}
    print(f"unsloth {batch}x{seq}: {row['tok_s']:.0f} tok/s over {len(clock.intervals)} steps, peak "
          f"{row['peak_gib']:.2f} GiB (steps {row['phases']['steps']:.2f})", flush=True)
    del trainer, model
    return row


# ------------------------------------------------------------------------------------------ driver


def worker(args) -> None:
    if args.worker == "unsloth":
        import unsloth  # noqa: F401  (before transformers)
    run = ours_regime if args.worker == "ours" else unsloth_regime
    for batch, seq in parse_regimes(args.regimes):
        try:
            row = run(Path(args.model_dir), batch, seq, args)
        except torch.OutOfMemoryError:
            row = {"stack": args.worker, "batch": batch, "seq": seq, "oom": True}
        print("RESULT " + json.dumps(row), flush=True)
        import gc

        gc.collect()
        torch.cuda.empty_cache()


def ensure_model(shape: str, workdir: Path) -> Path:
    from finetune.synthetic import save_random_model

    model_dir = workdir / "bf16"
    if not (model_dir / "config.json").exists():
        save_random_model(shape, model_dir, dtype=torch.bfloat16, device="cuda")
        torch.cuda.empty_cache()
    return model_dir


def main(argv: list[str] | None = None) -> None:
    from scripts.bench.bench_report import e2e_table
    from scripts.bench.bench_train import run_result

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="llama-3.2-1b")
    ap.add_argument("--regimes", default="1x512,8x2048", help="micro-batch x max_length, comma-separated")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--stacks", default="ours,unsloth")
    ap.add_argument("--set", action="append", default=[], help="a recipe override for both stacks (KEY=VALUE)")
    ap.add_argument("--profile", type=int, default=0,
                    help="profile this many of our last steps (torch.profiler), then as many more (cProfile)")
    ap.add_argument("--bare", default="ours@packed,ours", help="bench_train stacks run first as the bare step ('' none)")
    ap.add_argument("--workdir", default=None, help="where the random model is saved (default: a temp dir; reused)")
    ap.add_argument("--json", default=None, help="also write every result to this file")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--model-dir", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("bench_e2e measures GPU training; no CUDA device here")
    if args.worker:
        return worker(args)
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="bench-e2e-"))
    model_dir = ensure_model(args.shape, workdir)
    rows = []
    for stack in args.stacks.split(","):
        cmd = [sys.executable, "-m", "scripts.bench.bench_e2e", "--worker", stack, "--model-dir", str(model_dir),
               "--regimes", args.regimes, "--steps", str(args.steps), "--profile", str(args.profile),
               f"--bare={args.bare}",
               *[f"--set={s}" for s in args.set]]
        rows += run_result(cmd, stack, env=dict(os.environ, PYTHONPATH=os.pathsep.join(
            [str(REPO), os.environ.get("PYTHONPATH", "")])), many=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "rows": rows}, indent=1))
    print(e2e_table(rows, f"{args.shape}, {torch.cuda.get_device_name()}, {args.steps} steps, recipe: "
                          f"quickstart data + bench settings {' '.join(args.set)}".rstrip()))


if __name__ == "__main__":
    main()
