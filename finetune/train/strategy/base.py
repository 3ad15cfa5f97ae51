"""The distributed engine of a run: one object with the same methods for every engine, chosen once (factory.py).

The phases talk to this surface instead of to accelerate, so they read the same for one CPU process, one
GPU, DDP, DeepSpeed ZeRO 0-3 or FSDP2 ranks. `Strategy` holds what every engine shares (the process's place
in the run, collectives, seeding, the checkpoint's all-or-nothing write) with accelerate's wrapped model as
the default; each engine's module overrides only what differs for it:

- single.py: one process, nothing wrapped (the peft model keeps its own type for save/load).
- ddp.py: DDP and accelerate's MULTI_CPU/gloo: replicated model, gradients averaged by an all-reduce.
- deepspeed.py: the engine owns accumulation boundaries, clipping, the optimizer step and the (sharded)
  optimizer state; our LR scheduler stays outside it and steps the same param groups.
- fsdp.py: FSDP2 shards the parameters themselves: every forward is a collective, the adapter and the
  optimizer state are gathered before they are saved.
"""

from __future__ import annotations

import contextlib
import random
import resource
import sys
from pathlib import Path

import numpy as np
import torch

from finetune.train import checkpoint as ckpt
from finetune.train.diskspace import disk_space_guard, tensor_bytes
from finetune.train.guard import finite_norm
from quant.errors import UserError
from quant.formats.base import BaseSpec, ShardingSetup
from quant.formats.registry import sharding_problem


