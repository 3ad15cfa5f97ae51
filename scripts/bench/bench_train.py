"""QLoRA training speed and memory on one GPU: transformers + peft + bitsandbytes, Liger-Kernel, unsloth and ours.

    python -m scripts.bench.bench_train --shape llama-3.1-8b --batch 4 --seq 2048 --steps 30 \\
        --stacks hf-lean,liger,unsloth,ours,ours@packed,hf-lean@packed
    python -m scripts.bench.bench_train --shape llama-3.2-1b --batch 8 --stacks hf-lean,liger,ours
    python -m scripts.bench.bench_train --shape qwen3-30b-a3b --batch 2 --seq 2048 --stacks hf-lean,unsloth,ours
    python -m scripts.bench.bench_train --stacks hf-lean,ours,"ours[train.fused_lora=false]"      # one lever off
    python -m scripts.bench.bench_train --stacks ours,"ours[base.quantization=gptq]"              # GPTQ 4-bit base
    python -m scripts.bench.bench_train --long 32768,65536,131072,262144 --stacks ours,unsloth    # batch 1, growing
    python -m scripts.bench.bench_train --profile ours --steps 8                                  # time in buckets
    python -m scripts.bench.bench_train --e2e 1x512,8x2048 --shape llama-3.2-1b   # `finetune sft` vs unsloth's trainer

Every stack (scripts/bench/bench_stacks.py says what each is) trains the same random-weight model, saved once as
bf16, from the same LoRA initialisation where the stack lets us (r=16 on all 7 projections, alpha 16, no
dropout), on the same random-token batches, with fused AdamW at a constant learning rate. `STACK@packed`
trains on packed rows instead: examples of 64-1024 tokens packed into each row, position ids restarting at
every example (as `finetune sft` packs), labels hidden at each example's first token. Liger and unsloth patch
libraries globally, so each runs in a process of its own (unsloth imported before transformers: nothing that
imports transformers is imported at the top of this file or of bench_stacks.py).

Prints one table: tokens/s (every token of the batch; timing skips the first 3 steps), peak GPU memory (what the
stack itself allocated, above what was allocated before it), LoRA-MFU, the largest per-step loss difference to
the first stack, and speed/memory ratios against hf-lean, liger and unsloth measured in the same run, then the
issue's targets as ratios. Long mode (`--long`): batch 1 at each length, seconds per step and peak memory, and
the largest length that fits the card by the slope of peak memory over the last two lengths. End-to-end mode
(`--e2e REGIMES`, scripts/bench/bench_e2e.py): `finetune sft` itself against unsloth's trainer path.
LoRA-MFU counts 4N FLOPs per token (forward + input-gradient of the frozen linears, no recomputation) plus
causal attention, against a dense bf16 peak of 989 TFLOP/s (H100/H200).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]

from scripts.bench import bench_stacks
from scripts.bench.bench_report import long_table, main_table

WARMUP = 3


def make_batches(vocab: int, batch: int, seq: int, steps: int, packed: bool, seed: int = 0):
    """[(input_ids, position_ids or None)] on the GPU; the same for every stack and process."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(steps):
        ids = torch.randint(0, vocab, (batch, seq), generator=g)
        pos = bench_stacks.packed_positions(batch, seq, g).cuda() if packed else None
        out.append((ids.cuda(), pos))
    return out


def _free() -> None:
    gc.collect()
    torch.cuda.empty_cache()


def train_steps(loss_of, opt, batches) -> tuple[list[float], list[float]]:
    losses, times = [], []
    for ids, pos in batches:
        torch.cuda.synchronize()
        t = time.perf_counter()
        loss = loss_of(ids, pos)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())  # syncs
        times.append(time.perf_counter() - t)
    return losses, times


