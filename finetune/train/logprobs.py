"""Per-sequence sums of answer-token log-probabilities, for the policy and for the reference (adapter off).

Preference objectives compare whole answers: log pi(y | x) = sum over the answer's tokens of log p(y_t | x, y_<t).
A batch (finetune/data/preference_collate.py) holds several sequences, one per row or packed several to a row;
`sequence_ids` names the sequence of every token. Only the answer tokens (labels != IGNORE, usually a minority of
the batch) go through the LM head: their final hidden states are gathered and the head runs in chunks
(`linear_log_probs`), so full-vocabulary logits exist for one chunk at a time, never for the whole batch. Where
the head cannot be fused (`loss.fusable_head`: sharded, trained, soft-capped) the model's own logits are used.

The reference model of DPO/KTO is the same quantized base with the LoRA adapter switched off (`adapter_disabled`):
no second copy of the base in memory. The fast path (finetune/kernels) reads peft's flag on every call, so the
reference forward computes exactly what the base alone computes.
"""

from __future__ import annotations

from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import torch

from finetune.data import IGNORE
from finetune.train.linear_ce import linear_log_probs
from finetune.train.loss import CPU_FUSED_CHUNK_BYTES, FUSED_CHUNK_BYTES, _hidden_states_from, model_inputs


@dataclass
class SequenceLogProbs:
    sums: torch.Tensor  # [S] fp32: sum of the answer tokens' log-probs of each sequence
    counts: torch.Tensor  # [S] int64: answer tokens of each sequence

    @property
    def means(self) -> torch.Tensor:
        return self.sums / self.counts.clamp_min(1)

    def split(self, *sizes: int) -> list["SequenceLogProbs"]:
        """Consecutive groups of sequences (chosen, rejected)."""
        return [SequenceLogProbs(s, c) for s, c in zip(self.sums.split(sizes), self.counts.split(sizes))]


def sequence_log_probs(model, batch: dict, head: torch.nn.Linear | None,
                       autocast_dtype: torch.dtype | None = None) -> SequenceLogProbs:
    """Answer log-prob sums of every sequence of `batch` (a preference batch: see preference_collate's contract).
    Differentiable when the model is. The answer tokens' positions come with the batch (found on the host when it
    was collated), so nothing here waits for the device."""
    device_type = batch["input_ids"].device.type
    with torch.autocast(device_type, dtype=autocast_dtype) if autocast_dtype else nullcontext():
        with _hidden_states_from(head) if head is not None else nullcontext():
            out = model(**model_inputs(batch)).logits  # the final hidden states when the head is fused
    # Position t predicts token t + 1: answer_index counts positions of the [rows, length - 1] shifted grid.
    picked = batch["answer_index"]
    states = out[:, :-1].reshape(-1, out.shape[-1]).index_select(0, picked)
    targets = batch["input_ids"][:, 1:].reshape(-1).index_select(0, picked)
    if head is not None:
        budget = CPU_FUSED_CHUNK_BYTES if device_type == "cpu" else FUSED_CHUNK_BYTES
        token_logps = linear_log_probs(states, head.weight, targets, max(128, budget // (4 * head.weight.shape[0])))
    else:
        token_logps = torch.log_softmax(states.float(), dim=-1).gather(1, targets[:, None]).squeeze(1)
    counts = batch["answer_counts"]
    sums = torch.zeros(len(counts), dtype=torch.float32, device=token_logps.device)
    return SequenceLogProbs(sums.index_add(0, batch["answer_sequence"], token_logps), counts)


@contextmanager
def adapter_disabled(model):
    """The base model alone while active: peft's `disable_adapter()` on `model` (a PeftModel, or a wrapper holding
    one as `.module`, as DDP does)."""
    peft_model = getattr(model, "module", model)
    if not hasattr(peft_model, "disable_adapter"):
        raise TypeError(f"{type(peft_model).__name__} has no LoRA adapter to switch off")
    with peft_model.disable_adapter():
        yield


def reference_log_probs(model, batch: dict, head: torch.nn.Linear | None,
                        autocast_dtype: torch.dtype | None = None) -> SequenceLogProbs:
    """`sequence_log_probs` of the base alone (adapter off), without a graph."""
    with torch.no_grad(), adapter_disabled(model):
        return sequence_log_probs(model, batch, head, autocast_dtype)
