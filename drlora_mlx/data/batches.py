"""Batches of tokenised examples: resumable training batches and evaluation batches.

Examples are grouped by length, so a batch pads little; batch widths are padded
to a multiple of ``PAD_TO`` so that few compiled shapes occur. The training
iterator's position (epoch, batch) is all its state, so resuming is exact.
"""

from __future__ import annotations

import numpy as np

from .loading import DataError

PAD_TO = 32  # batch lengths are padded to a multiple of this: few compiled shapes


class Batches:
    """Endless batches of similar-length examples, shuffled per epoch.

    The position (epoch, batch) is all the state there is: ``state()`` and
    ``restore()`` make resuming exact. ``rank``/``world`` split every batch
    between data-parallel processes.
    """

    def __init__(self, dataset, batch_size: int, max_seq_length: int, seed: int = 0, rank: int = 0, world: int = 1):
        if len(dataset) < batch_size:
            raise DataError(f"the dataset has {len(dataset)} examples, fewer than --batch-size {batch_size}")
        if batch_size % world:
            raise DataError(f"--batch-size {batch_size} must be divisible by the number of processes ({world})")
        self.dataset = dataset
        self.batch_size = batch_size
        self.max_seq_length = max_seq_length
        self.seed = seed
        self.rank, self.world = rank, world
        order = sorted(range(len(dataset)), key=lambda i: len(dataset[i][0]))
        self.groups = [order[i : i + batch_size] for i in range(0, len(order) - batch_size + 1, batch_size)]
        self.epoch = 0
        self.position = 0

    def state(self) -> dict:
        return {"epoch": self.epoch, "position": self.position}

    def restore(self, state: dict) -> None:
        self.epoch, self.position = int(state["epoch"]), int(state["position"])

    def _permutation(self) -> np.ndarray:
        return np.random.default_rng([self.seed, self.epoch]).permutation(len(self.groups))

    def __iter__(self):
        return self

    def __next__(self):
        if self.position >= len(self.groups):
            self.epoch, self.position = self.epoch + 1, 0
        group = self.groups[self._permutation()[self.position]]
        self.position += 1
        return collate([self.dataset[i] for i in group[self.rank :: self.world]], self.max_seq_length)


def collate(examples, max_seq_length: int):
    """(tokens (B, T) int32, lengths (B, 2) [prompt offset, length]) as numpy."""
    lengths = [min(len(tokens), max_seq_length) for tokens, _ in examples]
    width = min(1 + PAD_TO * -(-max(lengths) // PAD_TO), max_seq_length)
    batch = np.zeros((len(examples), width), np.int32)
    for j, (tokens, _) in enumerate(examples):
        batch[j, : lengths[j]] = tokens[: lengths[j]]
    offsets = [offset for _, offset in examples]
    return batch, np.array(list(zip(offsets, lengths)), np.int32)


def eval_batches(dataset, batch_size: int, max_seq_length: int, limit: int = -1, rank: int = 0, world: int = 1):
    """The first ``limit`` batches (all with -1) of a dataset, in order, for evaluation."""
    batch_size = min(batch_size, len(dataset))
    n = len(dataset) // batch_size if limit == -1 else min(limit, len(dataset) // batch_size)
    for b in range(n):
        idx = range(b * batch_size, (b + 1) * batch_size)
        yield collate([dataset[i] for i in list(idx)[rank::world]], max_seq_length)
