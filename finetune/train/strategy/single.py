"""One process, CPU or GPU: nothing is wrapped, so the peft model keeps its own type for save and load."""

from __future__ import annotations

import torch

from finetune.train.strategy.base import Strategy


class Single(Strategy):
    kind = "NO"
    distributed = False

    def prepare(self, model, optimizer, cfg):
        return model, optimizer

    def unwrap(self, model):
        return model

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def _clip(self, params: list, limit: float):
        return torch.nn.utils.clip_grad_norm_(params, limit)
