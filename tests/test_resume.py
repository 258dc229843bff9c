"""Exact resume with the privacy ledger, budget enforcement, secure noise, and faults that a sweep survives."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import pytest
import torch

import dpft.train
from dpft.checkpointing import LAST, AtomicCheckpointIO, ResumeError
from dpft.privacy.accounting import make_spec
from dpft.privacy.ledger import BudgetExceededError, PrivacyLedger, PrivacyStatementMismatch
from dpft.privacy.noise import NoiseSource
from dpft.train import run
from tests.conftest import compose_config, requires_data

pytestmark = requires_data

STEPS = 6
RUNS = {"mezo": ["method=mezo"], "dpzo": ["method=dpzo", "privacy=eps2"],
        "dpsgd": ["method=dpsgd", "privacy=eps2", "method.lr=1e-3"], "ft": ["method=ft"],
        "dr_encoder": ["method=dr_encoder", "privacy=eps2", "fed.clients=12", "method.batch_size=4",
                       "fed.local_steps=2", "method.encoder.steps=10"]}


class SimulatedCrash(RuntimeError):
    pass


class CrashAt(L.Callback):
    """Raises at the start of step `step` (0-based): everything after the last checkpoint is lost."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step:
            raise SimulatedCrash(f"simulated crash before step {self.step}")


def _cfg(tmp_path: Path, name: str, *overrides: str):
    return compose_config(["model=opt-tiny", "task=sst2", f"trainer.max_steps={STEPS}", "checkpoint.every_n_steps=2",
                           *overrides], tmp_path / name)


def _crash(monkeypatch, step: int):
    """Make the next run() crash before `step`."""
    original = dpft.train.build_trainer

    def with_crash(cfg, output_dir, logger, callbacks, **kwargs):
        return original(cfg, output_dir, logger, [*callbacks, CrashAt(step)], **kwargs)

    monkeypatch.setattr(dpft.train, "build_trainer", with_crash)
    return original


def _crash_then_resume(tmp_path, monkeypatch, overrides, crash_at=5, resume_overrides=()):
    cfg = _cfg(tmp_path, "interrupted", *overrides)
    original = _crash(monkeypatch, crash_at)
    with pytest.raises(SimulatedCrash):
        run(cfg)
    dpft.train._finish_wandb(exit_code=1)  # what the crashed process's exit does
    out = Path(cfg.paths.output_dir)
    assert json.loads((out / "results.json").read_text())["status"] == "failed"
    assert (out / "checkpoints" / LAST).is_file()
    monkeypatch.setattr(dpft.train, "build_trainer", original)
    return run(_cfg(tmp_path, "interrupted", *overrides, *resume_overrides))


@pytest.mark.parametrize("method", ["mezo", "dpzo", "dpsgd", "ft", "dr_encoder"])
def test_crash_and_resume_equals_an_uninterrupted_run(tmp_path, monkeypatch, method):
    whole = run(_cfg(tmp_path, "whole", *RUNS[method]))
    # crash before step 5: checkpoints at steps 2 and 4, so step 5 is re-run from the step-4 checkpoint
    resumed = _crash_then_resume(tmp_path, monkeypatch, RUNS[method])
    assert resumed["resume"]["from_step"] == 4 and resumed["resume"]["lost_steps_charged"] == 0
    assert resumed["trainable_parameters_sha256"] == whole["trainable_parameters_sha256"]
    assert resumed["metrics"] == whole["metrics"]
    assert resumed["privacy"] == whole["privacy"]  # the same ledger: ε neither reset nor counted twice
    assert resumed["privacy"]["steps"] == STEPS + int(resumed["config"]["method"].get("prior_rounds", 0))
    assert resumed.get("communication") == whole.get("communication")  # federated: the same rounds and bytes
    assert not (tmp_path / "interrupted" / "checkpoints").exists()  # removed once results.json is written


