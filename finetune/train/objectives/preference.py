"""Preference training's per-micro-batch loss: DPO, ORPO and KTO on per-sequence log-probs.

    objective = PreferenceObjective(PreferenceConfig(objective="dpo").validate(), fusable_head(model, False)[0])
    loss_sum, pairs, stats = objective.loss(model, batch)   # batch: finetune/data/preference_collate.py
    (loss_sum / pairs).backward()

The SFT objective's surface (objectives/base.py): the run accumulates the loss over micro-batches and ranks and
normalises it by the global batch's pairs (KTO: examples), and reduces every stat (sum, count) the same way.

One step of DPO: the reference pass (adapter off, no graph) over the micro-batch's 2B sequences, then the policy
pass (adapter on) over the same batch; chosen and rejected always share one forward. Running the reference first
means its activations are gone before the policy's graph is built. ORPO needs no reference. KTO adds its
mismatched pairs (`batch["kl"]`), whose policy log-probs only estimate the KL reference point and carry no
gradient (TRL computes them under no_grad too); in training the estimate is averaged over every rank's
micro-batch before it is clamped (TRL gathers it across processes the same way); in evaluation, whose batches
are split unevenly over ranks, each micro-batch uses its own. A batch that carries `reference_logps` (the
recipe's `reference: precomputed`, reference_pass.py) skips the reference forward.

A sampling objective (GRPO) fits the same call and the same pieces: its batch holds prompts; loss() generates
completions with the adapter on (no graph), scores them with the reward functions, collates prompt + completion
with preference_collate.collate_sequences, and takes `sequence_log_probs` of the policy and, with the adapter off,
of the reference, as here (docs/preference.md).
"""

from __future__ import annotations

from typing import Callable

import torch

from finetune.data.preference_collate import REFERENCE_KEY
from finetune.recipe_preference import PreferenceConfig
from finetune.train.logprobs import reference_log_probs, sequence_log_probs
from finetune.train.objectives.base import head_and_autocast
from finetune.train.objectives.preference_losses import Stats, dpo_loss, kto_loss, metric_means, orpo_loss

__all__ = ["PreferenceObjective", "REFERENCE_KEY"]

_REWARDS = ("rewards/chosen", "rewards/rejected", "rewards/accuracy", "logps/chosen", "logps/rejected")
METRICS = {"dpo": _REWARDS, "orpo": _REWARDS + ("nll", "log_odds_ratio", "log_odds_chosen"),
           "kto": _REWARDS + ("kl",)}


class PreferenceObjective:
    perplexity = False  # exp(a preference loss) is no perplexity

    def __init__(self, config: PreferenceConfig, head: torch.nn.Linear | None,
                 autocast_dtype: torch.dtype | None = None, mean_across: Callable | None = None):
        self.config = config.validate()
        self.head = head  # loss.fusable_head's answer: the LM head computed in chunks, or None for plain logits
        self.autocast_dtype = autocast_dtype
        self.mean_across = mean_across  # a tensor's mean over the run's ranks (KTO's KL in training)
        self.metric_names = METRICS[self.config.objective]

    @classmethod
    def for_model(cls, config: PreferenceConfig, model, cfg, compute_dtype: torch.dtype, sharded: bool, say,
                  mean_across: Callable | None = None) -> "PreferenceObjective":
        """For the unwrapped `model` as the recipe's train section (`cfg`) says (head and autocast as SFT's)."""
        return cls(config, *head_and_autocast(model, cfg, compute_dtype, sharded, say), mean_across)

    def units(self, batch: dict) -> int:
        return batch["pairs"] if "pairs" in batch else len(batch["desirable"])

    def loss(self, model, batch: dict) -> tuple[torch.Tensor, int, Stats]:
        if self.config.objective == "kto":
            return self._kto(model, batch)
        pairs = batch["pairs"]
        reference = self.reference(model, batch) if self.config.needs_reference else None
        chosen, rejected = self.log_probs(model, batch).split(pairs, pairs)
        if self.config.objective == "orpo":
            loss_sum, count, stats = orpo_loss(chosen, rejected, self.config.orpo_lambda)
        else:
            ref_chosen, ref_rejected = reference.split(pairs)
            loss_sum, count, stats = dpo_loss(chosen.sums, rejected.sums, ref_chosen, ref_rejected,
                                              self.config.beta, self.config.label_smoothing)
        stats.update({"logps/chosen": (chosen.sums.detach().sum(), pairs),
                      "logps/rejected": (rejected.sums.detach().sum(), pairs)})
        return loss_sum, count, stats

    def _kto(self, model, batch: dict) -> tuple[torch.Tensor, int, Stats]:
        reference, kl_reference = self.reference(model, batch), self.reference(model, batch["kl"])
        with torch.no_grad():
            kl_policy = self.log_probs(model, batch["kl"]).sums
        policy = self.log_probs(model, batch).sums
        c, desirable = self.config, batch["desirable"]
        across = self.mean_across if model.training else None
        loss_sum, count, stats = kto_loss(policy, reference, desirable, kl_policy, kl_reference, c.beta,
                                          c.desirable_weight, c.undesirable_weight, across)
        logps = policy.detach()
        stats.update({"logps/chosen": ((logps * desirable).sum(), desirable.sum()),
                      "logps/rejected": ((logps * ~desirable).sum(), (~desirable).sum())})
        return loss_sum, count, stats

    def log_probs(self, model, batch: dict):
        return sequence_log_probs(model, batch, self.head, self.autocast_dtype)

    def reference(self, model, batch: dict) -> torch.Tensor:
        """[S] per-sequence answer log-prob sums of the reference: precomputed in the batch, else the base alone."""
        if REFERENCE_KEY in batch:
            return batch[REFERENCE_KEY]
        return reference_log_probs(model, batch, self.head, self.autocast_dtype).sums

    def summarize(self, totals: dict[str, tuple[float, float]]) -> dict[str, float]:
        return metric_means(totals)
