"""Poisson sampling for private methods: each example joins a batch independently with probability q."""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
from torch.utils.data import Sampler

from dpft.seeding import derive_seed


class PoissonBatchSampler(Sampler[list[int]]):
    """Batches of variable size (possibly empty), as the Poisson-subsampled accountant assumes.

    Batch t is drawn from a generator seeded with (seed, t), so a resumed run that restarts at
    batch t sees the same batches. One "epoch" is ⌈1/q⌉ batches (n examples in expectation).
    """

    def __init__(self, num_examples: int, sample_rate: float, seed: int):
        if not 0 < sample_rate <= 1:
            raise ValueError(f"Poisson sample rate must be in (0, 1], got {sample_rate}")
        self.num_examples, self.sample_rate, self.seed = num_examples, sample_rate, seed
        self.batches_drawn = 0
        self._generator = torch.Generator()

    def __len__(self) -> int:
        return math.ceil(1 / self.sample_rate)

    def batch(self, index: int) -> list[int]:
        self._generator.manual_seed(derive_seed(self.seed, index))
        keep = torch.rand(self.num_examples, generator=self._generator) < self.sample_rate
        return keep.nonzero().flatten().tolist()

    def __iter__(self) -> Iterator[list[int]]:
        for _ in range(len(self)):
            indices = self.batch(self.batches_drawn)
            self.batches_drawn += 1
            yield indices
