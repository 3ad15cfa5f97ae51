"""Supervised fine-tuning: next-token cross-entropy on the labelled (answer) tokens."""

from __future__ import annotations

import torch

from finetune.data import count_label_tokens
from finetune.train.loss import causal_lm_loss
from finetune.train.objectives.base import Stats, head_and_autocast, means


class SFTObjective:
    """`causal_lm_loss` per micro-batch; through the chunked fused head where the model allows it (so
    full-vocabulary logits never exist), under autocast where the recipe asks for it."""

    metric_names: tuple[str, ...] = ()
    perplexity = True

    def __init__(self, head: torch.nn.Linear | None = None, autocast_dtype: torch.dtype | None = None):
        self.head = head
        self.autocast_dtype = autocast_dtype

    @classmethod
    def for_model(cls, model, cfg, compute_dtype: torch.dtype, sharded: bool, say) -> "SFTObjective":
        """For the unwrapped `model` as the recipe's train section (`cfg`) says; says why the fused loss is off."""
        return cls(*head_and_autocast(model, cfg, compute_dtype, sharded, say))

    def units(self, batch: dict) -> int:
        return count_label_tokens(batch)

    def loss(self, model, batch: dict) -> tuple[torch.Tensor, int, Stats]:
        loss_sum, count = causal_lm_loss(model, batch, self.head, self.autocast_dtype)
        return loss_sum, count, {}

    def summarize(self, totals: dict[str, tuple[float, float]]) -> dict[str, float]:
        return means(totals)
