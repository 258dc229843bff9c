"""GPU smoke test on a real OPT size: skipped without a GPU and local weights (never needed by CI).

    DPFT_OPT_WEIGHTS=/data/opt-1.3b DPFT_OPT_MODEL=opt-1.3b python -m pytest tests/test_gpu.py
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from tests.conftest import requires_data

WEIGHTS = os.environ.get("DPFT_OPT_WEIGHTS")
MODEL = os.environ.get("DPFT_OPT_MODEL", "opt-1.3b")

pytestmark = [
    requires_data,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU"),
    pytest.mark.skipif(not WEIGHTS, reason="set DPFT_OPT_WEIGHTS to a folder written by save_pretrained "
                                           "(and DPFT_OPT_MODEL to its size, default opt-1.3b)"),
]


def test_dpzo_on_a_real_opt_size(tmp_path):
    folder = tmp_path / "run"
    out = subprocess.run(
        [sys.executable, "-m", "dpft.train", f"model={MODEL}", f"model.pretrained={WEIGHTS}", "trainer=gpu",
         "task=sst2", "method=dpzo", "privacy=eps2", "trainer.max_steps=20", "task.num_train=200",
         "task.num_dev=50", "task.num_test=200", "logger=none", f"hydra.run.dir={folder}"],
        capture_output=True, text=True, timeout=3600)
    assert out.returncode == 0, out.stderr[-3000:]
    results = json.loads((folder / "results.json").read_text())
    assert results["status"] == "completed" and results["cost"]["device"].startswith("cuda:")
    assert 0 < results["privacy"]["epsilon_spent"] <= 2.0
    assert 0 <= results["metrics"]["test/acc"] <= 100
    # a ZO step needs inference memory: the weights (2 bytes each in bf16) plus activations; AdamW FT needs 8x+
    weights = 2 * results["cost"]["params_total"]
    assert results["cost"]["peak_memory_bytes"] < 3 * weights, results["cost"]
