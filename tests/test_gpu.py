"""Everything that needs CUDA, skipped without it (never needed by CI). `make gpu-check` runs this file beside the GPU
measurements (`dpft.bench.gpu_check`).

Each method family runs on CUDA under the GPU configurations (trainer=gpu: bf16 autocast, bf16 frozen and fp32
trained weights); one ZO step and one DP-SGD clipped sum on CUDA agree with the same step in float32 on the CPU;
a model spread over two GPUs trains when two exist; and a real OPT checkpoint runs DP-ZO when DPFT_OPT_WEIGHTS
names one:

    DPFT_OPT_WEIGHTS=/data/opt-1.3b DPFT_OPT_MODEL=opt-1.3b python -m pytest tests/test_gpu.py
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
import torch
from omegaconf import open_dict

from dpft.train import run
from tests.conftest import requires_data
from tests.test_precision import DP_TOLERANCE, ZO_TOLERANCE, _overrides, _relative, _twins

WEIGHTS = os.environ.get("DPFT_OPT_WEIGHTS")
MODEL = os.environ.get("DPFT_OPT_MODEL", "opt-1.3b")
GPU = ["trainer=gpu", "model.dtype=bfloat16"]  # opt-tiny in the dtypes of the OPT configurations

pytestmark = [requires_data, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")]


@pytest.mark.parametrize("method", ["mezo", "dpzo", "dpzero", "dpzopo", "ft_lora", "dpsgd", "dpsgd_lora", "anadp",
                                    "dp_fedavg", "dr_encoder"])
def test_each_method_family_runs_on_cuda_under_the_gpu_configs(make_cfg, method):
    results = run(make_cfg("model=opt-tiny", "task=sst2", *_overrides(method), *GPU))
    assert results["status"] == "completed" and math.isfinite(results["metrics"]["test/acc"])
    devices = results["cost"]["peak_memory_bytes_by_device"]
    assert list(devices) == ["cuda:0"] and devices["cuda:0"] > 0 and results["cost"]["device"] == "cuda:0"


def test_one_zo_step_and_one_dp_clipped_sum_on_cuda_agree_with_float32_on_the_cpu():
    from dpft.bench.precision import clipped_gradient, projected_gradient
    from dpft.bench.run import make_batch, per_example_loss

    fp32, scheme = _twins("opt-125m")
    scheme.cuda()
    batch = make_batch(fp32, 8, 64, "cpu")
    gpu_batch = {k: v.cuda() if torch.is_tensor(v) else v for k, v in batch.items()}
    gen = torch.Generator().manual_seed(1)
    directions = [torch.randn(p.shape, generator=gen) for p in fp32.parameters()]  # the same z on both devices
    g32 = projected_gradient(fp32, lambda m: per_example_loss(m, batch).float().mean(), directions)
    g = projected_gradient(scheme, lambda m: per_example_loss(m, gpu_batch).float().mean(), directions,
                           autocast="cuda")
    assert abs(g - g32) <= ZO_TOLERANCE * abs(g32), (g, g32)
    fp32, scheme = _twins("opt-125m", lora=True)
    scheme.cuda()
    reference = clipped_gradient(fp32, lambda m: per_example_loss(m, batch).float(), 8, clip=0.01)
    on_gpu = clipped_gradient(scheme, lambda m: per_example_loss(m, gpu_batch).float(), 8, clip=0.01, autocast="cuda")
    assert _relative(reference, on_gpu) <= DP_TOLERANCE


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
@pytest.mark.parametrize("method", ["mezo", "dpzo"])
def test_a_model_spread_over_two_gpus_trains_and_reports_both(make_cfg, method):
    cfg = make_cfg("model=opt-tiny", "task=sst2", *_overrides(method), *GPU)
    with open_dict(cfg):  # keys with dots: not expressible as a command-line override
        cfg.model.device_map = {"model.decoder.embed_tokens": 0, "model.decoder.embed_positions": 0,
                                "model.decoder.final_layer_norm": 1, "model.decoder.layers": 1, "lm_head": 0}
    results = run(cfg)
    assert results["status"] == "completed" and math.isfinite(results["metrics"]["test/acc"])
    assert set(results["cost"]["peak_memory_bytes_by_device"]) == {"cuda:0", "cuda:1"}


@pytest.mark.skipif(not WEIGHTS, reason="set DPFT_OPT_WEIGHTS to a folder written by save_pretrained "
                                        "(and DPFT_OPT_MODEL to its size, default opt-1.3b)")
def test_dpzo_on_a_real_opt_checkpoint(tmp_path):
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
    # full-parameter DP-ZO trains fp32 weights (4 bytes each) and needs inference memory beyond them
    weights = 4 * results["cost"]["params_total"]
    assert results["cost"]["peak_memory_bytes"] < 1.5 * weights, results["cost"]
