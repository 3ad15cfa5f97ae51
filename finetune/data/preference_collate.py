"""Preference examples -> batches: every sequence of a micro-batch in ONE forward, labels on the answer tokens only.

Batch contract (collate.py's, plus where the answers are, so the model is called exactly as for SFT):
  input_ids, labels, position_ids[, attention_mask]
                  as collate.py: unpacked, one sequence per row (right padding, attention_mask); packed, several
                  sequences per row with position ids restarting at each (block-diagonal attention, no mask).
                  labels hold the answer tokens and -100 everywhere else (prompt, padding).
  answer_index    [N] int64: the answer tokens' positions in the flattened shifted grid [rows, length - 1]
                  (entry r * (length - 1) + t is position t of row r, which predicts token t + 1)
  answer_sequence [N] int64: the sequence each of those tokens belongs to
  answer_counts   [S] int64: answer tokens per sequence
  num_sequences   S
  num_tokens      tokens of the sequences trained on (for throughput; a KTO batch's `kl` sequences not counted)
Pairs (DPO, ORPO): sequences 0..B-1 are prompt_i + chosen_i and B..2B-1 prompt_i + rejected_i (TRL's order), and
`pairs` = B. Unpaired (KTO): sequences prompt_i + completion_i, `desirable` [B] bool, `num_desirable`, and `kl`:
a batch of the same contract holding the mismatched pairs prompt_i + kl_answer_i from which KTO estimates the KL
term (the KTO paper's estimate; each example's mismatched completion is fixed when the data is built,
preference_data.py, as TRL builds its KL dataset before training).
  reference_logps [S] fp32, when the examples carry the reference's log-probs (`reference: precomputed`): the
                  sums of the sequences in the order above (a KTO batch's `kl` carries its own).

Where the answers are is worked out here, on the host, so that the log-prob code indexes without waiting for the
device. Packing places whole sequences of the micro-batch (best-fit, pack.py) into rows of max_length tokens:
chosen and rejected answers of similar length waste no padding on each other.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from .collate import collate
from .pack import pack
from .preference_encode import fit
from .tokenize import IGNORE

REFERENCE_KEY = "reference_logps"  # per example: [chosen, rejected] or KTO's [completion, mismatched completion]


def collate_preferences(examples: Sequence[dict], pad_token_id: int, packed: bool, max_length: int) -> dict:
    """One micro-batch of pairs or of KTO examples (dicts from preference_encode) as the contract above says."""
    if not examples:
        raise ValueError("collate_preferences needs at least one example")
    prompts = [e["prompt"] for e in examples]
    references = np.stack([e[REFERENCE_KEY] for e in examples]) if REFERENCE_KEY in examples[0] else None
    if examples[0]["desirable"] is None:
        sequences = [(p, e["answers"][0]) for p, e in zip(prompts, examples)]
        sequences += [(p, e["answers"][1]) for p, e in zip(prompts, examples)]
        batch = {**collate_sequences(sequences, pad_token_id, packed, max_length), "pairs": len(examples)}
        if references is not None:
            batch[REFERENCE_KEY] = torch.from_numpy(np.ascontiguousarray(references.T.reshape(-1)))
        return batch
    mismatched = [fit(p, [e["kl_answer"]], max_length, e["pinned"]) for p, e in zip(prompts, examples)]
    desirable = [bool(e["desirable"]) for e in examples]
    batch = collate_sequences([(p, e["answers"][0]) for p, e in zip(prompts, examples)], pad_token_id, packed,
                              max_length)
    batch["kl"] = collate_sequences([(p, a[0]) for p, a, _ in mismatched], pad_token_id, packed, max_length)
    batch["desirable"] = torch.tensor(desirable)
    batch["num_desirable"] = sum(desirable)
    if references is not None:
        batch[REFERENCE_KEY] = torch.from_numpy(np.ascontiguousarray(references[:, 0]))
        batch["kl"][REFERENCE_KEY] = torch.from_numpy(np.ascontiguousarray(references[:, 1]))
    return batch


def sequence_example(prompt, answer, row: int) -> dict:
    """prompt + answer as an SFT example (collate.py's): labels on the answer's tokens only."""
    ids = np.concatenate([np.asarray(prompt, dtype=np.int32), np.asarray(answer, dtype=np.int32)])
    labels = ids.copy()
    labels[:len(prompt)] = IGNORE
    labels[0] = IGNORE  # nothing predicts an example's first token (collate.py)
    return {"input_ids": ids, "labels": labels, "row": row}


def collate_sequences(sequences: Sequence[tuple], pad_token_id: int, packed: bool, max_length: int) -> dict:
    """(prompt ids, answer ids) pairs, each at most max_length tokens in all, as one batch."""
    examples = [sequence_example(prompt, answer, k) for k, (prompt, answer) in enumerate(sequences)]
    if packed:
        rows = pack(examples, max_length, seed=0)  # the arrangement never changes a sequence's log-prob
        order = [r["rows"] for r in rows]
    else:
        rows, order = examples, [[k] for k in range(len(examples))]
    batch = collate(rows, pad_token_id, packed)
    sequence = torch.full_like(batch["labels"], -1)
    for r, ks in enumerate(order):
        lengths = [len(examples[k]["input_ids"]) for k in ks]
        sequence[r, :sum(lengths)] = torch.from_numpy(np.repeat(np.asarray(ks, dtype=np.int64), lengths))
    answer = (batch["labels"][:, 1:] != IGNORE).reshape(-1).nonzero().squeeze(1)
    owner = sequence[:, 1:].reshape(-1)[answer]
    batch.update(answer_index=answer, answer_sequence=owner, num_sequences=len(sequences),
                 answer_counts=torch.bincount(owner, minlength=len(sequences)),
                 num_tokens=sum(len(e["input_ids"]) for e in examples))
    return batch
