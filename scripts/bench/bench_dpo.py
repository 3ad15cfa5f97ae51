"""DPO steps on one GPU: ours against TRL's DPOTrainer (transformers + peft + bitsandbytes) and unsloth's DPO path.

    python3 -m scripts.bench.bench_dpo                          # Llama-3.1-8B shape, 4 pairs x 2 x 1024 tokens, NF4
    python3 -m scripts.bench.bench_dpo --stacks ours,trl --steps 6
    python3 -m scripts.bench.bench_dpo --smoke                  # CPU: a tiny model, 2 steps of ours and TRL's

Every stack trains the same random-weight model (saved once as bf16, quantized to NF4 with double quantization on
load) with LoRA r=16 on all 7 projections (alpha 16, no dropout), gradient checkpointing, fused AdamW at a
constant learning rate, on the same batches: `--pairs` pairs of random tokens, each sequence `--seq` tokens, half
prompt and half answer (chosen and rejected the same length, so no stack pads). DPO with beta 0.1 and the
reference = the same base with the adapter switched off (no second model):
  ours     `finetune dpo`'s path: load_base + attach_lora + install_fast_path, PreferenceObjective (chunked LM head
           over the answer tokens only, chosen and rejected in one forward)
  trl      TRL's DPOTrainer.compute_loss on the QLoRA docs' model (NF4 + double quant, prepare_model_for_kbit_training,
           bf16 autocast), TRL's own chunked log-prob head and its reference pass with the adapter disabled
  unsloth  unsloth's FastLanguageModel QLoRA model under the DPOTrainer unsloth patches on import (its own
           kernels and offloaded checkpointing); imported before transformers, in a process of its own
Each stack runs in a fresh process (unsloth patches transformers and TRL for the whole process, so each stack's
imports are inside its own function: nothing imports transformers before unsloth). Printed: tokens/s
(all 2 x pairs x seq tokens of a step; the first `--warmup` steps not timed), peak GPU memory allocated by the
process (the NF4 weights included, the same for every stack), the first and last loss, and ours as ratios of each
other stack measured in the same run. The issue's target: >= 1.25x unsloth's tokens/s at <= its peak memory.

Needs on the GPU image: bitsandbytes, trl, peft and (for its column) unsloth + unsloth_zoo, from the wheels in the
shared gpu-wheels folder on PYTHONPATH. `--smoke` runs the same code on CPU with a tiny shape (unsloth left out:
it needs CUDA; TRL's Triton-only head replaced by its plain-torch definition, scripts/bench/trl_cpu.py).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from quant.files import write_text

RANK, BETA, LR = 16, 0.1, 1e-5
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def pair_examples(vocab: int, pairs: int, seq: int, steps: int, seed: int = 0) -> list[list[dict]]:
    """Per step, `pairs` preference examples (preference_encode's form): prompt seq/2 tokens, answers seq/2 each."""
    import numpy as np

    g = np.random.default_rng(seed)
    half = seq // 2
    draw = lambda n: g.integers(3, vocab, n, dtype=np.int32)  # noqa: E731  (ids 0-2: the byte tokenizer's specials)
    return [[{"prompt": draw(half), "answers": [draw(seq - half), draw(seq - half)], "desirable": None, "pinned": 0}
             for _ in range(pairs)] for _ in range(steps)]


def ours(model_dir: Path, device: torch.device):
    """(model, optimizer, step_loss(examples) -> loss) of `finetune dpo`'s path."""
    from finetune.data.preference_collate import collate_preferences
    from finetune.kernels import install_fast_path
    from finetune.model import attach_lora, load_base
    from finetune.recipe import recipe_from_dict
    from finetune.recipe_preference import PreferenceConfig
    from finetune.train.objectives.preference import PreferenceObjective
    from finetune.train.optim import build_optimizer

    cpu = device.type == "cpu"
    recipe = recipe_from_dict({
        "base": {"model": str(model_dir), "quantization": "nf4", "compute_dtype": "float32" if cpu else "bfloat16",
                 "attn_implementation": "sdpa"},
        "lora": {"r": RANK, "alpha": RANK, "dropout": 0.0, "target_modules": "all-linear"},
        "data": {"train": str(model_dir / "config.json")}, "preference": {"objective": "dpo", "beta": BETA},
        "train": {"max_steps": 1, "learning_rate": LR, "lr_scheduler": "constant", "gradient_checkpointing": True}})
    base = load_base(recipe.base, device)
    torch.manual_seed(0)
    model = attach_lora(base.model, recipe.lora, recipe.train.gradient_checkpointing)
    print(f"  fast path: {install_fast_path(model, recipe.train).summary()}", flush=True)
    optimizer = build_optimizer(model.parameters(), recipe.train, device)
    objective = PreferenceObjective.for_model(PreferenceConfig(objective="dpo", beta=BETA), model, recipe.train,
                                              base.compute_dtype, False, print)
    pad = base.tokenizer.pad_token_id or 0

    def step_loss(examples):
        batch = collate_preferences(examples, pad, False, 1 << 20)
        batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
        loss_sum, pairs, _ = objective.loss(model, batch)
        return loss_sum / pairs

    return model, optimizer, step_loss


def trl_step(model, tokenizer, device: torch.device, out_dir: Path):
    """step_loss(examples) of TRL's DPOTrainer.compute_loss around the peft `model` (reference: adapter off)."""
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    from finetune.data.preference_collate import collate_preferences
    from scripts.bench.trl_cpu import trl_inputs

    cpu = device.type == "cpu"
    args = DPOConfig(output_dir=str(out_dir), report_to=[], use_cpu=cpu, bf16=not cpu, beta=BETA,
                     per_device_train_batch_size=4, gradient_checkpointing=True, disable_tqdm=True,
                     gradient_checkpointing_kwargs={"use_reentrant": False})
    rows = [{"prompt": "q", "chosen": "yes", "rejected": "no"}] * 4
    trainer = DPOTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tokenizer)
    if "ref" in getattr(model, "peft_config", {}):
        model.delete_adapter("ref")  # TRL's reference for a new adapter: the base with the adapter switched off
    pad = tokenizer.pad_token_id or 0

    def step_loss(examples):
        batch = collate_preferences(examples, pad, False, 1 << 20)
        inputs = {k: v.to(device) for k, v in trl_inputs(batch).items()}
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=not cpu):
            return trainer.compute_loss(model, inputs)

    return step_loss


