"""`make gpu-check` on a machine without CUDA, and the runs it would make, composed and validated here."""

from __future__ import annotations

import pytest
import torch

from dpft.bench import gpu_check
from dpft.validation import validate_config
from tests.conftest import compose_config


def test_without_cuda_it_says_nothing_ran_and_exits_0(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert gpu_check.main(["--out", str(tmp_path / "gpu-check.json")]) == 0
    assert "nothing ran" in capsys.readouterr().out and not (tmp_path / "gpu-check.json").exists()


@pytest.mark.parametrize("model", gpu_check.SHAPES)
@pytest.mark.parametrize("method", list(gpu_check.METHODS))
def test_every_planned_run_is_a_valid_gpu_configuration(tmp_path, model, method):
    overrides = [o for o in gpu_check.run_overrides(model, method, tmp_path) if not o.startswith("hydra.")]
    cfg = compose_config(overrides, tmp_path, shrink=False)
    assert validate_config(cfg) == (method != "mezo")
    assert cfg.trainer.precision == "bf16-mixed" and cfg.model.trainable_dtype == "float32"


def test_the_table_names_the_gpu_each_run_and_the_bench_records():
    report = {"environment": {"gpu": "NVIDIA H100", "gpus": 1},
              "tests": {"passed": 12, "failed": 0, "skipped": 2, "seconds": 95.0, "returncode": 0},
              "runs": [{"model": "opt-1.3b", "method": "dpzo", "returncode": 0, "status": "completed",
                        "seconds_per_step": 0.21, "peak_memory_gib": 6.1, "test_acc": 50.0, "epsilon_spent": 1.99},
                       {"model": "opt-6.7b", "method": "mezo", "returncode": 124}],
              "bench": [], "precision": []}
    table = gpu_check.format_table(report)
    assert "GPU: NVIDIA H100 ×1" in table and "12 passed, 0 failed, 2 skipped (95 s)" in table
    assert "| opt-1.3b | dpzo | completed | 0.210 | 6.1 | 50.0 | 1.99 |" in table
    assert "| opt-6.7b | mezo | exit 124 | – | – | – | – |" in table
