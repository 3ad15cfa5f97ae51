"""`preference.reference: precomputed`: the reference's log-probs of every train and eval sequence, computed in
one pass before fit and carried by the examples, so that the steps skip the reference forward.

The reference is the base with the adapter switched off: its log-probs do not depend on training. A resumed run
therefore computes them again (the same pass over the same base and data gives the same numbers) rather than
storing them in every checkpoint. Per example: [chosen, rejected] sums, or KTO's [completion, mismatched
completion] (the mismatched pairs are fixed when the data is built for exactly this).

Distributed: rank r scores every world_size-th micro-batch and one sum over ranks gives every rank all of them.
With sharded parameters (ZeRO-3, FSDP) every forward is a collective, so every rank runs the same number of
forwards: a rank short of micro-batches repeats its last one and discards the result.
"""

from __future__ import annotations

import math
import time

import numpy as np
import torch

from finetune.data.preference_collate import REFERENCE_KEY


def precompute_reference(model, objective, data, micro_batch_size: int, rt, say) -> None:
    """Set `REFERENCE_KEY` on every example of `data.train` and `data.eval` (a collective: every rank calls it)."""
    started, scored = time.perf_counter(), 0
    was_training = model.training
    model.eval()
    try:
        for dataset in (data.train, data.eval or []):
            values = _score(model, objective, data, dataset, micro_batch_size, rt)
            for example, pair in zip(dataset, values):
                example[REFERENCE_KEY] = pair
            scored += len(dataset)
    finally:
        model.train(was_training)
    say(f"reference: log-probs of {scored} examples precomputed with the adapter off in "
        f"{time.perf_counter() - started:.1f} s")


@torch.no_grad()
def _score(model, objective, data, dataset: list[dict], micro_batch_size: int, rt) -> np.ndarray:
    """[len(dataset), 2] fp32 reference sums, the same on every rank."""
    values = torch.zeros(len(dataset), 2, dtype=torch.float64)
    chunks = [range(lo, min(lo + micro_batch_size, len(dataset))) for lo in range(0, len(dataset), micro_batch_size)]
    mine = chunks[rt.rank::rt.world_size]
    for r in range(math.ceil(len(chunks) / rt.world_size)):
        indices = mine[min(r, len(mine) - 1)] if mine else chunks[-1]
        batch = rt.to_device(data.collate([dataset[i] for i in indices]))
        if "kl" in batch:  # KTO: the completion, and the mismatched one of the same prompt
            pair = torch.stack([objective.reference(model, batch), objective.reference(model, batch["kl"])], 1)
        else:  # pairs: sequences 0..B-1 chosen, B..2B-1 rejected
            pair = objective.reference(model, batch).view(2, -1).T
        if r < len(mine):
            values[list(indices)] = pair.double().cpu()
    total = rt.sum_floats(values.flatten().tolist())
    return np.asarray(total, dtype=np.float32).reshape(-1, 2)
