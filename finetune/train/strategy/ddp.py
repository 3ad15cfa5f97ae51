"""Data parallelism (accelerate's MULTI_GPU, and MULTI_CPU over gloo): a replicated model whose LoRA gradients
are averaged by an all-reduce once per optimizer step."""

from __future__ import annotations

import contextlib

import torch

from finetune.train.strategy.base import Strategy


class DDP(Strategy):
    def __init__(self, accelerator, kind: str = "MULTI_GPU"):
        super().__init__(accelerator)
        self.kind = kind  # MULTI_GPU, MULTI_CPU, ...: the same engine over another backend

    def prepare(self, model, optimizer, cfg):
        # Frozen weights are identical on every rank (same file, deterministic quantization): skip DDP's
        # start-up broadcast of the whole base; only the trainable LoRA weights are synced and reduced.
        frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
        frozen += [n for n, _ in model.named_buffers()]
        torch.nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, frozen)
        return super().prepare(model, optimizer, cfg)

    def no_sync(self, model, last: bool):
        if self.world_size == 1 or last:
            return contextlib.nullcontext()
        return self.accelerator.no_sync(model)