class Strategy:
    """An engine driven through accelerate (the defaults here are accelerate's wrapped model)."""

    kind: str  # accelerate's name of the engine (each engine sets it): messages, and what the registry is asked
    distributed = True  # False: one process with nothing wrapped (no "distributed:" line)
    shards_parameters = False  # ZeRO-3/FSDP: each rank holds a slice of every parameter

    def __init__(self, accelerator):
        self.accelerator = accelerator
        self.device: torch.device = accelerator.device
        self.rank: int = accelerator.process_index
        self.world_size: int = accelerator.num_processes

    # ---- the run's set-up

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def eval_split(self) -> tuple[int, int]:
        """(rank, world size) to split eval batches by. With sharded parameters every forward is a collective,
        so all ranks must run the same forwards: each runs every batch (the loss ratio is unchanged)."""
        return (0, 1) if self.shards_parameters else (self.rank, self.world_size)

    @property
    def title(self) -> str:
        return self.kind

    def describe(self) -> str:
        return f"{self.title}, {self.world_size} process{'es' if self.world_size > 1 else ''} on {self.device.type}"

    def sharding_setup(self) -> ShardingSetup:
        return ShardingSetup(self.kind, mixed_precision=self.accelerator.mixed_precision)

    def check_base(self, spec: BaseSpec) -> None:
        """Refuse, before any weight loads, a base this engine cannot train (its format says why)."""
        problem = sharding_problem(spec, self.sharding_setup())
        if problem:
            raise UserError(problem)

    def main_process_first(self):
        return self.accelerator.main_process_first() if self.world_size > 1 else contextlib.nullcontext()

    def seed_everything(self, seed: int) -> None:
        # Same seed on every rank: LoRA init must match across ranks; data order is sharded, not reseeded.
        random.seed(seed)
        np.random.seed(seed)
        torch.manual_seed(seed)
        if torch.cuda.is_available():
            torch.cuda.manual_seed_all(seed)

    def prepare(self, model, optimizer, cfg):
        """Wrap for the engine; `cfg` (TrainConfig) is for engines that take batch/clipping settings.

        The LR scheduler is not prepared: it steps our own optimizer's param groups, which DeepSpeed's ZeRO
        optimizer and accelerate's wrapper both use, so it behaves the same under every engine."""
        return self.accelerator.prepare(model, optimizer)

    def unwrap(self, model):
        return self.accelerator.unwrap_model(model)

    def to_device(self, batch: dict) -> dict:
        """The batch's tensors on this process's device (nested batches too: KTO's `kl`)."""
        return {k: v.to(self.device, non_blocking=True) if torch.is_tensor(v) else
                self.to_device(v) if isinstance(v, dict) else v for k, v in batch.items()}

    # ---- one optimizer step

    def no_sync(self, model, last: bool):
        """Around one micro-batch: skip the gradient reduction on all but the last one of a step, where the
        engine can (FSDP2 reduce-scatters every micro-batch: LoRA gradients are small, and skipping would
        need unsharded gradient buffers per rank)."""
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        self.accelerator.backward(loss)

    def step(self, model, optimizer, scheduler, max_grad_norm: float) -> float:
        """Clip, step the optimizer and the LR schedule, zero the gradients; return the pre-clip grad norm."""
        norm = self._apply(model, optimizer, max_grad_norm)
        scheduler.step()
        return norm if norm is not None else float("nan")

    def _apply(self, model, optimizer, max_grad_norm: float) -> float | None:
        # Checked before stepping: a NaN/inf gradient would be written into every LoRA weight.
        params = [p for p in model.parameters() if p.requires_grad and p.grad is not None]
        limit = max_grad_norm if max_grad_norm > 0 else float("inf")
        norm = finite_norm(self._clip(params, limit) if params else 0.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return norm

    def _clip(self, params: list, limit: float):
        return self.accelerator.clip_grad_norm_(params, limit)

    # ---- state: adapter, checkpoints

    def full_adapter_state(self, model) -> dict | None:
        """Full LoRA tensors (CPU) where parameters are sharded, else None (the model's own tensors are
        whole). A collective where sharded: every rank must call it."""
        return None

    def full_optimizer_state(self, model, optimizer) -> dict | None:
        """The whole optimizer state for the main process to write, or None where each rank writes its part."""
        return optimizer.state_dict()

    def save_checkpoint(self, out_dir: Path, model, optimizer, scheduler, state, keep: int,
                        recipe_text: str | None = None) -> None:
        """Write `checkpoint-<step>` all or nothing; every rank calls this (ranks write their own shards).

        A checkpoint that already exists under that name (the one this run resumed from) is complete and is
        never written again."""
        final = Path(out_dir) / f"checkpoint-{state.step}"
        if self.from_main(int(final.is_dir())):
            if self.is_main:
                ckpt.prune_checkpoints(Path(out_dir), keep)
            self.barrier()
            return
        adapter = self.full_adapter_state(model)
        optimizer_state = self.full_optimizer_state(model, optimizer)
        trainable = [p for p in self.unwrap(model).parameters() if p.requires_grad]
        needed = 3 * tensor_bytes(trainable) + 2**16  # adapter + two Adam moments + small files
        with disk_space_guard(final, needed):
            seal = lambda tmp: ckpt.write_manifest(tmp, state.step)  # noqa: E731
            with ckpt.shared_atomic_dir(final, self.is_main, self.barrier, seal=seal) as tmp:
                ckpt.write_rng(tmp, self.rank, self.world_size)
                self._save_rank_state(tmp)
                if self.is_main:
                    ckpt.write_state_files(tmp, self.unwrap(model), optimizer_state, scheduler, state, adapter,
                                           recipe_text)
            if self.is_main:
                ckpt.prune_checkpoints(Path(out_dir), keep)
        self.barrier()

    def _save_rank_state(self, tmp: Path) -> None:
        """This rank's own part of a checkpoint, beside the main process's files (engines that shard state)."""

    def load_checkpoint(self, path: Path, model, optimizer, scheduler) -> ckpt.TrainState:
        """Restore everything `save_checkpoint` wrote into this rank; refuses a different world size."""
        ckpt.check_world_size(path, self.world_size)
        return self._load(Path(path), model, optimizer, scheduler)

    def _load(self, path: Path, model, optimizer, scheduler) -> ckpt.TrainState:
        return ckpt.load_checkpoint(path, self.unwrap(model), optimizer, scheduler, self.rank)

    # ---- collectives and measurements

    def sum_across(self, value: float, count: int) -> tuple[float, int]:
        """Sum a (float, int) pair over ranks; exact for the int."""
        if self.world_size == 1:
            return value, count
        t = torch.tensor([float(value), float(count)], dtype=torch.float64, device=self.device)
        t = self.accelerator.reduce(t, reduction="sum")
        return float(t[0]), int(round(float(t[1])))

    def sum_floats(self, values: list[float]) -> list[float]:
        """Sum each of `values` over ranks, in one collective (float64)."""
        if self.world_size == 1 or not values:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        return self.accelerator.reduce(t, reduction="sum").tolist()

    def mean_across(self, value: torch.Tensor) -> torch.Tensor:
        """A tensor's mean over ranks (a collective: every rank must call it with the same shape)."""
        if self.world_size == 1:
            return value
        return self.accelerator.reduce(value.detach().clone(), reduction="mean")

    def from_main(self, value: int) -> int:
        """The main process's `value` on every rank (a collective: every rank must call it)."""
        return self.sum_across(0.0, value if self.is_main else 0)[1]

    def barrier(self) -> None:
        if self.world_size > 1:
            self.accelerator.wait_for_everyone()

    def reset_peak_memory(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)

    def peak_memory_mb(self) -> float:
        """Peak GPU memory allocated by torch on CUDA; peak resident set size of the process on CPU."""
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) / 2**20
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return rss / 2**20 if sys.platform == "darwin" else rss / 1024