def test_a_changed_privacy_statement_or_method_is_refused_on_resume(tmp_path, monkeypatch):
    cfg = _cfg(tmp_path, "run", *RUNS["dpzo"])
    original = _crash(monkeypatch, 3)
    with pytest.raises(SimulatedCrash):
        run(cfg)
    monkeypatch.setattr(dpft.train, "build_trainer", original)
    ckpt = Path(cfg.paths.output_dir) / "checkpoints" / LAST
    before = ckpt.read_bytes()
    for change, expected in [("privacy=eps8", "target_epsilon: 2.0 -> 8.0"), ("method.clip=0.1", "clip: 0.05 -> 0.1"),
                             ("trainer.max_steps=12", "steps: 6 -> 12"),
                             ("method.batch_size=8", "expected_batch_size: 4.0 -> 8.0"),
                             ("privacy.secure_mode=true", "secure_mode: False -> True")]:
        with pytest.raises(PrivacyStatementMismatch, match=expected):
            run(_cfg(tmp_path, "run", *RUNS["dpzo"], change))
    with pytest.raises(ResumeError, match="written by method=dpzo"):
        run(_cfg(tmp_path, "run", "method=dpzero", "privacy=eps2"))
    assert ckpt.read_bytes() == before  # nothing was trained


def test_resume_continues_the_wandb_run(tmp_path, monkeypatch):
    monkeypatch.setattr(dpft.train, "_finish_wandb", lambda exit_code=0, finish=dpft.train._finish_wandb: (
        finish(exit_code), time.sleep(1.1)))  # offline run folders are named by the second they start
    resumed = _crash_then_resume(tmp_path, monkeypatch, [*RUNS["dpzo"], "logger=wandb"])
    runs = sorted((tmp_path / "interrupted" / "wandb").glob("offline-run-*"))
    assert len(runs) == 2 and len({r.name.rsplit("-", 1)[-1] for r in runs}) == 1  # two sessions, one run id
    assert resumed["status"] == "completed"


def test_sigkill_at_any_point_then_resume_equals_uninterrupted(tmp_path):
    """A real process killed with SIGKILL (possibly while writing a checkpoint), resumed from its folder."""
    args = ["model=opt-tiny", "task=sst2", "method=dpzo", "privacy=eps2", "trainer.max_steps=40",
            "checkpoint.every_n_steps=1", "logger=none", "trainer.limit_val_batches=1", "trainer.limit_test_batches=2",
            "method.batch_size=4", "trainer.enable_progress_bar=false", "task.num_train=24", "task.num_dev=8",
            "task.num_test=16"]
    env = {**os.environ, "DPFT_LOG_DIR": str(tmp_path / "logs")}

    def cli(folder: Path) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, "-m", "dpft.train", *args, f"hydra.run.dir={folder}"], env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)

    killed = tmp_path / "killed"
    proc = cli(killed)
    deadline = time.time() + 240
    while not (killed / "checkpoints" / LAST).exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (killed / "results.json").exists(), "the run finished before it could be killed"
    whole, again = cli(tmp_path / "whole"), cli(killed)
    assert whole.wait() == 0 and again.wait() == 0, again.stderr.read()[-2000:]
    a, b = (json.loads((f / "results.json").read_text()) for f in (tmp_path / "whole", killed))
    assert b["resume"]["resumed_from"] and a["trainable_parameters_sha256"] == b["trainable_parameters_sha256"]
    assert a["metrics"] == b["metrics"] and a["privacy"]["epsilon_spent"] == b["privacy"]["epsilon_spent"]


class Requeued(Exception):
    """What submitit's SIGUSR2 handler does after requeuing the job: it ends the process."""


class SignalAt(L.Callback):
    def __init__(self, step: int):
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGUSR2)


def test_a_time_limit_signal_checkpoints_the_step_then_hands_over_to_submitit(tmp_path, monkeypatch):
    """Slurm warns a job before its time limit with SIGUSR2; submitit's handler requeues the job and exits.
    The checkpoint is written at the end of the signalled step first, and the requeued run resumes from it."""
    calls = []

    def submitit_handler(signum, frame):
        calls.append(signum)
        raise Requeued

    whole = run(_cfg(tmp_path, "whole", *RUNS["dpzo"]))
    original = dpft.train.build_trainer
    monkeypatch.setattr(dpft.train, "build_trainer", lambda cfg, output_dir, logger, callbacks, **kw: original(
        cfg, output_dir, logger, [*callbacks, SignalAt(2)], **kw))
    previous = signal.signal(signal.SIGUSR2, submitit_handler)
    try:
        cfg = _cfg(tmp_path, "requeued", *RUNS["dpzo"])
        with pytest.raises(Requeued):
            run(cfg)
        assert calls == [signal.SIGUSR2]
        assert signal.getsignal(signal.SIGUSR2) is submitit_handler  # handed back
    finally:
        signal.signal(signal.SIGUSR2, previous)
    dpft.train._finish_wandb(exit_code=1)
    ckpt = Path(cfg.paths.output_dir) / "checkpoints" / LAST
    assert torch.load(ckpt, weights_only=False, map_location="cpu")["global_step"] == 3  # not a multiple of 2
    monkeypatch.setattr(dpft.train, "build_trainer", original)
    resumed = run(_cfg(tmp_path, "requeued", *RUNS["dpzo"]))
    assert resumed["resume"]["from_step"] == 3
    assert resumed["trainable_parameters_sha256"] == whole["trainable_parameters_sha256"]
    assert resumed["privacy"] == whole["privacy"]


