"""The causal-LM loss as a (sum, count) pair, so accumulation and ranks can normalise by real token counts."""

from __future__ import annotations

from contextlib import contextmanager, nullcontext

import torch
import torch.nn.functional as F

from finetune.data import IGNORE
from finetune.train.linear_ce import linear_cross_entropy_sum

# fp32 logits of one chunk of the fused loss stay under this many bytes (chunks of ~1k tokens at a 128k vocab).
FUSED_CHUNK_BYTES = 2**29
# On CPU the chunk's logits and logsumexp temporaries are host memory: 64 MiB chunks (~340 tokens at a 49k vocab)
# keep the head's GEMMs large enough to run at full speed. Measured on the quickstart at micro-batch 2: -34 MiB of
# peak RSS against one 1k-token chunk (the step's peak is not at the head; scripts/bench/bench_cpu_memory.py).
CPU_FUSED_CHUNK_BYTES = 2**26


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


def fusable_head(model: torch.nn.Module, sharded: bool) -> tuple[torch.nn.Linear | None, str]:
    """The LM head the fused loss can take over, or None and why not.

    The fused loss needs the plain `hidden @ W.T` head with a frozen, whole (unsharded) weight and nothing
    applied to the logits after it (Gemma-2's soft-capping, Cohere's logit scale).
    """
    head = model.get_output_embeddings()
    config = model.config
    if sharded:
        return None, "parameters are sharded across processes"
    if type(head) is not torch.nn.Linear or head.bias is not None:
        return None, f"the LM head is {type(head).__name__}, not a bias-free nn.Linear"
    if head.weight.requires_grad:
        return None, "the LM head is trained"
    for key in ("final_logit_softcapping", "logit_scale"):
        if getattr(config, key, None) not in (None, 1.0):
            return None, f"the model applies {key} to its logits"
    return head, "on"


def _passthrough(hidden: torch.Tensor) -> torch.Tensor:
    return hidden


@contextmanager
def _hidden_states_from(head: torch.nn.Linear):
    """While active, the model's LM head returns its input: the model's 'logits' are the final hidden states.

    An instance attribute shadows the class's forward, so DDP and checkpointing wrappers see the same module.
    """
    head.forward = _passthrough
    try:
        yield
    finally:
        del head.forward


def causal_lm_loss(model, batch: dict, head: torch.nn.Linear | None,
                   autocast_dtype: torch.dtype | None = None) -> tuple[torch.Tensor, int]:
    """`token_loss_sum` of `model` on `batch`; with `head` (see fusable_head) through the chunked fused loss.

    `autocast_dtype`: run the forward under torch.autocast in this dtype (None: as the weights are).
    """
    device_type = batch["input_ids"].device.type
    with torch.autocast(device_type, dtype=autocast_dtype) if autocast_dtype else nullcontext():
        if head is None:
            return token_loss_sum(model(**model_inputs(batch)).logits, batch["labels"])
        with _hidden_states_from(head):
            hidden = model(**model_inputs(batch)).logits
    labels = batch["labels"][:, 1:]
    hidden = hidden[:, :-1, :].reshape(-1, hidden.shape[-1])
    budget = CPU_FUSED_CHUNK_BYTES if device_type == "cpu" else FUSED_CHUNK_BYTES
    chunk = max(128, budget // (4 * head.weight.shape[0]))
    loss = linear_cross_entropy_sum(hidden, head.weight, labels.reshape(-1), chunk, IGNORE)
    return loss, int((labels != IGNORE).sum())