def trl(model_dir: Path, device: torch.device, out_dir: Path):
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                             bnb_4bit_compute_dtype=dtype)
    model = AutoModelForCausalLM.from_pretrained(model_dir, quantization_config=bnb, dtype=dtype,
                                                 device_map={"": device}, attn_implementation="sdpa")
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True,
                                            gradient_checkpointing_kwargs={"use_reentrant": False})
    torch.manual_seed(0)
    model = get_peft_model(model, LoraConfig(r=RANK, lora_alpha=RANK, lora_dropout=0.0, target_modules=TARGETS,
                                             task_type="CAUSAL_LM"))
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=LR, fused=device.type == "cuda")
    return model, optimizer, trl_step(model, AutoTokenizer.from_pretrained(model_dir), device, out_dir)


def unsloth(model_dir: Path, device: torch.device, out_dir: Path, seq: int):
    import unsloth as _unsloth  # noqa: F401  (before transformers and TRL: it patches both)
    from unsloth import FastLanguageModel

    model, tokenizer = FastLanguageModel.from_pretrained(model_name=str(model_dir), max_seq_length=seq,
                                                         dtype=torch.bfloat16, load_in_4bit=True)
    model = FastLanguageModel.get_peft_model(model, r=RANK, lora_alpha=RANK, lora_dropout=0.0, bias="none",
                                             target_modules=TARGETS, use_gradient_checkpointing="unsloth",
                                             random_state=0)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR, fused=True)
    return model, optimizer, trl_step(model, tokenizer, device, out_dir)


