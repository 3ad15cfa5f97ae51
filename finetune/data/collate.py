"""Batches for the training loop, and the deterministic order they come in.

Batch contract (every key a LongTensor of shape [B, L]):
  input_ids      token ids; padding uses the tokenizer's pad id (its value never matters: see labels).
  labels         aligned with input_ids, HF style: labels[t] is input_ids[t] or -100 (ignored). The loss shifts
                 inside each row: logits[:, :-1] predict labels[:, 1:]. The pipeline sets the label of every
                 example's FIRST token to -100 (nothing in the example predicts it), so in a packed row the
                 last token of example i "predicts" -100 instead of the first token of example i+1: no loss
                 crosses an example boundary, and HF's built-in `ForCausalLMLoss` (which shifts the same way)
                 is correct on packed rows too. Padding is -100. Consequently labels[:, 0] is always -100 and
                 `(labels != -100).sum()` equals the number of predicted tokens (`count_label_tokens`).
  position_ids   unpacked: 0..L-1 per row. Packed: restart at 0 at every example, and the tail padding of a row
                 gets its own 0.. run, so it is a segment of its own that no real token attends to.
  attention_mask UNPACKED batches only: 1 for real tokens, 0 for right padding. PACKED batches have NO
                 attention_mask key: with attention_mask=None transformers (>= 4.56,
                 masking_utils.find_packed_sequence_indices) derives block-diagonal causal attention from the
                 position-id restarts (sdpa/eager/flex), and flash_attention_2 uses them as varlen boundaries.

The model must be called with use_cache=False in training. Transformers only looks for packed sequences when
there is no cache; with the config's default use_cache=True it creates an empty DynamicCache and attends across
the whole packed row (checked on transformers 5.23: packed and per-example logits differ by ~0.4). The
packed-vs-unpacked loss test in tests/data runs with use_cache=False.

Order: micro-batch j of an epoch holds positions j*B..(j+1)*B-1 of a permutation that depends only on
(seed, epoch), so a run resumes mid-epoch from (epoch, start). `start` counts GLOBAL micro-batches already
consumed; from there rank r of world_size takes every world_size-th one (start + r, start + r + world_size, ...),
and the last (remaining % world_size) micro-batches are skipped so that every rank makes the same number of
steps. With one process this is just "skip the first `start` micro-batches".
"""

from __future__ import annotations

import random
from typing import Iterator, Sequence

import numpy as np
import torch

from .tokenize import IGNORE


def collate(examples: Sequence[dict], pad_token_id: int, packed: bool, pad_to: int | None = None) -> dict:
    """Stack examples (dicts with input_ids, labels[, position_ids]) into one batch; see the module docstring.

    `pad_to` pads every row to exactly that length (static shapes); default is the longest row in the batch.
    """
    if not examples:
        raise ValueError("collate needs at least one example")
    lengths = [len(e["input_ids"]) for e in examples]
    width = max(lengths) if pad_to is None else pad_to
    if max(lengths) > width:
        raise ValueError(f"a row of {max(lengths)} tokens does not fit pad_to={pad_to}")
    rows = len(examples)
    input_ids = torch.full((rows, width), pad_token_id, dtype=torch.long)
    labels = torch.full((rows, width), IGNORE, dtype=torch.long)
    position_ids = torch.arange(width, dtype=torch.long).repeat(rows, 1)
    attention_mask = None if packed else torch.zeros((rows, width), dtype=torch.long)
    for r, (example, n) in enumerate(zip(examples, lengths)):
        input_ids[r, :n] = _long(example["input_ids"])
        labels[r, :n] = _long(example["labels"])
        if packed:
            # An example without position_ids (never packed) is one segment: 0..n-1 already in place.
            if example.get("position_ids") is not None:
                position_ids[r, :n] = _long(example["position_ids"])
            position_ids[r, n:] = torch.arange(width - n, dtype=torch.long)
        else:
            attention_mask[r, :n] = 1
    batch = {"input_ids": input_ids, "labels": labels, "position_ids": position_ids}
    if attention_mask is not None:
        batch["attention_mask"] = attention_mask
    return batch


def _long(values) -> torch.Tensor:
    return torch.from_numpy(np.asarray(values, dtype=np.int64))


def count_label_tokens(batch: dict) -> int:
    """Tokens the loss is computed on (the first column is always -100, so no shift correction is needed)."""
    return int((batch["labels"] != IGNORE).sum())


def num_micro_batches(n: int, micro_batch_size: int, world_size: int = 1) -> int:
    """Micro-batches one rank gets in a full epoch of `n` rows."""
    total = -(-n // micro_batch_size)
    return total // world_size if world_size > 1 else total


def batch_indices(n: int, micro_batch_size: int, *, shuffle: bool, seed: int, epoch: int, start: int = 0,
                  rank: int = 0, world_size: int = 1) -> list[list[int]]:
    """This rank's micro-batches (lists of row indices) of `epoch`, from global micro-batch `start` on."""
    if micro_batch_size < 1 or world_size < 1 or not 0 <= rank < world_size or start < 0:
        raise ValueError(f"bad batching arguments: micro_batch_size={micro_batch_size}, start={start}, "
                         f"rank={rank}, world_size={world_size}")
    order = list(range(n))
    if shuffle:
        # A string seed goes through SHA-512 in `random`, so the order is the same in every process and run.
        random.Random(f"{seed}/{epoch}").shuffle(order)
    global_batches = [order[i:i + micro_batch_size] for i in range(0, n, micro_batch_size)]
    remaining = max(0, len(global_batches) - start)
    steps = remaining // world_size if world_size > 1 else remaining
    return [global_batches[start + rank + k * world_size] for k in range(steps)]


def batches(dataset: Sequence[dict], micro_batch_size: int, *, pad_token_id: int, packed: bool, shuffle: bool,
            seed: int, epoch: int, start: int = 0, rank: int = 0, world_size: int = 1,
            pad_to: int | None = None) -> Iterator[dict]:
    """Collated micro-batches of `dataset` in the order of `batch_indices`."""
    for indices in batch_indices(len(dataset), micro_batch_size, shuffle=shuffle, seed=seed, epoch=epoch,
                                 start=start, rank=rank, world_size=world_size):
        yield collate([dataset[i] for i in indices], pad_token_id, packed, pad_to)