# --- checkpoint files ------------------------------------------------------------------------------
def test_a_crash_while_writing_leaves_the_last_checkpoint_intact(tmp_path, monkeypatch):
    io, path = AtomicCheckpointIO(), tmp_path / LAST
    io.save_checkpoint({"global_step": 2, "w": torch.ones(3)}, path)

    def half_written(obj, handle):
        handle.write(b"PK\x03\x04 truncated")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", half_written)
    with pytest.raises(OSError, match="disk full"):
        io.save_checkpoint({"global_step": 4, "w": torch.zeros(3)}, path)
    monkeypatch.undo()
    assert torch.load(path, weights_only=False)["global_step"] == 2


# --- the ledger and the budget ---------------------------------------------------------------------
def _spec(steps: int = 10, **kwargs):
    return make_spec("gaussian", "pld", 2.0, 1e-5, dataset_size=1000, expected_batch_size=50, steps=steps, clip=1.0,
                     **kwargs)


def test_ledger_state_round_trips_and_refuses_another_statement():
    ledger = PrivacyLedger(_spec())
    for _ in range(4):
        ledger.step()
    restored = PrivacyLedger(_spec())
    restored.load_state_dict(ledger.state_dict())
    assert restored.steps == 4 and restored.epsilon_spent() == ledger.epsilon_spent() > 0
    with pytest.raises(PrivacyStatementMismatch, match="steps: 10 -> 20"):
        PrivacyLedger(_spec(steps=20)).load_state_dict(ledger.state_dict())


def test_more_steps_than_the_calibration_allows_are_refused_before_the_first_step(tmp_path, monkeypatch):
    calibrate = dpft.train.calibrate

    def for_fewer_steps(cfg, n):  # a statement calibrated for 2 steps, a trainer asked for 6
        spec = calibrate(cfg, n)
        return make_spec(spec.mechanism, spec.accountant, spec.target_epsilon, spec.target_delta, n,
                         spec.expected_batch_size, 2, spec.clip)

    monkeypatch.setattr(dpft.train, "calibrate", for_fewer_steps)
    cfg = _cfg(tmp_path, "run", *RUNS["dpzo"])
    with pytest.raises(BudgetExceededError, match="asks for 6 more private steps.*has 2 left; no step was taken"):
        run(cfg)
    assert not (Path(cfg.paths.output_dir) / "checkpoints").exists()


# --- secure noise ----------------------------------------------------------------------------------
def test_secure_noise_has_the_calibrated_std_and_no_reproducible_state():
    draws = NoiseSource("gaussian", seed=0, secure=True).sample(2.0, (40_000,))
    assert draws.std().item() == pytest.approx(2.0, rel=0.02) and abs(draws.mean().item()) < 0.05
    again = NoiseSource("gaussian", seed=0, secure=True).sample(2.0, (40_000,))
    assert not torch.equal(draws, again)  # independent of the seed
    seeded = NoiseSource("gaussian", seed=0)
    assert torch.equal(seeded.sample(1.0, (5,)), NoiseSource("gaussian", seed=0).sample(1.0, (5,)))
    assert "generator" not in NoiseSource("gaussian", seed=0, secure=True).state_dict()
    in_place = torch.zeros(40_000)
    NoiseSource("gaussian", seed=0, secure=True).add_to([in_place], [2.0])
    assert in_place.std().item() == pytest.approx(2.0, rel=0.02) and not torch.equal(in_place, draws)
    laplace = NoiseSource("laplace", seed=0, secure=True).sample(1.5, (40_000,))
    assert laplace.abs().mean().item() == pytest.approx(1.5, rel=0.03)


class RecordBatches(L.Callback):
    def __init__(self):
        self.batches = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.batches.append([ex.uid for ex in batch["examples"]])


