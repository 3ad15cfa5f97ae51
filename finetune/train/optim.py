"""Optimizers and learning-rate schedules named by the recipe."""

from __future__ import annotations

import math

import torch

from finetune.recipe import TrainConfig


def build_optimizer(params, cfg: TrainConfig, device: torch.device) -> torch.optim.Optimizer:
    params = [p for p in params if p.requires_grad]
    kwargs = {"lr": cfg.learning_rate, "weight_decay": cfg.weight_decay, "betas": (0.9, 0.999), "eps": 1e-8}
    if cfg.optimizer == "adamw":
        # The fused kernel is one launch for all LoRA tensors instead of several per tensor.
        return torch.optim.AdamW(params, fused=device.type == "cuda", **kwargs)
    # Imported here, not at the top: `finetune report` imports this module (resume.py's lr_lambda) and would
    # pay for bitsandbytes (`python -X importtime`: 25-31 s after torch, on 2 busy CPU cores) without using it.
    import bitsandbytes as bnb

    cls = {
        "adamw_8bit": bnb.optim.AdamW8bit,
        "paged_adamw_8bit": bnb.optim.PagedAdamW8bit,
        "paged_adamw_32bit": bnb.optim.PagedAdamW32bit,
    }[cfg.optimizer]
    return cls(params, **kwargs)


def lr_lambda(cfg: TrainConfig, total_steps: int):
    """Multiplier of the peak learning rate after `step` optimizer steps: linear warm-up, then decay to 0."""
    warmup = cfg.warmup_steps

    def fn(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        if cfg.lr_scheduler == "constant":
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
        if cfg.lr_scheduler == "linear":
            return 1.0 - progress
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return fn


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig, total_steps: int):
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg, total_steps))
