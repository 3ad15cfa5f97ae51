"""DPO, ORPO and KTO as functions of per-sequence log-probabilities, written as the papers write them.

Each returns (loss_sum, count, stats): the micro-batch's loss is loss_sum / count (count = pairs, or KTO
examples), so gradient accumulation and ranks normalise by the real number of pairs as SFT does by tokens. `stats`
maps a metric name to (sum, count), summed the same way and divided when logged (`metric_means`):
rewards/chosen, rewards/rejected, rewards/accuracy (and `metric_means` adds rewards/margin = chosen - rejected,
which for pairs is the mean of the per-pair margins), KTO's kl, ORPO's nll and log-odds.

The arithmetic follows TRL 1.15 (DPOTrainer._compute_loss 'sigmoid', ORPOTrainer.odds_ratio_loss,
KTOTrainer._compute_loss 'kto'), so that tests can compare losses and gradients to float tolerance; where we
differ it is said at the function.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F

from finetune.train.logprobs import SequenceLogProbs

Stats = dict[str, tuple[torch.Tensor, int | torch.Tensor]]


def dpo_loss(chosen: torch.Tensor, rejected: torch.Tensor, ref_chosen: torch.Tensor, ref_rejected: torch.Tensor,
             beta: float, label_smoothing: float = 0.0) -> tuple[torch.Tensor, int, Stats]:
    """DPO (Rafailov et al. 2023, Eq. 7): -log sigmoid(beta * (log-ratio of chosen - log-ratio of rejected)),
    log-ratio = log pi(y|x) - log pi_ref(y|x), over [B] per-sequence sums.

    label_smoothing e > 0 is conservative DPO (Mitchell 2023, cDPO): the label is taken as wrong with probability
    e, -(1 - e) log sigmoid(z) - e log sigmoid(-z). TRL computed it so in its sigmoid loss before 1.0; TRL 1.15
    keeps the same formula in CPOTrainer.cpo_loss (sigmoid) and uses label_smoothing only for its other losses.
    """
    chosen_ratio, rejected_ratio = chosen - ref_chosen, rejected - ref_rejected
    z = beta * (chosen_ratio - rejected_ratio)
    losses = -F.logsigmoid(z)
    if label_smoothing:
        losses = losses * (1 - label_smoothing) - F.logsigmoid(-z) * label_smoothing
    pairs = len(chosen)
    reward_chosen, reward_rejected = beta * chosen_ratio.detach(), beta * rejected_ratio.detach()
    return losses.sum(), pairs, _reward_stats(reward_chosen, reward_rejected, pairs)


def _reward_stats(reward_chosen: torch.Tensor, reward_rejected: torch.Tensor, pairs: int) -> Stats:
    return {"rewards/chosen": (reward_chosen.sum(), pairs), "rewards/rejected": (reward_rejected.sum(), pairs),
            "rewards/accuracy": ((reward_chosen > reward_rejected).float().sum(), pairs)}


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x < 0, accurate on both sides of -log 2 (Maechler 2012, 'Accurately computing
    log(1 - exp(-|a|))')."""
    return torch.where(x < -math.log(2), torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


# A mean log-prob of exactly 0 (fp32 rounds a token probability above 1 - 6e-8 to 1, which ORPO's own SFT term
# drives short answers towards) would make log(1 - p) infinite; there the odds term is saturated anyway.
_MAX_MEAN_LOGP = -1e-7


def orpo_loss(chosen: SequenceLogProbs, rejected: SequenceLogProbs, lam: float) -> tuple[torch.Tensor, int, Stats]:
    """ORPO (Hong et al. 2024, Eq. 6-7): NLL of the chosen answers + lambda * -log sigmoid(log odds ratio), where
    odds(y|x) = P / (1 - P) with P the length-normalised likelihood exp(mean token log-prob), as in the paper and
    TRL. The NLL is over the chosen ANSWER tokens (the paper's L_SFT, and what our SFT trains on); TRL's ORPOTrainer
    takes it over prompt + answer. Both terms are per micro-batch means, as in TRL; loss_sum is that mean times
    the pairs, so accumulation weighs micro-batches by their pairs.
    """
    pairs = len(chosen.sums)
    nll = -chosen.sums.sum() / chosen.counts.sum().clamp_min(1)
    mean_chosen = chosen.means.clamp(max=_MAX_MEAN_LOGP)
    mean_rejected = rejected.means.clamp(max=_MAX_MEAN_LOGP)
    log_odds = (mean_chosen - mean_rejected) - (log1mexp(mean_chosen) - log1mexp(mean_rejected))
    ratio = F.logsigmoid(log_odds)
    loss_sum = pairs * nll - lam * ratio.sum()
    stats = _reward_stats(lam * mean_chosen.detach(), lam * mean_rejected.detach(), pairs)
    stats.update({"nll": (nll.detach() * pairs, pairs), "log_odds_ratio": (ratio.detach().sum(), pairs),
                  "log_odds_chosen": (log_odds.detach().sum(), pairs)})
    return loss_sum, pairs, stats


def kto_loss(policy: torch.Tensor, reference: torch.Tensor, desirable: torch.Tensor, kl_policy: torch.Tensor,
             kl_reference: torch.Tensor, beta: float, desirable_weight: float = 1.0,
             undesirable_weight: float = 1.0,
             mean_across: Callable | None = None) -> tuple[torch.Tensor, int, Stats]:
    """KTO (Ethayarajh et al. 2024, Eq. 7-8): with r = log pi(y|x) - log pi_ref(y|x) and the reference point
    z0 = KL(pi || pi_ref), estimated from mismatched pairs (x_i, y_{i-1}) of the micro-batch, clamped at 0 and
    detached (no gradient flows through it), a desirable y costs w_d (1 - sigmoid(beta (r - z0))), an undesirable
    one w_u (1 - sigmoid(beta (z0 - r))). [B] per-sequence sums; `desirable` [B] bool.

    `mean_across`: the estimate's mean over the run's ranks, taken before the clamp (TRL averages z0 over all
    processes the same way); None: the micro-batch's own estimate. rewards/accuracy counts desirable examples with r > z0 and
    undesirable ones with r < z0: the side of the reference point the loss pushes each towards.
    """
    kl = (kl_policy - kl_reference).mean().detach()
    kl = (mean_across(kl) if mean_across is not None else kl).clamp(min=0)
    ratio = policy - reference
    losses = torch.where(desirable, desirable_weight * (1 - torch.sigmoid(beta * (ratio - kl))),
                         undesirable_weight * (1 - torch.sigmoid(beta * (kl - ratio))))
    n = len(policy)
    rewards = beta * ratio.detach()
    undesirable = ~desirable
    right = torch.where(desirable, ratio.detach() > kl, ratio.detach() < kl)
    stats = {"rewards/chosen": ((rewards * desirable).sum(), desirable.sum()),
             "rewards/rejected": ((rewards * undesirable).sum(), undesirable.sum()),
             "rewards/accuracy": (right.float().sum(), n), "kl": (kl, 1)}
    return losses.sum(), n, stats


def metric_means(stats: dict[str, tuple]) -> dict[str, float]:
    """Summed stats (of one micro-batch or accumulated over many) as means, plus rewards/margin."""
    means = {name: float(total) / float(count) for name, (total, count) in stats.items() if float(count) > 0}
    if "rewards/chosen" in means and "rewards/rejected" in means:
        means["rewards/margin"] = means["rewards/chosen"] - means["rewards/rejected"]
    return means