def worker(args) -> dict:
    """One stack in this process: its steps timed, its peak memory; the result dict."""
    from contextlib import nullcontext

    device = torch.device("cpu" if args.smoke else "cuda")
    model_dir = Path(args.workdir) / "bf16"
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as out:
        if args.worker == "ours":
            model, optimizer, step_loss = ours(model_dir, device)
        elif args.worker == "trl":
            model, optimizer, step_loss = trl(model_dir, device, Path(out))
        else:
            model, optimizer, step_loss = unsloth(model_dir, device, Path(out), args.seq)
        load_s = time.perf_counter() - started
        model.train()
        steps = pair_examples(model.config.vocab_size, args.pairs, args.seq, args.steps)
        head = nullcontext()
        if args.smoke and args.worker == "trl":
            from scripts.bench.trl_cpu import plain_trl_head

            head = plain_trl_head()
        losses, times = [], []
        with head:
            for examples in steps:
                if device.type == "cuda":
                    torch.cuda.synchronize()
                t = time.perf_counter()
                loss = step_loss(examples)
                loss.backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                losses.append(float(loss))  # syncs
                times.append(time.perf_counter() - t)
    timed = times[args.warmup:] or times
    # CPU (smoke): the process's peak resident set, in GiB as on the GPU.
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else \
        resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    return {"stack": args.worker, "tok_s": 2 * args.pairs * args.seq * len(timed) / sum(timed), "peak_gib": peak,
            "loss_first": losses[0], "loss_last": losses[-1], "load_s": load_s}


def run_isolated(stack: str, args) -> dict | None:
    cmd = [sys.executable, "-m", "scripts.bench.bench_dpo", "--worker", stack, "--workdir", str(args.workdir),
           "--pairs", str(args.pairs), "--seq", str(args.seq), "--steps", str(args.steps), "--warmup",
           str(args.warmup)] + (["--smoke"] if args.smoke else [])
    env = dict(os.environ, HF_HUB_OFFLINE="1", UNSLOTH_DISABLE_STATISTICS="1", PYTHONUNBUFFERED="1")
    proc = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          cwd=Path(__file__).resolve().parents[2])
    lines = proc.stdout.splitlines()
    result = next((json.loads(line[7:]) for line in lines if line.startswith("RESULT ")), None)
    if result is None:
        print(f"{stack}: failed (exit {proc.returncode})\n" + "\n".join(f"  [{stack}] {x}" for x in lines[-30:]))
    return result


def table(rows: list[dict]) -> str:
    out = [f"{'stack':<9}{'tok/s':>10}{'peak GiB':>10}{'loss first':>12}{'last':>9}{'load s':>8}"]
    out += [f"{r['stack']:<9}{r['tok_s']:>10.0f}{r['peak_gib']:>10.2f}{r['loss_first']:>12.4f}{r['loss_last']:>9.4f}"
            f"{r['load_s']:>8.0f}" for r in rows]
    mine = next((r for r in rows if r["stack"] == "ours"), None)
    for r in rows:
        if mine is not None and r is not mine:
            out.append(f"ours / {r['stack']}: {mine['tok_s'] / r['tok_s']:.2f}x tokens/s, "
                       f"{mine['peak_gib'] / r['peak_gib']:.2f}x peak memory")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="llama-3.1-8b", help="finetune.synthetic shape (llama-3.1-8b, llama-3.2-1b)")
    ap.add_argument("--pairs", type=int, default=4)
    ap.add_argument("--seq", type=int, default=1024, help="tokens per sequence (prompt + answer)")
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--stacks", default="ours,trl,unsloth")
    ap.add_argument("--smoke", action="store_true", help="CPU, tiny shape, 2 steps of ours and trl")
    ap.add_argument("--workdir", default=None, help="where the random model is saved (default: a temp dir)")
    ap.add_argument("--json", default=None, help="also write the rows here")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        print("RESULT " + json.dumps(worker(args)), flush=True)
        return 0
    if args.smoke:
        args.shape, args.seq, args.steps, args.warmup = "tiny", 64, 2, 0
        args.stacks = ",".join(s for s in args.stacks.split(",") if s != "unsloth")
    from finetune.synthetic import save_random_model

    with tempfile.TemporaryDirectory() as tmp:
        args.workdir = Path(args.workdir or tmp)
        if not (args.workdir / "bf16" / "config.json").exists():
            save_random_model(args.shape, args.workdir / "bf16", device="cpu" if args.smoke else "cuda")
        print(f"{args.shape}: {args.pairs} pairs x 2 x {args.seq} tokens, NF4, LoRA r={RANK}, {args.steps} steps "
              f"({args.warmup} untimed){', CPU smoke' if args.smoke else ''}", flush=True)
        rows = [r for r in (run_isolated(s, args) for s in args.stacks.split(",")) if r is not None]
    print(table(rows) if rows else "no stack ran")
    if args.json:
        write_text(args.json, json.dumps(rows, indent=1))
    return 0 if len(rows) == len(args.stacks.split(",")) else 1


if __name__ == "__main__":
    sys.exit(main())