def test_secure_mode_draws_its_own_sample_and_noise_in_every_run(tmp_path, monkeypatch):
    original, seen = dpft.train.build_trainer, {}

    def recording(cfg, output_dir, logger, callbacks, **kwargs):
        seen[output_dir.name] = RecordBatches()
        return original(cfg, output_dir, logger, [*callbacks, seen[output_dir.name]], **kwargs)

    monkeypatch.setattr(dpft.train, "build_trainer", recording)
    default = run(_cfg(tmp_path, "default", *RUNS["dpzo"]))
    secure = [run(_cfg(tmp_path, f"secure{i}", *RUNS["dpzo"], "privacy.secure_mode=true")) for i in (0, 1)]
    assert seen["default"].batches != seen["secure0"].batches != seen["secure1"].batches
    digests = {r["trainable_parameters_sha256"] for r in [default, *secure]}
    assert len(digests) == 3  # different noise in every run
    assert secure[0]["privacy"]["secure_mode"] and secure[0]["privacy"]["epsilon_spent"] == \
        default["privacy"]["epsilon_spent"]


def test_secure_mode_charges_the_steps_lost_in_a_crash(tmp_path, monkeypatch):
    """Checkpoint at step 4, crash before step 6: step 5 ran after the checkpoint with noise that cannot be
    replayed, so it stays charged."""
    resumed = _crash_then_resume(tmp_path, monkeypatch, [*RUNS["dpzo"], "privacy.secure_mode=true"], crash_at=5,
                                 resume_overrides=["checkpoint.every_n_steps=100"])
    # steps 1..5 started before the crash (step 5 ran after the step-4 checkpoint): 1 step charged again
    assert resumed["resume"]["lost_steps_charged"] == 1
    assert resumed["privacy"]["steps"] == STEPS and resumed["cost"]["steps"] == STEPS - 1  # ended one step early
    assert resumed["privacy"]["epsilon_spent"] <= resumed["privacy"]["target_epsilon"]


# --- faults in a sweep -----------------------------------------------------------------------------
def test_a_sweep_with_a_failing_cell_completes_and_reports_it(tmp_path):
    from dpft.report.collect import report

    sweep = tmp_path / "sweep"
    out = subprocess.run(
        [sys.executable, "-m", "dpft.train", "--multirun", "model=opt-tiny", "task=sst2", "method=ft",
         "method.lr=1e-4,1e30", "trainer.max_steps=3", "method.batch_size=4", "logger=none",
         "trainer.limit_val_batches=1", "trainer.limit_test_batches=1", "trainer.enable_progress_bar=false",
         "task.num_train=24", "task.num_dev=8", "task.num_test=16", f"hydra.sweep.dir={sweep}"],
        env={**os.environ, "DPFT_LOG_DIR": str(tmp_path / "logs")}, capture_output=True, text=True, timeout=300)
    assert out.returncode != 0  # Hydra re-raises the failure once every job has run
    cells = {r["config"]["method"]["lr"]: r for r in map(json.loads, map(Path.read_text, sweep.rglob("results.json")))}
    assert sorted(cells) == [1e-4, 1e30]
    diverged = cells[1e30]
    assert diverged["status"] == "failed" and diverged["error"]["type"] == "NonFiniteLossError"
    assert "lower method.lr" in diverged["error"]["message"]
    assert cells[1e-4]["status"] == "completed"
    result = report(sweep)
    assert len(result.cells) == 1 and math.isfinite(result.cells[0].mean)
    assert len(result.failed) == 1 and "failed (sst2 / opt-tiny / ft / ε=∞): NonFiniteLossError" in \
        result.failed[0]["error"]


def test_a_private_run_whose_weights_diverge_is_recorded_as_failed(tmp_path):
    """Private steps bound every non-finite per-example value, so a diverging run would otherwise end "completed"."""
    cfg = _cfg(tmp_path, "diverged", "method=dpsgd", "privacy=eps2", "method.optimizer=sgd", "method.lr=1e38",
               "method.clip=100", "trainer.max_steps=3", "logger=none")
    with pytest.raises(FloatingPointError, match="training diverged.*lower method.lr"):
        run(cfg)
    failed = json.loads((Path(cfg.paths.output_dir) / "results.json").read_text())
    assert failed["status"] == "failed" and failed["error"]["type"] == "NonFiniteLossError"
