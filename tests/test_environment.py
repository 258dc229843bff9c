"""Every result names its environment: package versions as installed, the devices, the working tree's state."""

from __future__ import annotations

import importlib.metadata
import json
import platform
import subprocess

import pytest
import torch

from dpft.environment import PACKAGES, environment, git_dirty, signature
from dpft.results import flat_summary, read_results, results_from_summary
from dpft.train import run
from tests.conftest import requires_data


def _strict(text: str):
    def refuse(name):
        raise ValueError(f"not strict JSON: {name}")

    return json.loads(text, parse_constant=refuse)


@requires_data
def test_a_run_records_its_environment_in_results_and_the_summary(make_cfg):
    cfg = make_cfg("model=opt-tiny", "task=sst2", "method=mezo")
    run(cfg)
    path = f"{cfg.paths.output_dir}/results.json"
    results = _strict(open(path).read())
    env = results["environment"]
    for name in ("torch", "lightning", "transformers", "peft", "datasets", "hydra-core", "dp-accounting"):
        assert env[name] == importlib.metadata.version(name), name
    assert env["python"] == platform.python_version() and env["threads"] == torch.get_num_threads()
    assert env["devices"] and env["torch_cuda"] == torch.version.cuda and isinstance(env["git_dirty"], bool)
    summary = read_results(path)["summary"]
    assert summary["environment/transformers"] == env["transformers"]  # the W&B summary carries it
    assert results_from_summary(summary)["environment"] == env


def test_versions_come_from_the_installed_distributions():
    env = environment()
    assert set(PACKAGES) <= set(env)
    assert env["opacus"] == (importlib.metadata.version("opacus") if _installed("opacus") else None)
    assert env["scipy"] == importlib.metadata.version("scipy")


def _installed(name: str) -> bool:
    try:
        importlib.metadata.version(name)
        return True
    except importlib.metadata.PackageNotFoundError:
        return False


def test_git_dirty_reads_the_working_tree(tmp_path):
    assert git_dirty(tmp_path) is None  # not a checkout
    git = ["git", "-c", "user.email=a@b", "-c", "user.name=a", "-C", str(tmp_path)]
    subprocess.run([*git, "init", "-q"], check=True)
    (tmp_path / "f.py").write_text("x = 1\n")
    subprocess.run([*git, "add", "f.py"], check=True)
    subprocess.run([*git, "commit", "-qm", "one"], check=True)
    assert git_dirty(tmp_path) is False
    (tmp_path / "new.py").write_text("untracked\n")
    assert git_dirty(tmp_path) is False  # an untracked file changes no code that ran
    (tmp_path / "f.py").write_text("x = 2\n")
    assert git_dirty(tmp_path) is True


def test_the_signature_leaves_out_what_changes_no_result():
    env = {**environment(), "threads": 1}
    assert signature(env) == signature({**env, "threads": 64, "platform": "other", "git_dirty": True})
    assert signature(env) != signature({**env, "transformers": "0.0"})
    assert signature(None) == {}


def test_flat_summary_round_trips_the_block():
    results = {"method": "m", "model": "x", "task": "t", "seed": 0, "data_seed": None, "status": "completed",
               "metrics": {}, "privacy": {}, "cost": {}, "environment": {"torch": "2.13.0", "devices": "cpu"}}
    assert results_from_summary(flat_summary(results))["environment"] == results["environment"]


def test_a_summary_without_the_block_reads_back_without_one():
    summary = {"method": "m", "model": "x", "task": "t", "seed": 0, "data_seed": None, "status": "completed"}
    assert "environment" not in results_from_summary(summary)


def test_a_runs_peak_memory_starts_afresh_in_a_shared_process():
    """Multirun jobs share a process: a job's peak is counted from its own start, not the process's (in a fresh
    process: one that kept freed memory, as the benchmark's allocator settings do, would still hold it)."""
    import sys

    if not sys.platform.startswith("linux"):
        pytest.skip("the CPU peak is reset through /proc (Linux)")
    code = """
import torch
from dpft.results import peak_memory_by_device, reset_peak_memory
big = torch.ones(64 * 2**20, dtype=torch.float32)  # 256 MiB, touched
big += 1
earlier = peak_memory_by_device()["cpu"]
del big
reset_peak_memory()
print(earlier, peak_memory_by_device()["cpu"])
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    earlier, after = map(int, out.stdout.split())
    assert earlier - after > 200 * 2**20, (earlier, after)
