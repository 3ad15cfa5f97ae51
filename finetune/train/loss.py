"""The causal-LM loss as a (sum, count) pair, so accumulation and ranks can normalise by real token counts."""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE = -100


def token_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Sum of next-token cross-entropy over positions whose target label is not IGNORE, and their count.

    Labels are aligned with input_ids (HF convention); position t predicts labels[t + 1].
    """
    shift_logits = logits[:, :-1, :].float()
    shift_labels = labels[:, 1:]
    loss = F.cross_entropy(
        shift_logits.reshape(-1, shift_logits.size(-1)), shift_labels.reshape(-1), ignore_index=IGNORE, reduction="sum"
    )
    return loss, int((shift_labels != IGNORE).sum())


def model_inputs(batch: dict) -> dict:
    """The keys of a collated batch that the model takes (labels stay out: we compute the loss ourselves).

    use_cache=False matters beyond memory: transformers detects packed rows from position ids only without a
    cache; with one it would attend across the examples of a packed row.
    """
    return {**{k: batch[k] for k in ("input_ids", "attention_mask", "position_ids") if k in batch}, "use_cache": False}
