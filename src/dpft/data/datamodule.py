"""LightningDataModule over a task's protocol splits, collated by the model's scorer."""

from __future__ import annotations

import lightning as L
import torch
from torch.utils.data import DataLoader

from dpft.data.sampling import PoissonBatchSampler
from dpft.data.tasks import Example, Split, Task
from dpft.models.scoring import Scorer


class TaskDataModule(L.LightningDataModule):
    """Training batches: Poisson-sampled with rate batch_size / n for private methods (`poisson=True`),
    shuffled fixed-size batches for the non-private baselines. Evaluation batches in order."""

    def __init__(self, task: Task, scorer: Scorer, batch_size: int, eval_batch_size: int, seed: int,
                 needed: tuple[Split, ...] = ("train", "val", "test"), num_workers: int = 0,
                 poisson: bool = False):
        super().__init__()
        self.task, self.scorer = task, scorer
        self.batch_size, self.eval_batch_size, self.poisson = batch_size, eval_batch_size, poisson
        self.seed, self.needed, self.num_workers = seed, needed, num_workers
        self.data: dict[Split, list[Example]] = {}

    def setup(self, stage: str | None = None) -> None:
        if not self.data:
            self.data = self.task.splits(self.needed)
            if "train" in self.needed and len(self.data["train"]) < self.batch_size:
                raise ValueError(f"method.batch_size={self.batch_size} exceeds the {len(self.data['train'])} "
                                 f"training examples of task {self.task.name}")

    def sizes(self) -> dict[str, int]:
        return {split: len(examples) for split, examples in self.data.items()}

    def transfer_batch_to_device(self, batch: dict, device: torch.device, dataloader_idx: int) -> dict:
        """Move the tensors; the `examples` (frozen dataclasses) stay as they are."""
        return {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}

    def _collate(self, examples: list[Example], train: bool) -> dict:
        if not examples:  # an empty Poisson batch: the private step still runs (pure noise)
            return {"examples": []}
        return self.scorer.collate(examples, train=train)

    def _loader(self, split: Split, train: bool) -> DataLoader:
        collate = lambda examples: self._collate(examples, train=train)  # noqa: E731
        if train and self.poisson:
            sampler = PoissonBatchSampler(len(self.data[split]), self.batch_size / len(self.data[split]), self.seed)
            return DataLoader(self.data[split], batch_sampler=sampler, num_workers=self.num_workers,
                              collate_fn=collate)
        generator = torch.Generator().manual_seed(self.seed) if train else None
        return DataLoader(
            self.data[split], batch_size=self.batch_size if train else self.eval_batch_size,
            shuffle=train, drop_last=train, generator=generator, num_workers=self.num_workers,
            collate_fn=collate,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", train=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", train=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", train=False)
