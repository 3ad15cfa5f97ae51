"""TRL 1.15 as the reference implementation of DPO and KTO in tests: its trainers' own `_compute_loss` on our model.

TRL's DPO and KTO trainers compute per-token log-probs through a fused LM head whose only implementation is a
Triton kernel (trl.kernels.ChunkedLogProbFunction; on a machine without Triton TRL leaves it None and the
trainers cannot run). `plain_trl_head` stands in for that kernel with the computation its docstring defines, in
plain torch (log-softmax of hidden @ weight.T, the requested statistics), so that everything else -- the
reference pass through `use_adapter`, log-ratios, losses, KL estimate, rewards and metrics -- is TRL's own code.
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


def trl_trainer(kind: str, model, tokenizer, out_dir, **settings):
    """A TRL DPOTrainer or KTOTrainer around `model`, a PeftModel whose reference is its base (adapter off)."""
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer, KTOConfig, KTOTrainer

    common = dict(output_dir=str(out_dir), report_to=[], use_cpu=True, per_device_train_batch_size=4,
                  gradient_checkpointing=False, disable_tqdm=True, **settings)
    if kind == "dpo":
        rows = [{"prompt": "q", "chosen": "yes", "rejected": "no"}] * 4
        trainer = DPOTrainer(model=model, args=DPOConfig(**common), train_dataset=Dataset.from_list(rows),
                             processing_class=tokenizer)
    else:
        rows = [{"prompt": "q", "completion": "yes", "label": k % 2 == 0} for k in range(4)]
        trainer = KTOTrainer(model=model, args=KTOConfig(**common), train_dataset=Dataset.from_list(rows),
                             processing_class=tokenizer)
    # Given a PeftModel, TRL copies its adapter as a frozen "ref" adapter (re-training an existing adapter). Ours
    # is a new adapter whose reference is the base: TRL's path for that is the adapter switched off, taken when
    # there is no "ref" adapter.
    model.delete_adapter("ref")
    return trainer


def trl_inputs(batch: dict, prefix: str = "") -> dict:
    """Our collated (unpacked) batch in TRL's input form: ids, attention mask, and the completion mask = our labels."""
    return {f"{prefix}input_ids": batch["input_ids"], f"{prefix}attention_mask": batch["attention_mask"],
            f"{prefix}completion_mask": (batch["labels"] != -100).long()}
