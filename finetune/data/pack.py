"""Packing: several tokenized examples per sequence of at most `max_length` tokens.

Examples are placed whole (never split across sequences) by best-fit decreasing, which fills sequences to
well over 90% on typical chat data, and is deterministic for a seed. Inside a sequence each example keeps its
own position ids starting at 0; that restart is what makes transformers build block-diagonal causal attention
(or varlen flash attention), so no token attends across an example boundary. See collate.py for the batch side.
"""

from __future__ import annotations

import bisect
import random

import numpy as np


def pack(examples: list[dict], max_length: int, seed: int) -> list[dict]:
    """Packed rows of `input_ids`, `labels`, `position_ids` (int32 arrays) and the source `rows` they hold."""
    rng = random.Random(seed)
    order = list(range(len(examples)))
    # Shuffle before the stable sort so that equal-length examples are not grouped by file order.
    rng.shuffle(order)
    order.sort(key=lambda i: -len(examples[i]["input_ids"]))
    bins: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (room left, bin index), sorted, for bins that still have room
    for i in order:
        n = len(examples[i]["input_ids"])
        if n > max_length:
            raise ValueError(f"example of {n} tokens exceeds max_length {max_length}; truncate before packing")
        k = bisect.bisect_left(free, (n, -1))
        if k < len(free):
            room, b = free.pop(k)
            bins[b].append(i)
        else:
            room, b = max_length, len(bins)
            bins.append([i])
        if room - n > 0:
            bisect.insort(free, (room - n, b))
    # Longest-first placement leaves the fullest bins at the front; shuffling keeps row order uninformative.
    rng.shuffle(bins)
    return [_concat([examples[i] for i in b]) for b in bins]


def _concat(parts: list[dict]) -> dict:
    return {
        "input_ids": np.concatenate([p["input_ids"] for p in parts]),
        "labels": np.concatenate([p["labels"] for p in parts]),
        "position_ids": np.concatenate([np.arange(len(p["input_ids"]), dtype=np.int32) for p in parts]),
        "rows": [p.get("row") for p in parts],
    }
