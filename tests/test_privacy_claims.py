"""Privacy claims under the overrides that would break them: mechanisms without an analysis, dataloader
rebuilds, δ ≥ 1/n, secure mode's sampling and journal, and what a private run releases besides its weights."""

from __future__ import annotations

import csv
import json
import math
import time
from pathlib import Path

import lightning as L
import pytest

import dpft.train
from dpft.checkpointing import JOURNAL, LAST
from dpft.data.sampling import PoissonBatchSampler
from dpft.train import run
from dpft.validation import ConfigError
from tests.conftest import compose_config, requires_data

pytestmark = requires_data

FIRST_ORDER_AND_FEDERATED = ["dpsgd", "dpsgd_lora", "anadp", "dp_fedavg", "dr_encoder"]
ZEROTH_ORDER = ["dpzo", "dpzero", "dpzoso", "dpzopo"]


def _no_data(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the data were loaded before the configuration was refused")

    monkeypatch.setattr(dpft.train, "build_task_from_config", refuse)


class RecordBatches(L.Callback):
    """The example ids of every batch the run trained on, by step."""

    def __init__(self):
        self.batches: dict[int, list[str]] = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.batches[trainer.global_step] = [ex.uid for ex in batch.get("examples", [])]


def _recording(monkeypatch) -> dict[str, RecordBatches]:
    original, seen = dpft.train.build_trainer, {}

    def build(cfg, output_dir, logger, callbacks, **kwargs):
        seen[output_dir.name] = seen.get(output_dir.name) or RecordBatches()
        return original(cfg, output_dir, logger, [*callbacks, seen[output_dir.name]], **kwargs)

    monkeypatch.setattr(dpft.train, "build_trainer", build)
    return seen


# --- 1. Laplace only where an L1 analysis exists ------------------------------------------------------
@pytest.mark.parametrize("method", FIRST_ORDER_AND_FEDERATED)
def test_laplace_is_refused_before_data_for_l2_clipped_methods(make_cfg, monkeypatch, method):
    _no_data(monkeypatch)
    cfg = make_cfg("model=opt-tiny", "task=sst2", f"method={method}", "method.mechanism=laplace", "privacy=pure_eps1")
    with pytest.raises(ConfigError, match=f"method.mechanism=laplace has no sensitivity analysis in method={method}"):
        run(cfg)


@pytest.mark.parametrize("method", ZEROTH_ORDER)
def test_laplace_zeroth_order_spends_the_closed_form_pure_epsilon(make_cfg, method):
    """K = 2 directions of Laplace(b) on sums of scalars clipped to `bound`: L1 sensitivity K·bound, so a step
    is ε₀ = K/(b/bound)-DP, amplified by Poisson sampling to ln(1 + q(e^ε₀ - 1)), composed T times."""
    cfg = make_cfg("model=opt-tiny", "task=sst2", f"method={method}", "method.mechanism=laplace", "privacy=pure_eps4",
                   "method.directions=2", "++method.first_stage=2", "++method.mask_queries=2")
    p = run(cfg)["privacy"]
    q, steps, k = 4 / 24, 3, 2
    b = k / math.log1p(math.expm1(4.0 / steps) / q)  # the calibrated scale over the bound, solved by hand
    assert p["mechanism"] == "laplace" and p["directions"] == k and p["sample_rate"] == pytest.approx(q)
    assert p["noise_multiplier"] == pytest.approx(b, rel=1e-12)
    assert p["epsilon_spent"] == pytest.approx(steps * math.log1p(q * math.expm1(k / p["noise_multiplier"])))
    assert p["epsilon_spent"] <= 4.0


# --- 2. a rebuilt dataloader cannot replay a batch ------------------------------------------------------
def test_reloading_the_dataloader_every_epoch_changes_nothing(tmp_path, monkeypatch):
    """q = 4/24: an "epoch" is 6 Poisson batches; 13 steps run 3 epochs (2 boundaries, 3 loader builds)."""
    seen = _recording(monkeypatch)
    builds = []
    original = dpft.data.datamodule.TaskDataModule.train_dataloader
    monkeypatch.setattr(dpft.data.datamodule.TaskDataModule, "train_dataloader",
                        lambda self: builds.append(1) or original(self))
    common = ["model=opt-tiny", "task=sst2", "method=dpzo", "privacy=eps8", "trainer.max_steps=13",
              "trainer.limit_val_batches=0", "validate=false"]
    plain = run(compose_config(common, tmp_path / "plain"))
    builds.clear()
    reloaded = run(compose_config([*common, "+trainer.reload_dataloaders_every_n_epochs=1"], tmp_path / "reload"))
    assert len(builds) >= 3  # the loader really was rebuilt at each epoch
    assert seen["reload"].batches == seen["plain"].batches
    batches = seen["reload"].batches
    assert [batches[t] for t in range(6)] != [batches[t] for t in range(6, 12)]  # epoch 2 is not epoch 1 again
    assert reloaded["trainable_parameters_sha256"] == plain["trainable_parameters_sha256"]


# --- 3. δ ≥ 1/n ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("method,delta,units", [("dpzo", 1 / 24, 24), ("dpsgd", 0.05, 24),
                                                ("dp_fedavg", 0.1, 10)])
