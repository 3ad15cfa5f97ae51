"""QLoRA training speed and memory: the standard HF + peft + bitsandbytes stack and ours, in one process run.

    python scripts/bench_train.py --shape llama-3.1-8b --batch 4 --seq 2048 --steps 50
    python scripts/bench_train.py --shape llama-3.2-1b --batch 8 --seq 2048
    python scripts/bench_train.py --stacks hf-lean,ours,"ours[train.fused_cross_entropy=false]"   # one lever off

Every stack trains the same random-weight model (saved once as bf16), from the same LoRA initialisation
(r=16 on all linear layers, alpha 16, no dropout), on the same random-token batches, with fused AdamW at a
constant learning rate, SDPA attention and non-reentrant gradient checkpointing. Stacks:
  hf-doc   what the QLoRA docs show: BitsAndBytesConfig NF4 + double quant, prepare_model_for_kbit_training
           (upcasts norms/embeddings to fp32), peft get_peft_model (fp32 adapters), bf16 autocast, HF loss
  hf-lean  the same without the fp32 upcasts: bf16 model and bf16 adapters, no autocast
  ours     `finetune sft`'s own path: finetune.model.load_base + attach_lora, finetune.train.loss, and the
           optimizer `finetune sft` builds; `ours[KEY=VALUE,...]` applies recipe overrides (levers on/off)
Prints one table: tokens/s, peak GPU memory (what the stack itself allocated, above what was allocated before
it), LoRA-MFU, max per-step loss difference to the first stack, and speed/memory ratios against the first stack
and against hf-lean. Timing skips the first 3 steps.
LoRA-MFU counts 4N FLOPs per token (forward + input-gradient of the frozen linears, no recomputation) plus
causal attention, against the H100's 989 TFLOP/s dense bf16 peak.
"""

from __future__ import annotations

import argparse
import gc
import re
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from finetune.synthetic import random_model, save_model_dir, save_rtn_gptq  # noqa: E402
from quant.formats.registry import DEFAULT_BASE, base_format  # noqa: E402

PEAK_FLOPS = 989e12
WARMUP = 3


def flops_per_token(config, seq: int) -> float:
    h, L = config.hidden_size, config.num_hidden_layers
    kv = config.num_key_value_heads * (h // config.num_attention_heads)
    linear = L * (2 * h * h + 2 * h * kv + 3 * h * config.intermediate_size) + h * config.vocab_size
    attention = 3 * 2 * L * seq * h  # QK^T and PV, causal half, forward + 2x for backward
    return 4 * linear + attention


def hf_stack(model_dir: Path, lean: bool, rank: int):
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                             bnb_4bit_compute_dtype=torch.bfloat16)
    model = AutoModelForCausalLM.from_pretrained(model_dir, quantization_config=bnb, dtype=torch.bfloat16,
                                                 device_map={"": 0}, attn_implementation="sdpa")
    ckpt = {"use_reentrant": False}
    if lean:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=ckpt)
    else:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True,
                                                gradient_checkpointing_kwargs=ckpt)
    model.config.use_cache = False
    torch.manual_seed(0)
    model = get_peft_model(model, LoraConfig(r=rank, lora_alpha=rank, lora_dropout=0.0, target_modules="all-linear",
                                             task_type="CAUSAL_LM"), autocast_adapter_dtype=not lean)
    params = [p for p in model.parameters() if p.requires_grad]
    if lean:
        for p in params:
            p.data = p.data.to(torch.bfloat16)
    opt = torch.optim.AdamW(params, lr=1e-4, fused=True)

    def loss_of(ids):
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=not lean):
            return model(input_ids=ids, labels=ids, use_cache=False).loss

    return model, opt, loss_of


def our_stack(model_dir: Path, rank: int, overrides: list[str], base_kind: str):
    from finetune.model import attach_lora, load_base
    from finetune.recipe import recipe_from_dict, apply_overrides
    from finetune.train.loss import causal_lm_loss, fusable_head
    from finetune.train.optim import build_optimizer

    data = {"base": {"model": str(model_dir), "quantization": base_kind, "compute_dtype": "bfloat16",
                     "attn_implementation": "sdpa"},
            "lora": {"r": rank, "alpha": rank, "dropout": 0.0, "target_modules": "all-linear"},
            "data": {"train": str(model_dir / "config.json")},
            "train": {"max_steps": 1, "learning_rate": 1e-4, "lr_scheduler": "constant",
                      "gradient_checkpointing": True}}
    recipe = recipe_from_dict(apply_overrides(data, overrides))
    loaded = load_base(recipe.base, torch.device("cuda"))
    torch.manual_seed(0)
    model = attach_lora(loaded.model, recipe.lora, recipe.train.gradient_checkpointing)
    opt = build_optimizer(model.parameters(), recipe.train, torch.device("cuda"))
    head = fusable_head(model, sharded=False)[0] if recipe.train.fused_cross_entropy else None
    autocast = torch.bfloat16 if recipe.train.autocast else None

    def loss_of(ids):
        s, n = causal_lm_loss(model, {"input_ids": ids, "labels": ids}, head, autocast)
        return s / n

    return model, opt, loss_of


