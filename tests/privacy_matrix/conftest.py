"""The matrix's real runs, made once per method and shared by the claims that read them (1, 5 and 7), also across
pytest-xdist workers (the recipe of xdist's docs: a file lock in the directory the workers share)."""

from __future__ import annotations

import fcntl
import os
import pickle
from collections.abc import Callable

import pytest
import torch

from tests.privacy_matrix.matrix import Runs, produce_runs


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """The matrix's models are tiny: on a shared machine one intra-op thread runs their ops ~3x faster than two
    contending ones (a method's four runs: 4.6 s on two threads, 1.4 s on one). Restored after each module."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def matrix_runs(tmp_path_factory) -> Callable[[str], Runs]:
    base = tmp_path_factory.getbasetemp()
    shared = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base
    made: dict[str, Runs] = {}

    def runs(method: str) -> Runs:
        if method not in made:
            stored = shared / f"privacy-matrix-{method}.pickle"
            with open(shared / f"privacy-matrix-{method}.lock", "w") as lock:
                fcntl.flock(lock, fcntl.LOCK_EX)  # another worker may be making them: wait for it
                if stored.is_file():
                    made[method] = pickle.loads(stored.read_bytes())
                else:
                    made[method] = produce_runs(method, shared / "privacy-matrix-runs")
                    stored.write_bytes(pickle.dumps(made[method]))
        return made[method]

    return runs
