"""Shared fixtures: the real Hydra config, composed and shrunk for tests (as lightning-hydra-template does)."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, open_dict

from dpft.config import CONFIG_DIR

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"

if not os.environ.get("DPFT_DATA_DIR") and SHARED_DATA.is_dir():
    os.environ["DPFT_DATA_DIR"] = str(SHARED_DATA)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

requires_data = pytest.mark.skipif(
    not os.environ.get("DPFT_DATA_DIR"), reason="needs the local data mirror (set DPFT_DATA_DIR=../shared/data)"
)

# Shrinks a run to seconds: few steps, small splits, a couple of eval batches, no logger.
SHRINK = [
    "trainer.max_steps=3",
    "trainer.limit_val_batches=2",
    "trainer.limit_test_batches=2",
    "trainer.enable_progress_bar=false",
    "method.batch_size=4",
    "method.eval_batch_size=8",
    "logger=none",
]


def compose_config(overrides: list[str], output_dir: Path | None = None, shrink: bool = True) -> DictConfig:
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose("train", overrides=(SHRINK if shrink else []) + list(overrides))
    with open_dict(cfg):
        cfg.paths.output_dir = str(output_dir) if output_dir else "/nonexistent-output-dir"
        if shrink and "num_train" in cfg.task:  # MeZO protocol: small samples (k-shot files are fixed)
            cfg.task.update(num_train=24, num_dev=8, num_test=16)
    return cfg


@pytest.fixture(autouse=True, scope="session")
def threads_per_worker():
    """pytest-xdist runs one process per core: torch's default of one intra-op thread per core in each of them
    would contend (tiny models ran ~3x slower). Tests of the threaded paths set their own count."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1:
        import torch

        torch.set_num_threads(max(1, (os.cpu_count() or 1) // workers))


@pytest.fixture
def make_cfg(tmp_path: Path) -> Callable[..., DictConfig]:
    def _make(*overrides: str, shrink: bool = True) -> DictConfig:
        return compose_config(list(overrides), tmp_path / "run", shrink=shrink)

    return _make
