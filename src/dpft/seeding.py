"""Derived seeds: one integer per (stream seed, index), so each draw is reproducible on its own.

Random tensors too big for one core (DP-SGD's noise, a zeroth-order step's z) are drawn a chunk at a time,
each chunk from a seed of its own (a reseeded generator, or a counter-based stream: `dpft.philox`): the values
depend on the seeds alone, never on which thread drew which chunk, so the chunks can spread over threads (randn
on CPU runs on one core).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor

import torch

_MIX = 0x9E3779B97F4A7C15  # golden-ratio constant: spreads (seed, index) pairs over the seed space
_MASK = (1 << 63) - 1

# entries per chunk: on CPU 4 MB in fp32 (one chunk per thread beside the weights); on accelerators bigger
# chunks mean fewer kernel launches (their RNG streams differ from the CPU's anyway, so the chunk size costs
# no reproducibility across device types)
CHUNK, CHUNK_ACCELERATOR = 1 << 20, 1 << 24
# below this many entries in all, threads cost more than they save (a tiny model's z takes microseconds)
PARALLEL_MIN = 1 << 22

_local = threading.local()  # one generator per (thread, device)
_pools: dict[int, ThreadPoolExecutor] = {}  # by process id: a pool's threads do not survive a fork


def secret_seed() -> int:
    """A seed from the operating system's entropy source (secure mode): nothing published can rebuild it."""
    return int.from_bytes(os.urandom(8), "little") & _MASK


def derive_seed(seed: int, index: int) -> int:
    return (seed * _MIX + (index + 1) * 0xBF58476D1CE4E5B9) & _MASK


def chunks(size: int, device: torch.device) -> list[slice]:
    """The chunks [start, stop) of `size` entries drawn on `device`."""
    step = CHUNK if device.type == "cpu" else CHUNK_ACCELERATOR
    return [slice(start, min(start + step, size)) for start in range(0, size, step)]


def thread_generator(device: torch.device, seed: int) -> torch.Generator:
    """This thread's generator for `device`, reseeded (cheaper than a new generator per chunk)."""
    generators = _local.__dict__.setdefault("generators", {})
    if device not in generators:
        generators[device] = torch.Generator(device=device)
    return generators[device].manual_seed(seed)


def for_each(fn: Callable[..., None], items: Sequence[tuple], entries: int,
             devices: Iterable[torch.device]) -> None:
    """fn(*item) for every item; spread over torch's intra-op thread count when the items hold at least
    PARALLEL_MIN entries in all, all on CPU (accelerators run their kernels in parallel already)."""
    threads = torch.get_num_threads()
    if len(items) > 1 and entries >= PARALLEL_MIN and threads > 1 and all(d.type == "cpu" for d in devices):
        pool = _pools.get(os.getpid())
        if pool is None:
            pool = _pools[os.getpid()] = ThreadPoolExecutor(threads)
        for future in [pool.submit(fn, *item) for item in items]:
            future.result()
    else:
        for item in items:
            fn(*item)
