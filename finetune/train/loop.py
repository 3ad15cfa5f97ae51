"""`finetune sft`: the training loop, readable top to bottom.

recipe -> base + LoRA -> data -> optimizer/schedule -> [resume] -> steps (accumulate, clip, step, log,
eval, save) -> final adapter. Multi-process runs go through accelerate: each rank takes its share of every
global batch, and the loss is normalised by the label tokens of the whole global batch, so any world size
and accumulation split of the same global batch gives the same update.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from finetune.data import build_datasets, count_label_tokens
from finetune.kernels import install_fast_path
from finetune.model import attach_lora, count_parameters, load_base, memory_report
from finetune.recipe import Recipe, dump_recipe
from finetune.train.batches import BatchStream, eval_batches
from finetune.train.checkpoint import TrainState, atomic_dir, write_text_atomic
from finetune.train.diskspace import disk_space_guard, tensor_bytes
from finetune.train.guard import NonFiniteGradient, check_loss, check_weights, stop as guard_stop
from finetune.train.loss import causal_lm_loss, fusable_head
from finetune.train.optim import build_optimizer, build_scheduler
from finetune.train.resume import SCHEDULE, check_data, data_fingerprint, reapply_schedule
from finetune.train.rundir import RunStart, prepare_run
from finetune.train.runtime import Runtime
from finetune.train.samples import generate_samples, prompts_from_examples
from finetune.train.tracking import Tracker, format_metrics
from quant.errors import UserError
from quant.formats.base import BaseSpec

log = logging.getLogger("finetune")
DATA_REPORT = "data_report.json"  # in output.dir: DataReport.to_dict() of the run's data


@dataclass
class TrainResult:
    output_dir: Path
    adapter_dir: Path
    steps: int
    eval_loss_before: float | None
    eval_loss_after: float | None
    train_loss_last: float | None
    wall_s: float
    tokens_per_s: float


def train(recipe: Recipe, resume: bool = False, echo=print, force: bool = False) -> TrainResult:
    """Train as `recipe` says. `resume`: continue from the newest valid checkpoint in output.dir; `force`:
    allow recipe changes that alter the rest of the trajectory (finetune/train/resume.py)."""
    rt = Runtime.create()
    say = echo if rt.is_main else (lambda *a, **k: None)
    # The base resolved once (format, settings, weights, compute dtype); one this distributed setup cannot
    # train is refused before output.dir is touched.
    spec = rt.check_base(recipe.base)
    start = prepare_run(recipe, rt, resume, force, say)  # output.dir checked and locked before anything loads
    try:
        return _train(recipe, rt, start, spec, say)
    finally:
        start.close()


def _train(recipe: Recipe, rt: Runtime, start: RunStart, spec: BaseSpec, say) -> TrainResult:
    started = time.perf_counter()
    out_dir = start.out_dir
    cfg = recipe.train
    rt.seed_everything(cfg.seed)

    base = load_base(spec, rt.device, recipe.base.attn_implementation)
    trainable_before, total = count_parameters(base.model)
    model = attach_lora(base.model, recipe.lora, cfg.gradient_checkpointing)
    fast = install_fast_path(model, cfg, distributed=rt.world_size > 1, sharded=rt.shards_parameters)
    say(f"fast path: {fast.summary()}")
    trainable, _ = count_parameters(model)
    mem = memory_report(model)
    say(f"base: {recipe.base.model} as {base.quantization} ({total / 1e6:.1f}M params, compute {base.compute_dtype}); "
        f"model memory {mem['total_mb']:.0f} MiB (quantized {mem['quantized_mb']:.0f}, other frozen "
        f"{mem['frozen_mb']:.0f}, LoRA {mem['trainable_mb']:.1f}); trainable {trainable / 1e6:.2f}M")

    data = build_datasets(recipe.data, base.tokenizer, cfg.seed)
    say("data: " + data.report.summary())
    stream = BatchStream(data.train, cfg.micro_batch_size, cfg.gradient_accumulation, cfg.seed,
                         base.tokenizer.pad_token_id, recipe.data.packing, rt.rank, rt.world_size)
    total_steps = cfg.max_steps or math.ceil(cfg.epochs * stream.steps_per_epoch)
    if total_steps < 1 or stream.steps_per_epoch < 1:
        raise UserError(f"data.train: {len(data.train)} sequences make no full step of "
                        f"{stream.global_micro_batches} micro-batches of {cfg.micro_batch_size}; lower "
                        "train.micro_batch_size or train.gradient_accumulation")

    optimizer = build_optimizer(model.parameters(), cfg, rt.device)
    scheduler = build_scheduler(optimizer, cfg, total_steps)
    model, optimizer = rt.prepare(model, optimizer, cfg)
    if rt.distributed_type != "NO":
        say(f"distributed: {rt.describe()}")

    head = None
    if cfg.fused_cross_entropy:
        head, why = fusable_head(rt.unwrap(model), rt.shards_parameters)
        if head is None:
            say(f"train.fused_cross_entropy: off ({why}); using the plain loss")
    autocast = base.compute_dtype if cfg.autocast and base.compute_dtype != torch.float32 else None
    fingerprint = data_fingerprint(data.train)
    state = TrainState(world_size=rt.world_size, data_sha256=fingerprint)
    if start.checkpoint is not None:
        state = rt.load_checkpoint(start.checkpoint, model, optimizer, scheduler)
        check_data(start.checkpoint, state.data_sha256, fingerprint)
        state.data_sha256 = fingerprint
        if SCHEDULE & set(start.forced):
            reapply_schedule(optimizer, scheduler, cfg, total_steps)
        say(f"resumed from {start.checkpoint} (step {state.step} of {total_steps})")
    resumed = state.step > 0
    recipe_text = dump_recipe(recipe)
    tracker = Tracker(recipe, out_dir, resume_step=state.step if resumed else None, enabled=rt.is_main)
    if rt.is_main:
        with disk_space_guard(out_dir / "recipe.yaml", len(recipe_text)):
            write_text_atomic(out_dir / "recipe.yaml", recipe_text)
            # What the data pipeline kept, dropped and cut, for `finetune report` (the log line says the same).
            write_text_atomic(out_dir / DATA_REPORT, json.dumps(data.report.to_dict(), indent=2) + "\n")

    def save_checkpoint() -> None:
        check_weights(recipe, out_dir, state.step, model)  # a checkpoint is only ever written from finite weights
        rt.save_checkpoint(out_dir, model, optimizer, scheduler, state, cfg.save_total_limit, recipe_text)

    def evaluate() -> float | None:
        if data.eval is None:
            return None
        loss_sum, count = 0.0, 0
        model.eval()
        with torch.no_grad():
            for batch in eval_batches(data.eval, cfg.micro_batch_size, base.tokenizer.pad_token_id,
                                      recipe.data.packing, *rt.eval_split, cfg.eval_max_batches):
                batch = rt.to_device(batch)
                s, n = causal_lm_loss(model, batch, head, autocast)
                loss_sum += float(s)
                count += n
        model.train()
        loss_sum, count = rt.sum_across(loss_sum, count)
        return loss_sum / max(count, 1)

    samples_before = []
    prompts = prompts_from_examples(data.eval or [], recipe.samples.count) if recipe.samples.count else []
    if prompts and rt.shards_parameters:
        # Generating on the main rank alone would wait forever for the other ranks' parameter shards.
        say("samples: skipped (parameters are sharded across processes)")
        prompts = []
    eval_before = None
    if not resumed:
        eval_before = evaluate()
        if eval_before is not None:
            say(f"eval before training: loss {eval_before:.4f}, ppl {math.exp(min(eval_before, 50)):.2f}")
            tracker.log(0, {"eval_loss": eval_before, "eval_ppl": math.exp(min(eval_before, 50))})
        if prompts and rt.is_main:
            samples_before = generate_samples(rt.unwrap(model), base.tokenizer, prompts, recipe.samples.max_new_tokens)

    model.train()
    bar = tqdm(total=total_steps, initial=state.step, desc="train", disable=not rt.is_main, dynamic_ncols=True)
    start.closers.append(bar.close)
    write = bar.write if rt.is_main else (lambda *a, **k: None)
    batches = stream.iterate(state.epoch, state.batch_offset)
    last_loss, run_tokens, run_time = None, 0, 0.0
    window_tokens, window_time, window_loss, window_count = 0, 0.0, 0.0, 0
    rt.reset_peak_memory()
    while state.step < total_steps:
        t0 = time.perf_counter()
        micro, state.epoch, state.batch_offset = next(batches)
        local_labels = sum(count_label_tokens(b) for b in micro)
        global_labels = rt.sum_across(0.0, local_labels)[1]
        step_loss, step_tokens = 0.0, 0
        for i, batch in enumerate(micro):
            batch = rt.to_device(batch)
            with rt.no_sync(model, last=i == len(micro) - 1):
                loss_sum, _ = causal_lm_loss(model, batch, head, autocast)
                # DDP averages gradients over ranks, so scale by world size to get the global-batch mean.
                rt.backward(loss_sum * rt.world_size / max(global_labels, 1))
            step_loss += float(loss_sum.detach())
            step_tokens += batch["num_tokens"]
        step_loss, step_tokens = rt.sum_across(step_loss, step_tokens)
        last_loss = step_loss / max(global_labels, 1)
        check_loss(recipe, out_dir, state.step + 1, last_loss)  # the same on every rank: all stop together
        try:
            grad_norm = rt.step(model, optimizer, scheduler, cfg.max_grad_norm)
        except NonFiniteGradient as e:
            raise guard_stop(recipe, out_dir, state.step + 1, "the gradient norm", e.norm) from None
        state.step += 1
        dt = time.perf_counter() - t0
        state.tokens_seen += step_tokens
        run_tokens += step_tokens
        run_time += dt
        window_tokens += step_tokens
        window_time += dt
        window_loss += last_loss
        window_count += 1
        bar.update(1)
        bar.set_postfix(loss=f"{last_loss:.4f}")

        if state.step % cfg.log_every == 0 or state.step == total_steps:
            metrics = {"loss": window_loss / window_count, "lr": scheduler.get_last_lr()[0],
                       "grad_norm": grad_norm, "tokens_per_s": window_tokens / max(window_time, 1e-9),
                       "peak_mem_mb": rt.peak_memory_mb(), "epoch": state.epoch, "tokens": state.tokens_seen}
            tracker.log(state.step, metrics)
            write(f"step {state.step}/{total_steps} | " + format_metrics(metrics))
            window_tokens, window_time, window_loss, window_count = 0, 0.0, 0.0, 0
        if cfg.eval_every and state.step % cfg.eval_every == 0 and state.step != total_steps:
            ev = evaluate()
            if ev is not None:
                tracker.log(state.step, {"eval_loss": ev, "eval_ppl": math.exp(min(ev, 50))})
                write(f"step {state.step}: eval loss {ev:.4f}")
        if cfg.save_every and state.step % cfg.save_every == 0 and state.step != total_steps:
            save_checkpoint()
    bar.close()

    eval_after = evaluate()
    if eval_after is not None:
        tracker.log(state.step, {"eval_loss": eval_after, "eval_ppl": math.exp(min(eval_after, 50))})
    adapter_dir = out_dir / "adapter"
    save_checkpoint()
    adapter_state = rt.full_adapter_state(model)
    if rt.is_main:
        trainable = [p for p in rt.unwrap(model).parameters() if p.requires_grad]
        with disk_space_guard(adapter_dir, tensor_bytes(trainable) + 2**20):  # + tokenizer files
            _save_final_adapter(rt.unwrap(model), base, recipe, adapter_dir, adapter_state)
    rt.barrier()
    wall = time.perf_counter() - started
    tps = run_tokens / max(run_time, 1e-9)
    tracker.summary({"eval_loss_before": eval_before, "eval_loss_after": eval_after, "tokens_per_s": tps,
                     "wall_s": wall})
    tracker.finish()

    if eval_before is not None and eval_after is not None:
        say(f"eval loss: before {eval_before:.4f} -> after {eval_after:.4f} "
            f"(ppl {math.exp(min(eval_before, 50)):.2f} -> {math.exp(min(eval_after, 50)):.2f})")
    elif eval_after is not None:
        say(f"eval loss after training: {eval_after:.4f}")
    if samples_before and rt.is_main:
        samples_after = generate_samples(rt.unwrap(model), base.tokenizer, prompts, recipe.samples.max_new_tokens)
        for i, (b, a) in enumerate(zip(samples_before, samples_after)):
            say(f"--- sample {i + 1}: {b.prompt!r}\n  before: {b.text!r}\n  after:  {a.text!r}")
    say(f"done: {state.step} steps in {wall:.0f} s, {tps:.0f} tokens/s while training, "
        f"peak memory {rt.peak_memory_mb():.0f} MiB; adapter in {adapter_dir}")
    return TrainResult(out_dir, adapter_dir, state.step, eval_before, eval_after, last_loss, wall, tps)


def _save_final_adapter(model, base, recipe: Recipe, adapter_dir: Path, adapter_state: dict | None = None) -> None:
    """peft's format plus tokenizer and the resolved recipe, so the directory is self-describing.

    `adapter_state`: the LoRA weights gathered from sharded parameters (ZeRO-3/FSDP), else None.
    """
    with atomic_dir(adapter_dir) as tmp:
        model.save_pretrained(tmp, state_dict=adapter_state)
        base.tokenizer.save_pretrained(tmp)
        (tmp / "recipe.yaml").write_text(dump_recipe(recipe))
        # The adapter names the base it was trained on (base.json): format, settings, the converted GGUF dir.
        base.spec.save(tmp)
        if not (tmp / "adapter_config.json").exists():
            raise RuntimeError(f"{adapter_dir}: adapter save produced no adapter_config.json")