def run_stack(name: str, dirs: dict, args) -> dict:
    """Build `name`, train it on the run's batches (or, in long mode, at each length); one result dict."""
    _free()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    t0 = time.perf_counter()
    lengths = _lengths(args)
    model, opt, loss_of = bench_stacks.build(name, dirs, args.rank, max(lengths) if lengths else args.seq)
    load_s = time.perf_counter() - t0
    model.train()
    vocab = model.config.vocab_size if hasattr(model, "config") else None
    row = {"stack": name, "load_s": load_s}
    if lengths:
        row["long"] = long_run(loss_of, opt, vocab, lengths, args.long_steps, before)
    else:
        batches = make_batches(vocab, args.batch, args.seq, args.steps, bench_stacks.parse_stack(name)[2])
        if args.profile:
            from scripts.bench.bench_profile import profile_steps

            row["profile"] = profile_steps(loss_of, opt, batches, train_steps, rank=args.rank, vocab=vocab)
        else:
            losses, times = train_steps(loss_of, opt, batches)
            steady = times[WARMUP:] or times
            row.update(tok_s=batches[0][0].numel() * len(steady) / sum(steady), losses=losses,
                       peak_gib=(torch.cuda.max_memory_allocated() - before) / 2**30)
            print(f"{name}: {row['tok_s']:.0f} tok/s, peak {row['peak_gib']:.2f} GiB, loss {losses[0]:.4f} -> "
                  f"{losses[-1]:.4f}, load {load_s:.0f}s", flush=True)
    del model, opt, loss_of
    bench_stacks.release()
    _free()
    return row


def long_run(loss_of, opt, vocab: int, lengths: list[int], steps: int, before: int) -> list[dict]:
    results = []
    for n in lengths:
        _free()
        if hasattr(torch._C, "_host_emptyCache"):  # pinned blocks of the last length would not fit this one
            torch._C._host_emptyCache()
        torch.cuda.reset_peak_memory_stats()
        # Past 128k a step takes minutes: one (untimed warm-up included, so its time is an upper bound).
        batches = make_batches(vocab, 1, n, steps if n <= 131072 else 1, packed=False, seed=n)
        try:
            losses, times = train_steps(loss_of, opt, batches)
        except torch.OutOfMemoryError:
            opt.zero_grad(set_to_none=True)
            print(f"  {n} tokens: out of memory", flush=True)
            results.append({"tokens": n, "oom": True})
            break
        s = times[-1] if len(times) == 1 else min(times[1:])
        r = {"tokens": n, "s_step": s, "peak_gib": (torch.cuda.max_memory_allocated() - before) / 2**30,
             "loss": losses[-1], "first_step_s": times[0]}
        print(f"  {n} tokens: {s:.2f} s/step, peak {r['peak_gib']:.2f} GiB, loss {losses[-1]:.4f}", flush=True)
        results.append(r)
        del batches
    return results


def _lengths(args) -> list[int]:
    return [int(x) for x in args.long.split(",")] if args.long else []


def run_isolated(name: str, args) -> dict | None:
    """The stack in a fresh process (`--worker`): its result line, or None if it failed (its log is shown)."""
    cmd = [sys.executable, __file__, "--worker", name, "--workdir", str(args.workdir), "--shape", args.shape,
           "--batch", str(args.batch), "--seq", str(args.seq), "--steps", str(args.steps), "--rank", str(args.rank),
           "--long-steps", str(args.long_steps)] + (["--long", args.long] if args.long else []) + \
          (["--profile"] if args.profile else [])
    return run_result(cmd, name)


def run_result(cmd: list[str], name: str, env: dict | None = None, many: bool = False):
    """Run `cmd` (a worker printing `RESULT <json>` lines), echoing its log: the last result, or None if it printed
    none (`many`: every result, in order)."""
    env = dict(env or os.environ, HF_HUB_OFFLINE="1", UNSLOTH_DISABLE_STATISTICS="1", PYTHONUNBUFFERED="1")
    proc = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    results = []
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            results.append(json.loads(line[len("RESULT "):]))
        elif not re.match(r"^\s*(Loading|Writing|\r)", line):
            print(f"  [{name}] {line}", flush=True)
    if not results:
        print(f"{name}: failed (exit {proc.returncode})", flush=True)
    return results if many else (results[-1] if results else None)


