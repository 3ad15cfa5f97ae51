"""What a training objective is to the run: the loss of one micro-batch, and nothing else.

The run around it (accumulation over micro-batches and ranks, clipping, the optimizer step, logging,
evaluation, checkpoints and resume) is the same for every objective, so an objective is one module with one
class (sft.py; preference.py: DPO, ORPO, KTO); the collate that makes its batches lives in finetune/data.

- `units(batch)`: what the loss of `batch` is a sum over (label tokens for SFT; pairs for DPO), counted before
  the forward: a step's loss is normalised by the units of the whole global batch (every micro-batch, every
  rank), so any world size and accumulation split of the same global batch gives the same update.
- `loss(model, batch) -> (loss_sum, units, stats)`: the summed loss as a tensor in the autograd graph, the
  units it sums over, and its statistics as {name: (sum, count)}, detached. The run sums both parts of every
  stat over a step's micro-batches and ranks (`add_stats`, `reduce_stats`: one collective for all of them) and
  hands the totals to `summarize(totals) -> {name: value}` (usually sum / count; DPO adds rewards/margin); it
  logs the values as `name` per step and `eval_name` per evaluation (DPO's `rewards/chosen`, ...).
  `model` is the run's model (wrapped by the distributed engine); switching the adapter off for a reference
  pass (`unwrap(model).disable_adapter()`) is the objective's own business.
- `metric_names`: the stats every batch reports, in a fixed order (every rank reduces the same vector, also a
  rank that had no eval batch); `perplexity`: whether exp(eval loss) means something (SFT) or not.

A sampling objective (GRPO) fits the same surface with one more step: its batches hold prompts, and it would
add `rollout(model, micro_batches) -> micro_batches` (generate with the adapter on, score with its reward
functions, no gradient), called by the fit phase once per step before `units`; everything after is unchanged.
"""

from __future__ import annotations

from typing import Callable, Protocol

import torch

from finetune.train.loss import fusable_head

Stats = dict[str, tuple]  # name -> (sum, count), tensors or numbers


class Objective(Protocol):
    metric_names: tuple[str, ...]
    perplexity: bool

    def units(self, batch: dict) -> int: ...

    def loss(self, model, batch: dict) -> tuple[torch.Tensor, int, Stats]: ...

    def summarize(self, totals: dict[str, tuple[float, float]]) -> dict[str, float]: ...


def head_and_autocast(model, cfg, compute_dtype: torch.dtype, sharded: bool,
                      say) -> tuple[torch.nn.Linear | None, torch.dtype | None]:
    """The chunked LM head where the recipe's train section (`cfg`) and the unwrapped `model` allow it (says why
    not), and the autocast dtype the recipe asks for."""
    head = None
    if cfg.fused_cross_entropy:
        head, why = fusable_head(model, sharded)
        if head is None:
            say(f"train.fused_cross_entropy: off ({why}); using the plain loss")
    autocast = compute_dtype if cfg.autocast and compute_dtype != torch.float32 else None
    return head, autocast


def add_stats(totals: dict[str, list], stats: Stats) -> None:
    """Add one micro-batch's stats to the running totals (tensors stay on the device, summed in float64 as the
    loss is on the host: a logged stat that restates the loss equals it to the last digit)."""
    for name, (value, count) in stats.items():
        value = value.double() if torch.is_tensor(value) else float(value)
        if name in totals:
            totals[name][0] = totals[name][0] + value
            totals[name][1] = totals[name][1] + count
        else:
            totals[name] = [value, count]


def reduce_stats(totals: dict[str, list], names: tuple[str, ...],
                 sum_across: Callable[[list[float]], list[float]]) -> dict[str, tuple[float, float]]:
    """The totals of `names` summed over ranks: one host transfer and one collective for all of them."""
    if not names:
        return {}
    flat = [part for name in names for part in totals.get(name, (0.0, 0.0))]
    device = next((v.device for v in flat if torch.is_tensor(v)), torch.device("cpu"))
    values = sum_across(torch.stack([torch.as_tensor(v, dtype=torch.float64, device=device) for v in flat]).tolist())
    return {name: (values[2 * i], values[2 * i + 1]) for i, name in enumerate(names)}


def means(totals: dict[str, tuple[float, float]]) -> dict[str, float]:
    """sum / count of every stat with a count."""
    return {name: total / count for name, (total, count) in totals.items() if count > 0}
