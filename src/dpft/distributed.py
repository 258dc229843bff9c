"""Scale-out: data parallelism where each method reduces what its step needs, and model sharding by device map.

Data parallel (`trainer=ddp`): every process holds a full replica and takes its share of each batch (see
`dpft.data.sampling`). No DistributedDataParallel wrapper and no gradient bucket traffic: the methods
reduce exactly what their step needs, with one `all_reduce_sum`:

- zeroth-order: every rank uses the same step seed, hence the same direction z; each computes its
  examples' clipped scalars; the scalar sums are all-reduced (a few bytes per step); the noise is drawn
  once, on rank 0, before the reduction; every rank then applies the identical update;
- DP-SGD: per-example clipping is local, the clipped gradient sums are all-reduced, the noise is drawn
  once (rank 0, before the reduction), so the global sum gets one N(0, σ²C²) draw, not one per rank;
- FT: gradients are averaged.

Adding rank 0's noise before the all-reduce gives sum + noise on every rank with one draw and no extra
communication, and it holds in secure mode too (where the ranks' noise sources are not synchronised).

Model sharding (`model.device_map=auto` or a dict, e.g. OPT-30B/66B over the visible GPUs): the weights
stay where accelerate placed them (`DeviceMapStrategy` does not move the model); the ZO engine perturbs
and updates each parameter on its own device with a generator seeded from (step seed, parameter name),
so the update does not depend on the placement.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from lightning.pytorch.overrides.distributed import _sync_module_states
from lightning.pytorch.strategies import DDPStrategy, SingleDeviceStrategy


def visible_gpus() -> int:
    return torch.cuda.device_count()


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum over processes, in place (no-op in a single process)."""
    if world_size() > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def union(keys: set[str]) -> list[str]:
    """The sorted union of every process's keys (so that all of them reduce the same tensors in order)."""
    if world_size() > 1:
        gathered: list[Any] = [None] * world_size()
        dist.all_gather_object(gathered, sorted(keys))
        keys = set().union(*gathered)
    return sorted(keys)


class ReplicatedDDPStrategy(DDPStrategy):
    """Lightning's DDP (process launch, process group, rank-0 checkpoints and logging) without the
    DistributedDataParallel wrapper: replicas start from rank 0's weights and stay identical because every
    rank applies the same reduced update."""

    strategy_name = "dpft_ddp"

    def configure_ddp(self) -> None:
        _sync_module_states(self.model)


class DeviceMapStrategy(SingleDeviceStrategy):
    """One process, the model already spread over devices by `device_map`: batches go to the device of the
    input embeddings, accelerate's hooks move activations between devices, and the model is never moved."""

    strategy_name = "dpft_device_map"

    def __init__(self, device: str | torch.device = "cuda:0", **kwargs: Any):
        super().__init__(device=torch.device(device), **kwargs)

    def model_to_device(self) -> None:
        pass

    def teardown(self) -> None:
        """Lightning's teardown without its move to the host: the dispatched model and its optimizer states stay
        where accelerate put them (moving them would copy every weight to host memory, and leave trainer.test
        with host weights and device inputs)."""
        self.precision_plugin.teardown()
        if self.accelerator is not None:
            self.accelerator.teardown()
        self.checkpoint_io.teardown()
