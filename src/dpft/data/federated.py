"""Federated simulation data: the training split cut into client shards, and rounds that sample clients.

- `partition`: N disjoint shards covering the training split. `iid`: a seeded permutation cut into N
  near-equal parts (sizes differ by at most 1). `dirichlet`: label skew as in Hsu et al. (2019): for
  every label, the clients' shares are drawn from Dirichlet(α·1_N) and that label's examples are dealt
  out accordingly (small α: each client holds few labels; large α: close to IID); drawn again until every
  client holds at least `min_size` examples.
- `FederatedDataModule`: one training batch per round, holding the ids of the round's clients. Private
  methods sample clients by Poisson with rate q = clients_per_round / N (so client-level accounting of a
  Poisson-subsampled mechanism applies); non-private FedAvg takes exactly clients_per_round clients
  without replacement. Round t depends on (seed, t) only, as the example-level samplers (exact resume).
"""

from __future__ import annotations

from typing import Any

import numpy as np
from torch.utils.data import DataLoader

from dpft.data.datamodule import TaskDataModule
from dpft.data.sampling import PoissonBatchSampler, ShuffledBatchSampler
from dpft.data.tasks import Example

PARTITIONS = ("iid", "dirichlet")


def partition(labels: list[int], clients: int, scheme: str = "iid", alpha: float = 0.5, seed: int = 0,
              min_size: int = 1, max_tries: int = 1000) -> list[list[int]]:
    """Client shards as lists of example indices (disjoint; their union is range(len(labels)))."""
    n = len(labels)
    if scheme not in PARTITIONS:
        raise ValueError(f"fed.partition={scheme!r} is not one of {PARTITIONS}")
    if not 1 <= clients * min_size <= n:
        raise ValueError(f"fed.clients={clients} clients of at least {min_size} example(s) each need "
                         f"{clients * min_size} training examples; the task has {n}: lower fed.clients")
    rng = np.random.default_rng(seed)
    if scheme == "iid":
        return [part.tolist() for part in np.array_split(rng.permutation(n), clients)]
    if not alpha > 0:
        raise ValueError(f"fed.alpha={alpha} is invalid: the Dirichlet concentration must be > 0")
    by_label: dict[int, np.ndarray] = {}
    for label in sorted(set(labels)):
        by_label[label] = np.flatnonzero(np.asarray(labels) == label)
    for _ in range(max_tries):
        shards: list[list[int]] = [[] for _ in range(clients)]
        for indices in by_label.values():
            shares = rng.dirichlet(np.full(clients, alpha))
            cuts = (np.cumsum(shares)[:-1] * len(indices)).astype(int)
            for client, part in enumerate(np.split(rng.permutation(indices), cuts)):
                shards[client].extend(part.tolist())
        if min(len(s) for s in shards) >= min_size:
            return [sorted(s) for s in shards]
    raise ValueError(f"no Dirichlet(α={alpha}) partition of {n} examples over {clients} clients gave every client "
                     f"{min_size} example(s) in {max_tries} draws: raise fed.alpha or lower fed.clients")


class FederatedDataModule(TaskDataModule):
    """`clients[c]` is client c's shard of the training split; training batches are {"clients": [ids]}."""

    def __init__(self, *args: Any, clients: int, partition: str = "iid", alpha: float = 0.5,
                 partition_seed: int = 0, **kwargs: Any):
        super().__init__(*args, **kwargs)  # batch_size: clients per round
        self.num_clients, self.scheme, self.alpha, self.partition_seed = clients, partition, alpha, partition_seed
        self.clients: list[list[Example]] = []

    def setup(self, stage: str | None = None) -> None:
        if not self.data:
            self.data = self.task.splits(self.needed)
        if "train" in self.needed and not self.clients:
            if not 1 <= self.batch_size <= self.num_clients:
                raise ValueError(f"fed.clients_per_round={self.batch_size} must be in [1, fed.clients="
                                 f"{self.num_clients}]")
            train = self.data["train"]
            labels = [ex.label if ex.label is not None else 0 for ex in train]
            shards = partition(labels, self.num_clients, self.scheme, self.alpha, self.partition_seed)
            self.clients = [[train[i] for i in shard] for shard in shards]

    def sizes(self) -> dict[str, int]:
        sizes = super().sizes()
        if self.clients:
            lengths = [len(c) for c in self.clients]
            sizes.update(clients=len(lengths), client_min=min(lengths), client_max=max(lengths))
        return sizes

    def train_dataloader(self) -> DataLoader:
        position = self._position()
        if self.poisson:
            sampler = PoissonBatchSampler(self.num_clients, self.batch_size / self.num_clients, self._sampling_seed(),
                                          **position)
        else:
            sampler = ShuffledBatchSampler(self.num_clients, self.batch_size, self._sampling_seed(), **position)
        return DataLoader(range(self.num_clients), batch_sampler=sampler, generator=self._generator(),
                          collate_fn=lambda ids: {"clients": ids})

    def transfer_batch_to_device(self, batch: dict, device, dataloader_idx: int) -> dict:
        return batch if "clients" in batch else super().transfer_batch_to_device(batch, device, dataloader_idx)
