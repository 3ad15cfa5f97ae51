"""The process's place in a (possibly multi-process) run, through accelerate.

The loop talks to this small surface instead of to accelerate directly, so the loop reads the same for
one CPU process, one GPU, or DDP/DeepSpeed/FSDP ranks.
"""

from __future__ import annotations

import contextlib
import random
import resource
import sys
from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class Runtime:
    accelerator: object
    device: torch.device
    rank: int
    world_size: int

    @classmethod
    def create(cls) -> "Runtime":
        from accelerate import Accelerator

        acc = Accelerator(cpu=not torch.cuda.is_available())
        return cls(acc, acc.device, acc.process_index, acc.num_processes)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def seed_everything(self, seed: int) -> None:
        # Same seed on every rank: LoRA init must match across ranks; data order is sharded, not reseeded.
        random.seed(seed)
        np.random.seed(seed)
        torch.manual_seed(seed)
        if torch.cuda.is_available():
            torch.cuda.manual_seed_all(seed)

    def prepare(self, model, optimizer):
        if self.world_size == 1:
            return model, optimizer  # nothing to wrap; keeps the peft model's own type for save/load
        return self.accelerator.prepare(model, optimizer)

    def unwrap(self, model):
        return self.accelerator.unwrap_model(model) if self.world_size > 1 else model

    def to_device(self, batch: dict) -> dict:
        return {k: v.to(self.device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}

    def no_sync(self, model, last: bool):
        """Skip the gradient all-reduce on all but the last micro-batch of a step."""
        if self.world_size == 1 or last:
            return contextlib.nullcontext()
        return self.accelerator.no_sync(model)

    def backward(self, loss: torch.Tensor) -> None:
        if self.world_size == 1:
            loss.backward()
        else:
            self.accelerator.backward(loss)

    def clip_grad_norm(self, model, max_norm: float) -> float:
        params = [p for p in model.parameters() if p.requires_grad and p.grad is not None]
        if not params:
            return 0.0
        if self.world_size > 1:
            norm = self.accelerator.clip_grad_norm_(params, max_norm if max_norm > 0 else float("inf"))
        else:
            norm = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm > 0 else float("inf"))
        return float(norm)

    def sum_across(self, value: float, count: int) -> tuple[float, int]:
        """Sum a (float, int) pair over ranks; exact for the int."""
        if self.world_size == 1:
            return value, count
        t = torch.tensor([float(value), float(count)], dtype=torch.float64, device=self.device)
        t = self.accelerator.reduce(t, reduction="sum")
        return float(t[0]), int(round(float(t[1])))

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
