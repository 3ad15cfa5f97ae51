"""The set-up phase of a run: base + LoRA + fast path, data and batch stream, optimizer and schedule, the
engine's wrapping, the objective (SFT, or the recipe's preference objective with its data and, for
`reference: precomputed`, the reference pass), resume state, tracker and run files; all of it held in one `Run`.

The order is the order of the random draws: seeded first, LoRA initialised, then a checkpoint (if any)
restores the generators, so a resumed run continues exactly where the interrupted one left off.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from finetune.data import DataBundle, build_datasets
from finetune.data.preference_data import PreferenceBundle, build_preference_data
from finetune.kernels import install_fast_path
from finetune.model import LoadedBase, attach_lora, count_parameters, load_base, memory_report
from finetune.recipe import Recipe, dump_recipe
from finetune.train.batches import BatchStream
from finetune.train.checkpoint import TrainState, write_text_atomic
from finetune.train.diskspace import disk_space_guard
from finetune.train.guard import check_weights
from finetune.train.objectives.base import Objective
from finetune.train.objectives.preference import PreferenceObjective
from finetune.train.objectives.sft import SFTObjective
from finetune.train.optim import build_optimizer, build_scheduler
from finetune.train.reference_pass import precompute_reference
from finetune.train.resume import SCHEDULE, check_data, data_fingerprint, reapply_schedule
from finetune.train.rundir import RunStart
from finetune.train.strategy.base import Strategy
from finetune.train.tracking import Tracker
from quant.errors import UserError
from quant.formats.base import BaseSpec

DATA_REPORT = "data_report.json"  # in output.dir: DataReport.to_dict() of the run's data


@dataclass
class Run:
    """What the phases share. Set up once; afterwards only `state` (the training position) changes."""

    recipe: Recipe
    rt: Strategy
    out_dir: Path
    say: Callable  # the main process's console (a no-op on the other ranks)
    started: float  # perf_counter() when set-up began: the run's wall time
    base: LoadedBase
    data: DataBundle | PreferenceBundle
    stream: BatchStream
    total_steps: int
    model: torch.nn.Module  # as wrapped by the engine (rt.unwrap gives the peft model)
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    objective: Objective
    state: TrainState
    resumed: bool  # continued from a checkpoint past step 0
    tracker: Tracker
    recipe_text: str  # the resolved recipe, stored with every checkpoint for --resume to compare
    closers: list  # run when the run ends, also on an error (the progress bar)

    def save_checkpoint(self) -> None:
        # A checkpoint is only ever written from finite weights.
        check_weights(self.recipe, self.out_dir, self.state.step, self.model)
        self.rt.save_checkpoint(self.out_dir, self.model, self.optimizer, self.scheduler, self.state,
                                self.recipe.train.save_total_limit, self.recipe_text)


def setup(recipe: Recipe, rt: Strategy, start: RunStart, spec: BaseSpec, say) -> Run:
    """Everything the step loop needs, in the order of the random draws (see the module's docstring)."""
    started = time.perf_counter()
    cfg = recipe.train
    rt.seed_everything(cfg.seed)
    base, model = _model(recipe, rt, spec, say)
    data, stream, total_steps = _data(recipe, rt, base, say)
    optimizer = build_optimizer(model.parameters(), cfg, rt.device)
    scheduler = build_scheduler(optimizer, cfg, total_steps)
    model, optimizer = rt.prepare(model, optimizer, cfg)
    if rt.distributed:
        say(f"distributed: {rt.describe()}")
    objective = _objective(recipe, rt, model, base, say)
    if recipe.preference is not None and recipe.preference.reference == "precomputed":
        precompute_reference(model, objective, data, cfg.micro_batch_size, rt, say)
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
    tracker = Tracker(recipe, start.out_dir, resume_step=state.step if resumed else None, enabled=rt.is_main)
    run = Run(recipe, rt, start.out_dir, say, started, base, data, stream, total_steps, model, optimizer,
              scheduler, objective, state, resumed, tracker, dump_recipe(recipe), start.closers)
    _write_run_files(run)
    return run


def _model(recipe: Recipe, rt: Strategy, spec: BaseSpec, say) -> tuple[LoadedBase, torch.nn.Module]:
    """The frozen base on this process's device, LoRA attached, the fast path's kernels installed."""
    cfg = recipe.train
    base = load_base(spec, rt.device, recipe.base.attn_implementation)
    _, total = count_parameters(base.model)
    model = attach_lora(base.model, recipe.lora, cfg.gradient_checkpointing)
    fast = install_fast_path(model, cfg, distributed=rt.world_size > 1, sharded=rt.shards_parameters)
    say(f"fast path: {fast.summary()}")
    trainable, _ = count_parameters(model)
    mem = memory_report(model)
    say(f"base: {recipe.base.model} as {base.quantization} ({total / 1e6:.1f}M params, compute {base.compute_dtype}); "
        f"model memory {mem['total_mb']:.0f} MiB (quantized {mem['quantized_mb']:.0f}, other frozen "
        f"{mem['frozen_mb']:.0f}, LoRA {mem['trainable_mb']:.1f}); trainable {trainable / 1e6:.2f}M")
    return base, model


def _data(recipe: Recipe, rt: Strategy, base: LoadedBase, say) -> tuple[DataBundle, BatchStream, int]:
    """The tokenized data (SFT's, or pairs / KTO examples), this rank's stream of step batches, and the run's
    number of optimizer steps."""
    cfg, preference = recipe.train, recipe.preference
    if preference is None:
        data, what = build_datasets(recipe.data, base.tokenizer, cfg.seed), "sequences"
    else:
        data = build_preference_data(recipe.data, base.tokenizer, cfg.seed, preference.paired)
        what = "pairs" if preference.paired else "examples"
    say("data: " + data.report.summary())
    stream = BatchStream(data.train, cfg.micro_batch_size, cfg.gradient_accumulation, cfg.seed, data.collate,
                         rt.rank, rt.world_size)
    total_steps = cfg.max_steps or math.ceil(cfg.epochs * stream.steps_per_epoch)
    if total_steps < 1 or stream.steps_per_epoch < 1:
        raise UserError(f"data.train: {len(data.train)} {what} make no full step of "
                        f"{stream.global_micro_batches} micro-batches of {cfg.micro_batch_size}; lower "
                        "train.micro_batch_size or train.gradient_accumulation")
    return data, stream, total_steps


def _objective(recipe: Recipe, rt: Strategy, model, base: LoadedBase, say) -> Objective:
    """What the run minimises: SFT, or the recipe's preference section (DPO, ORPO, KTO)."""
    args = (rt.unwrap(model), recipe.train, base.compute_dtype, rt.shards_parameters, say)
    if recipe.preference is None:
        return SFTObjective.for_model(*args)
    say(f"objective: {recipe.preference.describe()}")
    return PreferenceObjective.for_model(recipe.preference, *args, mean_across=rt.mean_across)


def _write_run_files(run: Run) -> None:
    """recipe.yaml, and what the data pipeline kept, dropped and cut (for `finetune report`; the log line says
    the same)."""
    if not run.rt.is_main:
        return
    with disk_space_guard(run.out_dir / "recipe.yaml", len(run.recipe_text)):
        write_text_atomic(run.out_dir / "recipe.yaml", run.recipe_text)
        write_text_atomic(run.out_dir / DATA_REPORT, json.dumps(run.data.report.to_dict(), indent=2) + "\n")
