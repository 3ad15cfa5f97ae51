"""Preference training's per-micro-batch loss: `PreferenceObjective(config, head).loss(model, batch)`.

    objective = PreferenceObjective(PreferenceConfig(objective="dpo").validate(), fusable_head(model, False)[0])
    loss_sum, pairs, stats = objective.loss(model, batch)   # batch: finetune/data/preference_collate.py
    (loss_sum / pairs).backward()

The same call shape as the SFT objective, (loss sum, count, stats), so the training loop, evaluation and
accumulation treat every objective alike; stats are (sum, count) pairs (preference_losses.metric_means).

One step of DPO: the reference pass (adapter off, no graph) over the micro-batch's 2B sequences, then the policy
pass (adapter on) over the same batch; chosen and rejected always share one forward. Running the reference first
means its activations are gone before the policy's graph is built. ORPO needs no reference. KTO adds its
mismatched pairs (`batch["kl"]`), whose policy log-probs only estimate the KL reference point and carry no
gradient (TRL computes them under no_grad too). A batch that carries `reference_logps` (the recipe's
`reference: precomputed`, a pass before training) skips the reference forward.

A sampling objective (GRPO) fits the same call and the same pieces: its batch holds prompts; loss() generates
completions with the adapter on (no graph), scores them with the reward functions, collates prompt + completion
with preference_collate.collate_sequences, and takes `sequence_log_probs` of the policy and, with the adapter off,
of the reference, as here.
"""

from __future__ import annotations

import torch

from finetune.train.logprobs import reference_log_probs, sequence_log_probs
from finetune.train.preference_config import PreferenceConfig
from finetune.train.preference_losses import Stats, dpo_loss, kto_loss, orpo_loss

REFERENCE_KEY = "reference_logps"  # [S] fp32 per-sequence sums, for a batch whose reference was precomputed


class PreferenceObjective:
    def __init__(self, config: PreferenceConfig, head: torch.nn.Linear | None,
                 autocast_dtype: torch.dtype | None = None):
        self.config = config.validate()
        self.head = head  # loss.fusable_head's answer: the LM head computed in chunks, or None for plain logits
        self.autocast_dtype = autocast_dtype

    def loss(self, model, batch: dict) -> tuple[torch.Tensor, int, Stats]:
        if self.config.objective == "kto":
            return self._kto(model, batch)
        pairs = batch["pairs"]
        reference = self.reference(model, batch) if self.config.needs_reference else None
        chosen, rejected = self.log_probs(model, batch).split(pairs, pairs)
        if self.config.objective == "orpo":
            return orpo_loss(chosen, rejected, self.config.orpo_lambda)
        ref_chosen, ref_rejected = reference.split(pairs)
        return dpo_loss(chosen.sums, rejected.sums, ref_chosen, ref_rejected, self.config.beta,
                        self.config.label_smoothing)

    def _kto(self, model, batch: dict) -> tuple[torch.Tensor, int, Stats]:
        reference, kl_reference = self.reference(model, batch), self.reference(model, batch["kl"])
        with torch.no_grad():
            kl_policy = self.log_probs(model, batch["kl"]).sums
        policy = self.log_probs(model, batch).sums
        c = self.config
        return kto_loss(policy, reference, batch["desirable"], kl_policy, kl_reference, c.beta, c.desirable_weight,
                        c.undesirable_weight)

    def log_probs(self, model, batch: dict):
        return sequence_log_probs(model, batch, self.head, self.autocast_dtype)

    def reference(self, model, batch: dict) -> torch.Tensor:
        """[S] per-sequence answer log-prob sums of the reference: precomputed in the batch, else the base alone."""
        if REFERENCE_KEY in batch:
            return batch[REFERENCE_KEY]
        return reference_log_probs(model, batch, self.head, self.autocast_dtype).sums