def test_delta_not_below_one_over_n_is_refused_before_the_model(make_cfg, monkeypatch, method, delta, units):
    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded before δ was checked")

    monkeypatch.setattr(dpft.train, "load_model", no_model)
    fed = ["fed.clients=10", "method.batch_size=2"] if method == "dp_fedavg" else []
    cfg = make_cfg("model=opt-tiny", "task=sst2", f"method={method}", "privacy=eps2", f"privacy.target_delta={delta}",
                   *fed)
    with pytest.raises(ConfigError, match=rf"privacy.target_delta={delta:g} is not below 1/n = 1/{units}"):
        run(cfg)


def test_an_explicit_large_delta_runs_and_is_recorded(make_cfg):
    cfg = make_cfg("model=opt-tiny", "task=sst2", "method=dpzo", "privacy=eps2", "privacy.target_delta=0.05",
                   "privacy.allow_large_delta=true", "trainer.max_steps=1")
    run(cfg)
    p = json.loads((Path(cfg.paths.output_dir) / "results.json").read_text())["privacy"]
    assert p["large_delta_allowed"] is True and p["target_delta"] == 0.05


# --- 4-6. secure mode -----------------------------------------------------------------------------------
def _secure(tmp_path, name, *extra):
    return compose_config(["model=opt-tiny", "task=sst2", "method=dpzo", "privacy=eps2", "privacy.secure_mode=true",
                           "trainer.max_steps=6", "validate=false", *extra], tmp_path / name)


def test_secure_sampling_is_fresh_per_run_and_not_rebuildable_from_what_is_released(tmp_path, monkeypatch):
    seen = _recording(monkeypatch)
    first = run(_secure(tmp_path, "a"))
    run(_secure(tmp_path, "b"))
    assert seen["a"].batches != seen["b"].batches
    # what a reader has: results.json (seed, config) and the published sampling rule
    n, q = first["data_sizes"]["train"], first["privacy"]["sample_rate"]
    published = json.dumps(first)
    uids = [ex.uid for ex in dpft.train.build_task_from_config(_secure(tmp_path, "a").task).splits(("train",))["train"]]
    for seed in {first["seed"], first["config"]["seed"], first["config"]["method"].get("seed")}:
        rebuilt = {t: [uids[i] for i in PoissonBatchSampler(n, q, seed).global_batch(t)] for t in range(6)}
        assert rebuilt != seen["a"].batches
    assert "sampling_seed" not in published


def test_a_resumed_secure_run_continues_its_own_sample(tmp_path, monkeypatch):
    from tests.test_resume import _crash

    seen = _recording(monkeypatch)
    original = _crash(monkeypatch, 5)
    with pytest.raises(RuntimeError, match="simulated crash"):
        run(_secure(tmp_path, "run", "checkpoint.every_n_steps=2"))
    before = dict(seen["run"].batches)
    monkeypatch.setattr(dpft.train, "build_trainer", original)
    seen = _recording(monkeypatch)
    resumed = run(_secure(tmp_path, "run", "checkpoint.every_n_steps=2"))
    assert resumed["resume"]["from_step"] == 4
    assert seen["run"].batches[4] == before[4]  # the step after the checkpoint: the same secret sample


