"""What a training objective is to the run: the loss of one micro-batch, and nothing else.

The run around it (accumulation over micro-batches and ranks, clipping, the optimizer step, logging,
evaluation, checkpoints and resume) is the same for every objective, so a new objective (DPO, ORPO, KTO) is one
module with one class of these two methods; the collate that makes its batches lives in finetune/data.

- `units(batch)`: what the loss of `batch` is a sum over (label tokens for SFT; pairs for DPO), counted before
  the forward: a step's loss is normalised by the units of the whole global batch (every micro-batch, every
  rank), so any world size and accumulation split of the same global batch gives the same update.
- `loss(model, batch) -> (loss_sum, units, metrics)`: the summed loss as a tensor in the autograd graph, the
  units it sums over, and extra metrics as {name: detached per-batch sum}. The run sums each metric over a
  step's micro-batches and ranks and divides it by the step's units, exactly as the loss; it logs them as
  `name` per step and `eval_name` per evaluation (DPO's `rewards/chosen`, `rewards/margin`, ...).
  `model` is the run's model (wrapped by the distributed engine); switching the adapter off for a reference
  pass (`unwrap(model).disable_adapter()`) is the objective's own business.

A sampling objective (GRPO) fits the same surface with one more step: its batches hold prompts, and it would
add `rollout(model, micro_batches) -> micro_batches` (generate with the adapter on, score with its reward
functions, no gradient), called by the fit phase once per step before `units`; everything after is unchanged.
"""

from __future__ import annotations

from typing import Protocol

import torch


class Objective(Protocol):
    def units(self, batch: dict) -> int: ...

    def loss(self, model, batch: dict) -> tuple[torch.Tensor, int, dict[str, torch.Tensor]]: ...