def model_dirs(args) -> tuple[dict, object]:
    from finetune.synthetic import model_config, random_model, save_model_dir, save_rtn_gptq
    from quant.formats.registry import base_format

    work = Path(args.workdir)
    dirs = {"bf16": work / "bf16", "quantized": work / "gptq"}  # GPTQ trains from an RTN GPTQ copy of the model
    if args.worker:
        return dirs, model_config(args.shape)
    stacks = re.findall(r"[\w-]+(?:\[[^\]]*\])?(?:@packed)?", args.stacks)
    kinds = [k for s in stacks for k in re.findall(r"base\.quantization=(\w+)", s)]
    need_quantized = any(base_format(k).stored_quantized for k in kinds)
    if not (dirs["bf16"] / "config.json").exists() or (
            need_quantized and not (dirs["quantized"] / "config.json").exists()):
        model = random_model(args.shape, dtype=torch.bfloat16, device="cuda")
        save_model_dir(model, dirs["bf16"])
        if need_quantized:
            save_rtn_gptq(model, dirs["quantized"])
        del model
        _free()
    return dirs, model_config(args.shape)


def main() -> None:
    if "--e2e" in sys.argv:  # the end-to-end mode is bench_e2e.py (which imports this module), with its options
        i = sys.argv.index("--e2e")
        os.execv(sys.executable, [sys.executable, "-m", "scripts.bench.bench_e2e", *sys.argv[1:i], "--regimes",
                                  *sys.argv[i + 1:]])
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="llama-3.1-8b", help="a key of finetune.synthetic.SHAPES: llama-3.2-1b, "
                    "llama-3.1-8b, qwen2.5-7b, qwen3-30b-a3b (a mixture of experts), ...")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--stacks", default="hf-lean,liger,unsloth,ours,ours@packed,hf-lean@packed",
                    help="comma-separated; the first is the loss reference")
    ap.add_argument("--long", default=None, help="comma-separated lengths: long-context mode at batch 1")
    ap.add_argument("--long-steps", type=int, default=2,
                    help="steps per length in long mode, the fastest after the first is timed (past 128k: one)")
    ap.add_argument("--profile", action="store_true", help="profile each stack's steps into time buckets instead")
    ap.add_argument("--workdir", default=None, help="where the random model is saved (default: a temp dir; reused)")
    ap.add_argument("--json", default=None, help="also write every result to this file")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_train.py measures GPU training; no CUDA device here")
    if args.worker and bench_stacks.parse_stack(args.worker)[0] == "unsloth":
        import unsloth  # noqa: F401  (before transformers, which the model directories import)
    args.workdir = args.workdir or tempfile.mkdtemp(prefix="bench-train-")
    dirs, config = model_dirs(args)
    if args.worker:
        print("RESULT " + json.dumps(run_stack(args.worker, dirs, args)), flush=True)
        return
    stacks = re.findall(r"[\w-]+(?:\[[^\]]*\])?(?:@packed)?", args.stacks)
    rows = []
    for name in stacks:
        isolated = bench_stacks.parse_stack(name)[0] in bench_stacks.ISOLATED
        try:
            row = run_isolated(name, args) if isolated else run_stack(name, dirs, args)
        except torch.OutOfMemoryError:
            print(f"{name}: out of memory", flush=True)
            _free()
            continue
        if row:
            rows.append(row)
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "rows": rows}, indent=1))
    if not rows:
        return
    where = "attention + experts" if getattr(config, "num_experts", 0) else "all 7 projections"
    title = f"{args.shape}, LoRA r={args.rank} {where}, {torch.cuda.get_device_name()}"
    if args.long:
        print(long_table(rows, title, torch.cuda.get_device_properties(0).total_memory / 2**30))
    elif args.profile:
        from scripts.bench.bench_profile import profile_table

        print(profile_table(rows, title))
    else:
        print(main_table(rows, config, args, WARMUP, title))


if __name__ == "__main__":
    main()
