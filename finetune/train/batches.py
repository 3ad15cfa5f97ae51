"""Which examples make each optimizer step, on each rank, so that runs are resumable and world-size free.

An epoch is a seeded permutation of the training sequences cut into micro-batches. One optimizer step
consumes `gradient_accumulation * world_size` consecutive micro-batches of that global order; rank r takes
every world_size-th of them. A position in training is therefore just (epoch, micro-batches consumed),
which is what checkpoints store.

The data bundle collates (`bundle.collate(examples)`: SFT's rows, or preference pairs / KTO examples), so the
order and the sharding here are the same for every objective.
"""

from __future__ import annotations

from typing import Callable, Iterator

from finetune.data import batch_indices

Collate = Callable[[list], dict]  # examples -> one micro-batch with its `num_tokens`


class BatchStream:
    def __init__(self, dataset, micro_batch_size: int, gradient_accumulation: int, seed: int, collate: Collate,
                 rank: int = 0, world_size: int = 1):
        self.dataset = dataset
        self.micro_batch_size = micro_batch_size
        self.gradient_accumulation = gradient_accumulation
        self.seed = seed
        self.collate = collate
        self.rank = rank
        self.world_size = world_size
        self.global_micro_batches = gradient_accumulation * world_size
        # Only full micro-batches, and only whole steps of them: every step has the same shape on every rank.
        self.micro_batches_per_epoch = len(dataset) // micro_batch_size
        self.steps_per_epoch = self.micro_batches_per_epoch // self.global_micro_batches

    def _order(self, epoch: int) -> list[list[int]]:
        """All micro-batches of `epoch` in global order (the data package owns the shuffle)."""
        return batch_indices(len(self.dataset), self.micro_batch_size, shuffle=True, seed=self.seed, epoch=epoch)

    def _micro_batch(self, order: list[list[int]], index: int) -> dict:
        return self.collate([self.dataset[i] for i in order[index]])

    def iterate(self, epoch: int = 0, offset: int = 0) -> Iterator[tuple[list[dict], int, int]]:
        """Yield (this rank's micro-batches for one step, epoch, offset) where (epoch, offset) is the position
        *after* the step; resuming from that position continues exactly where the step left off."""
        usable = self.steps_per_epoch * self.global_micro_batches
        while True:
            if offset >= usable:
                epoch, offset = epoch + 1, 0
            order = self._order(epoch)
            while offset < usable:
                mine = range(offset + self.rank, offset + self.global_micro_batches, self.world_size)
                micro = [self._micro_batch(order, i) for i in mine]
                offset += self.global_micro_batches
                yield micro, epoch, offset


def eval_batches(dataset, micro_batch_size: int, collate: Collate, rank: int = 0, world_size: int = 1,
                 max_batches: int | None = None) -> Iterator[dict]:
    """Eval set in order (partial last batch kept); rank r takes every world_size-th micro-batch."""
    n = (len(dataset) + micro_batch_size - 1) // micro_batch_size
    if max_batches is not None:
        n = min(n, max_batches)
    for b in range(rank, n, world_size):
        examples = [dataset[i] for i in range(b * micro_batch_size, min(len(dataset), (b + 1) * micro_batch_size))]
        yield collate(examples)
