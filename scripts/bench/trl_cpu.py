"""TRL's DPO and KTO trainers where Triton is missing (CPU): the fused LM head they compute log-probs through has only
a Triton implementation (trl.kernels.ChunkedLogProbFunction; without Triton TRL leaves it None and the trainers
cannot run). `plain_trl_head` stands in for that kernel with the computation its docstring defines, in plain torch
(log-softmax of hidden @ weight.T, the requested statistics), so that everything else is TRL's own code.

Used by the tests that compare our objectives with TRL's (tests/trl_reference.py) and by bench_dpo.py's CPU smoke
mode; on a GPU the benchmark runs TRL's own kernel.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch


class _PlainChunkedLogProbs:
    @staticmethod
    def apply(hidden, weight, bias, targets, temperature, chunk_size, softcap, logit_scale, outputs):
        logits = hidden @ weight.T
        if bias is not None:
            logits = logits + bias
        logits = logits.float() * logit_scale
        if softcap is not None:
            logits = softcap * torch.tanh(logits / softcap)
        logits = logits / temperature
        logp = logits.log_softmax(-1)
        picked = logp.gather(1, targets[:, None]).squeeze(1)
        entropy = -(logp.exp() * logp).sum(-1) if "entropy" in outputs else None
        sum_sq = torch.logsumexp(2 * logp, -1).detach() if "log_sum_sq_probs" in outputs else None
        mean_logits = logits.mean(-1).detach() if "mean_logits" in outputs else None
        top1 = (logits.argmax(-1) == targets) if "is_top1" in outputs else None
        return picked, entropy, sum_sq, mean_logits, top1


@contextmanager
def plain_trl_head():
    import trl.trainer.utils as trl_utils

    saved = trl_utils._ChunkedLogProbFunction
    trl_utils._ChunkedLogProbFunction = _PlainChunkedLogProbs
    try:
        yield
    finally:
        trl_utils._ChunkedLogProbFunction = saved


def trl_inputs(batch: dict, prefix: str = "") -> dict:
    """Our collated (unpacked) batch in TRL's input form: ids, attention mask, and the completion mask = our labels."""
    return {f"{prefix}input_ids": batch["input_ids"], f"{prefix}attention_mask": batch["attention_mask"],
            f"{prefix}completion_mask": (batch["labels"] != -100).long()}