def test_a_secure_run_killed_before_its_first_checkpoint_charges_the_lost_steps(tmp_path, monkeypatch):
    from tests.test_resume import _crash

    original = _crash(monkeypatch, 4)
    with pytest.raises(RuntimeError, match="simulated crash"):
        run(_secure(tmp_path, "run", "checkpoint.every_n_steps=100"))
    out = tmp_path / "run" / "checkpoints"
    assert not (out / LAST).exists() and json.loads((out / JOURNAL).read_text())["steps_started"] == 4
    monkeypatch.setattr(dpft.train, "build_trainer", original)
    again = run(_secure(tmp_path, "run", "checkpoint.every_n_steps=100"))
    assert again["resume"]["resumed_from"] is None and again["resume"]["lost_steps_charged"] == 4
    assert again["privacy"]["steps"] == 6 and again["cost"]["steps"] == 2  # 4 charged + 2 run = the budget
    assert again["privacy"]["epsilon_spent"] <= again["privacy"]["target_epsilon"]


# --- 7. what a private run releases -----------------------------------------------------------------------
RAW = ("train/loss", "train/grad_norm_median", "train/batch_size", "fed/clients", "fed/upload_bytes")


def _logged_keys(cfg) -> set[str]:
    out = Path(cfg.paths.output_dir)
    keys: set[str] = set()
    for metrics in out.rglob("metrics.csv"):
        keys |= set(next(csv.reader(metrics.open())))
    for summary in out.rglob("wandb-summary.json"):
        keys |= set(json.loads(summary.read_text()))
    for history in out.rglob("*.wandb"):  # the offline run's history and summary records hold the keys as text
        keys |= {k for k in (*RAW, "privacy/epsilon_spent") if k.encode() in history.read_bytes()}
    return keys


@pytest.mark.parametrize("method,logger,extra", [
    ("dpsgd", "csv", []), ("dpzo", "wandb", []),
    ("dp_fedavg", "csv", ["fed.clients=12", "method.batch_size=4", "fed.local_steps=1"])])
def test_a_private_run_releases_no_raw_statistics_unless_asked(make_cfg, method, logger, extra):
    common = ["model=opt-tiny", "task=sst2", f"method={method}", "privacy=eps8", f"logger={logger}",
              "trainer.log_every_n_steps=1", *extra]
    cfg = make_cfg(*common)
    results = run(cfg)
    dpft.train._finish_wandb()
    for _ in range(40):  # W&B's writer is a separate process: wait for the control key (ε spent) to land
        keys = _logged_keys(cfg)
        if "privacy/epsilon_spent" in keys:
            break
        time.sleep(0.5)
    assert not keys & set(RAW), keys & set(RAW)
    assert "nonprivate_releases" not in results
    written = {*results["privacy"], *results.get("communication", {}), *results["summary"]}
    for raw in ("dropped_nonfinite_examples", "nonfinite_scalars", "nonfinite_client_updates", "clients_per_round",
                "upload_bytes_per_round", "clients_sampled", "upload_bytes_total", "prior_upload_bytes"):
        assert not any(key.split("/")[-1] == raw for key in written), raw
    assert "privacy/epsilon_spent" in keys


def test_diagnostics_are_released_only_on_request_and_listed(tmp_path):
    cfg = compose_config(["model=opt-tiny", "task=sst2", "method=dpsgd", "privacy=eps8", "logger=csv",
                          "trainer.log_every_n_steps=1", "privacy.diagnostics=true"], tmp_path / "diag")
    results = run(cfg)
    keys = _logged_keys(cfg)
    assert {"train/loss", "train/grad_norm_median", "train/batch_size"} <= keys
    listed = results["nonprivate_releases"]
    assert {"train/loss", "train/grad_norm_median", "train/batch_size"} <= set(listed["logged"])
    assert "dropped_nonfinite_examples" in listed["values"] and "ε does not cover" in listed["note"]