def run_stack(name: str, dirs: dict, batches, rank: int) -> dict:
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    # Whatever an earlier stack left allocated (peft and accelerate keep some references alive) is not this one's.
    before = torch.cuda.memory_allocated()
    t0 = time.perf_counter()
    if name in ("hf-doc", "hf-lean"):
        model, opt, loss_of = hf_stack(dirs["bf16"], name == "hf-lean", rank)
    else:
        m = re.fullmatch(r"ours(?:\[(.*)\])?", name)
        if not m:
            raise SystemExit(f"unknown stack {name!r}: hf-doc, hf-lean, ours, ours[key=value,...]")
        overrides = [o for o in (m.group(1) or "").split(",") if o]
        kind = next((o.split("=", 1)[1] for o in overrides if o.startswith("base.quantization=")), DEFAULT_BASE)
        model, opt, loss_of = our_stack(dirs["quantized" if base_format(kind).stored_quantized else "bf16"], rank,
                                        overrides, kind)
    load_s = time.perf_counter() - t0
    model.train()
    losses, times = [], []
    for ids in batches:
        torch.cuda.synchronize()
        t = time.perf_counter()
        loss = loss_of(ids)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())  # syncs
        times.append(time.perf_counter() - t)
    tokens = batches[0].numel()
    steady = times[WARMUP:] or times
    row = {"stack": name, "tok_s": tokens * len(steady) / sum(steady), "peak_gib": (torch.cuda.max_memory_allocated() - before) / 2**30,
           "losses": losses, "load_s": load_s}
    del model, opt, loss_of
    gc.collect()
    torch.cuda.empty_cache()
    print(f"{name}: {row['tok_s']:.0f} tok/s, peak {row['peak_gib']:.2f} GiB, loss {losses[0]:.4f} -> {losses[-1]:.4f}, "
          f"load {load_s:.0f}s", flush=True)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="llama-3.1-8b", help="llama-3.2-1b, llama-3.1-8b, qwen2.5-7b, ... (finetune.synthetic)")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--stacks", default="hf-doc,hf-lean,ours", help="comma-separated; the first is the reference")
    ap.add_argument("--workdir", default=None, help="where the random model is saved (default: a temp dir)")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_train.py measures GPU training; no CUDA device here")
    stacks = re.findall(r"[\w-]+(?:\[[^\]]*\])?", args.stacks)

    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench-train-"))
    model = random_model(args.shape, dtype=torch.bfloat16, device="cuda")
    config = model.config
    dirs = {"bf16": save_model_dir(model, work / "bf16")}
    kinds = [k for s in stacks for k in re.findall(r"base\.quantization=(\w+)", s)]
    if any(base_format(k).stored_quantized for k in kinds):  # GPTQ trains from an RTN GPTQ copy of the model
        dirs["quantized"] = save_rtn_gptq(model, work / "gptq")
    del model
    gc.collect()
    g = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, config.vocab_size, (args.batch, args.seq), generator=g).cuda() for _ in range(args.steps)]

    rows = []
    for name in stacks:
        try:
            rows.append(run_stack(name, dirs, batches, args.rank))
        except torch.OutOfMemoryError:
            print(f"{name}: out of memory", flush=True)
            gc.collect()
            torch.cuda.empty_cache()
    if not rows:
        return
    fpt = flops_per_token(config, args.seq)
    ref = rows[0]
    lean = next((r for r in rows if r["stack"] == "hf-lean"), None)
    print(f"\n{args.shape}, {args.batch} x {args.seq} tokens, LoRA r={args.rank} all-linear, {args.steps} steps "
          f"(timed from step {WARMUP + 1}), {torch.cuda.get_device_name()}")
    print(f"| stack | tok/s | peak GiB | LoRA-MFU | max rel. loss diff vs {ref['stack']} | speed vs {ref['stack']} | "
          "speed vs hf-lean | memory vs hf-lean |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        diff = max(abs(a - b) / abs(b) for a, b in zip(r["losses"], ref["losses"]))
        vs_lean = (f"{r['tok_s'] / lean['tok_s']:.2f}x | {r['peak_gib'] / lean['peak_gib']:.2f}x" if lean else "- | -")
        print(f"| {r['stack']} | {r['tok_s']:.0f} | {r['peak_gib']:.2f} | {r['tok_s'] * fpt / PEAK_FLOPS:.1%} | "
              f"{diff:.2%} | {r['tok_s'] / ref['tok_s']:.2f}x | {vs_lean} |")


if __name__ == "__main__":
    main()
