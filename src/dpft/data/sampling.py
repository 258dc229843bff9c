"""Training batch samplers whose batch t is a function of (seed, t) alone.

Each iteration starts at the batch of the step the run has reached (`position`, e.g. Lightning's
`trainer.global_step`), never at a count of its own: a resumed run, a rebuilt dataloader
(`trainer.reload_dataloaders_every_n_epochs`) or a cut epoch (`limit_train_batches`) can neither replay a
batch nor skip one, so batch t is used by step t alone, as the accountant assumes. Sampling is also
data-parallel without changing the batches: with `num_replicas` W > 1, rank r takes its share of
the same global batch, so the union over ranks is the single-process batch.

- `PoissonBatchSampler` (private methods): each example joins batch t independently with probability q,
  as the Poisson-subsampled accountant assumes; batches vary in size and can be empty. Rank r keeps the
  sampled examples of its data partition {i : i mod W = r}: every rank samples its partition at rate q,
  so the union is a Poisson sample of the whole set at rate q.
- `ShuffledBatchSampler` (non-private baselines): fixed-size batches of a permutation redrawn each epoch
  (the last incomplete batch dropped); rank r takes positions r, r + W, ... of the global batch.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator

import torch
from torch.utils.data import Sampler

from dpft.seeding import derive_seed


class StepIndexedBatchSampler(Sampler[list[int]]):
    """Each iteration yields batches s, s + 1, ... up to the end of the epoch that contains s, where s is
    `position()` when the iteration starts (the optimisation steps done so far). One epoch is `len(self)`
    batches. Without `position` (a sampler used on its own) each iteration continues where the last one
    stopped."""

    def __init__(self, num_examples: int, seed: int, position: Callable[[], int] | None = None, rank: int = 0,
                 num_replicas: int = 1):
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank {rank} is not in [0, {num_replicas})")
        self.num_examples, self.seed = num_examples, seed
        self.rank, self.num_replicas = rank, num_replicas
        self.position = position
        self.next_batch = 0
        self._generator = torch.Generator()

    def global_batch(self, index: int) -> list[int]:
        raise NotImplementedError

    def batch(self, index: int) -> list[int]:
        """This rank's share of global batch `index`."""
        return self.global_batch(index) if self.num_replicas == 1 else self.share(self.global_batch(index))

    def share(self, indices: list[int]) -> list[int]:
        raise NotImplementedError

    def __iter__(self) -> Iterator[list[int]]:
        if self.position is not None:
            self.next_batch = int(self.position())
        end = (self.next_batch // len(self) + 1) * len(self)
        while self.next_batch < end:
            index = self.next_batch
            self.next_batch += 1
            yield self.batch(index)


class PoissonBatchSampler(StepIndexedBatchSampler):
    """Batch t: every example independently with probability `sample_rate` (generator seeded by (seed, t)).
    One "epoch" is ⌈1/q⌉ batches (n examples in expectation)."""

    def __init__(self, num_examples: int, sample_rate: float, seed: int, **kwargs: int):
        if not 0 < sample_rate <= 1:
            raise ValueError(f"Poisson sample rate must be in (0, 1], got {sample_rate}")
        super().__init__(num_examples, seed, **kwargs)
        self.sample_rate = sample_rate

    def __len__(self) -> int:
        return math.ceil(1 / self.sample_rate)

    def global_batch(self, index: int) -> list[int]:
        self._generator.manual_seed(derive_seed(self.seed, index))
        keep = torch.rand(self.num_examples, generator=self._generator) < self.sample_rate
        return keep.nonzero().flatten().tolist()

    def share(self, indices: list[int]) -> list[int]:
        return [i for i in indices if i % self.num_replicas == self.rank]


class ShuffledBatchSampler(StepIndexedBatchSampler):
    """Batch t: positions [(t mod L)·B, (t mod L + 1)·B) of the permutation of epoch ⌊t / L⌋, L = ⌊n / B⌋."""

    def __init__(self, num_examples: int, batch_size: int, seed: int, **kwargs: int):
        if not 1 <= batch_size <= num_examples:
            raise ValueError(f"batch size {batch_size} must be in [1, {num_examples}] (the number of examples)")
        super().__init__(num_examples, seed, **kwargs)
        if batch_size % self.num_replicas:
            raise ValueError(f"method.batch_size={batch_size} must be divisible by the {self.num_replicas} "
                             "data-parallel processes")
        self.batch_size = batch_size
        self._epoch, self._order = -1, torch.empty(0, dtype=torch.long)

    def __len__(self) -> int:
        return self.num_examples // self.batch_size

    def global_batch(self, index: int) -> list[int]:
        epoch, position = divmod(index, len(self))
        if epoch != self._epoch:
            self._generator.manual_seed(derive_seed(self.seed, epoch))
            self._epoch, self._order = epoch, torch.randperm(self.num_examples, generator=self._generator)
        return self._order[position * self.batch_size:(position + 1) * self.batch_size].tolist()

    def share(self, indices: list[int]) -> list[int]:
        return indices[self.rank::self.num_replicas]
