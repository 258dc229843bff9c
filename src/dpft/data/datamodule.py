"""LightningDataModule over a task's protocol splits, collated by the model's scorer."""

from __future__ import annotations

import lightning as L
import torch
from torch.utils.data import DataLoader

from dpft.data.sampling import PoissonBatchSampler, ShuffledBatchSampler
from dpft.data.tasks import Example, ExampleBatch, Split, Task
from dpft.models.scoring import Scorer


class TaskDataModule(L.LightningDataModule):
    """Training batches: Poisson-sampled with rate batch_size / n for private methods (`poisson=True`),
    shuffled fixed-size batches for the non-private baselines; batch t depends on (seed, t) only and is
    the batch of optimisation step t (the samplers start each iteration at `trainer.global_step`), so a
    resumed run or a rebuilt dataloader continues with the batch after the last completed step. Evaluation batches
    in order. Under data parallelism each process takes its share of every batch (see `sampling`)."""

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

    def _position(self) -> dict:
        """The training sampler's position (the step reached: resume, dataloader rebuilds) and this rank's share."""
        trainer = self.trainer
        if trainer is None:
            return {}
        return {"position": lambda: trainer.global_step, "rank": trainer.global_rank,
                "num_replicas": trainer.world_size}

    def _sampling_seed(self) -> int:
        """Rank 0's seed on every rank (secure mode draws a secret seed per process)."""
        return self.seed if self.trainer is None else int(self.trainer.strategy.broadcast(self.seed, src=0))

    def sizes(self) -> dict[str, int]:
        return {split: len(examples) for split, examples in self.data.items()}

    def transfer_batch_to_device(self, batch: dict, device: torch.device, dataloader_idx: int) -> dict:
        """Move the tensors; the `examples` (frozen dataclasses) stay as they are."""
        return {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}

    def _collate(self, examples: list[Example], train: bool) -> dict:
        if not examples:  # an empty Poisson batch: the private step still runs (pure noise)
            return {"examples": ExampleBatch()}
        return {**self.scorer.collate(examples, train=train), "examples": ExampleBatch(examples)}

    def train_dataloader(self) -> DataLoader:
        examples, position = self.data["train"], self._position()
        if self.poisson:
            sampler = PoissonBatchSampler(len(examples), self.batch_size / len(examples), self._sampling_seed(),
                                          **position)
        else:
            sampler = ShuffledBatchSampler(len(examples), self.batch_size, self._sampling_seed(), **position)
        return DataLoader(examples, batch_sampler=sampler, num_workers=self.num_workers, generator=self._generator(),
                          collate_fn=lambda batch: self._collate(batch, train=True))

    def _eval_loader(self, split: Split) -> DataLoader:
        trainer = self.trainer
        examples = self.data[split][trainer.global_rank::trainer.world_size] if trainer is not None else self.data[split]
        return DataLoader(examples, batch_size=self.eval_batch_size, num_workers=self.num_workers,
                          generator=self._generator(), collate_fn=lambda batch: self._collate(batch, train=False))

    def _generator(self) -> torch.Generator:
        """A loader's own generator: creating its iterator draws a worker seed, which must not come from the
        global RNG (dropout's), or a resumed run (creating a new iterator mid-training) would diverge."""
        return torch.Generator().manual_seed(self.seed)

    def val_dataloader(self) -> DataLoader:
        return self._eval_loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._eval_loader("test")
