"""Checkpoints and exact resume: a killed run continues as if it had never stopped.

What a checkpoint (`<output>/checkpoints/last.ckpt`) holds besides Lightning's own state (weights,
optimizer state, loop counters, whose global step positions the samplers): the method's privacy ledger and
noise state (written by the method modules), the global RNG states (dropout), and `dpft` metadata: the
method, the W&B run id, the privacy statement and, in secure mode, the secret sampling seed. Batches depend on
(sampling seed, step) only, so from step s the resumed run draws the same batches, directions and noise as an
uninterrupted run: in deterministic mode on CPU the final parameters are the same bits.

Privacy on resume. Default mode: steps between the last checkpoint and a crash are re-executed with the
same batches and the same noise draws, and are not charged twice. That assumes the replay computes the
same clipped sum bit for bit (deterministic kernels, as on CPU): where it differs (GPU non-determinism),
f'(D) + Z is released beside f(D) + Z and the difference is not covered; use secure mode there.
Secure mode: the sampling seed is a secret from the OS entropy source, kept only in the checkpoint (a
resumed run continues its own sample; nothing released can rebuild it), and noise is never replayed. The
ledger's write-ahead journal (beside the checkpoint) records every step before it runs; whatever journal
the run folder holds is read at the start, with or without a checkpoint, and the steps it records beyond
the checkpoint are charged: a replayed step draws fresh noise and counts as a new step, and the run ends
early enough to stay within its budget.

Checkpoints are written to a temporary file, flushed and renamed over `last.ckpt`: a crash while writing
leaves the previous checkpoint intact. They are written every `checkpoint.every_n_steps` steps and when
the job is told to stop (SIGTERM: a cluster's time limit or preemption), always between steps.
"""

from __future__ import annotations

import logging
import os
import random
import signal
import threading
from dataclasses import asdict
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig, OmegaConf

from dpft.privacy.ledger import (
    BudgetExceededError,
    PrivacyStatementMismatch,
    read_journal,
    statement_differences,
)

log = logging.getLogger("dpft")

LAST = "last.ckpt"
JOURNAL = "privacy_ledger.json"


class ResumeError(ValueError):
    """A checkpoint that this configuration cannot continue."""


class AtomicCheckpointIO(TorchCheckpointIO):
    """torch.save to `<path>.tmp`, fsync, then rename over `<path>` (atomic on POSIX file systems)."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | Path, storage_options: Any = None) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        with open(tmp, "wb") as handle:
            torch.save(checkpoint, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
        directory = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(directory)  # the rename itself survives a power loss
        finally:
            os.close(directory)


# --- finding and reading checkpoints before a run starts --------------------------------------------
def checkpoint_dir(output_dir: Path) -> Path:
    return output_dir / "checkpoints"


def find_checkpoint(cfg: DictConfig, output_dir: Path) -> Path | None:
    """`ckpt_path=...` if given (it must exist); else with `resume=auto` the output folder's last.ckpt."""
    if cfg.get("ckpt_path"):
        path = Path(cfg.ckpt_path)
        if not path.is_file():
            raise ResumeError(f"ckpt_path={cfg.ckpt_path} does not exist")
        return path
    if cfg.get("resume", "auto") not in ("auto", "never"):
        raise ResumeError(f"resume={cfg.resume!r} is not one of ('auto', 'never')")
    last = checkpoint_dir(output_dir) / LAST
    return last if cfg.get("resume", "auto") == "auto" and last.is_file() else None


def read_checkpoint(path: Path) -> dict[str, Any]:
    """The checkpoint's small entries (memory-mapped: the weights are not read)."""
    checkpoint = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
    keys = ("dpft", "privacy_ledger", "global_step")
    return {k: checkpoint[k] for k in keys if k in checkpoint}


def check_resumable(saved: dict[str, Any], cfg: DictConfig, spec: dict[str, Any] | None) -> None:
    """Refuse a checkpoint of another method, or one written under another privacy statement."""
    meta = saved.get("dpft", {})
    if meta.get("method") not in (None, cfg.method.name):
        raise ResumeError(f"the checkpoint was written by method={meta['method']}; resume it with that method "
                          f"(not method={cfg.method.name}), or start a new run")
    ledger = saved.get("privacy_ledger")
    if (ledger is None) != (spec is None):
        raise ResumeError("the checkpoint is from a " + ("non-private" if ledger is None else "private") +
                          " run; resume it with the privacy setting it was started with")
    if ledger is not None:
        changed = statement_differences(ledger["spec"], spec)
        if changed:
            raise PrivacyStatementMismatch(
                "refusing to resume: the privacy-relevant settings differ from the checkpoint's ("
                + "; ".join(changed) + "). Resume with the same privacy=, method.batch_size, method.clip, "
                "trainer.max_steps and data, or start a new run.")


# --- the callback --------------------------------------------------------------------------------------
def _rng_states() -> dict[str, Any]:
    states = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def _set_rng_states(states: dict[str, Any]) -> None:
    torch.set_rng_state(states["torch"])
    np.random.set_state(states["numpy"])
    random.setstate(states["python"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


class ResumableRun(L.Callback):
    """Writes last.ckpt every `every_n_steps` steps (None: only on SIGTERM), restores the RNG states,
    records the run's metadata, and checks the budget before the first (resumed) step.

    SIGUSR2 (what Slurm sends `signal_delay_s` before a job's time limit under submitit, which then requeues
    the job) is caught during training: the checkpoint is written at the end of the current step, then the
    signal goes to the handler that was installed before (submitit's requeue), or to the default action."""

    def __init__(self, output_dir: Path, cfg: DictConfig, every_n_steps: int | None,
                 resumed_from: Path | None = None, keep: bool = False, sampling_seed: int | None = None):
        self.directory = checkpoint_dir(output_dir)
        self.every_n_steps, self.resumed_from, self.keep = every_n_steps, resumed_from, keep
        self._saved_at = -1
        self.meta = {"method": cfg.method.name, "privacy": OmegaConf.to_container(cfg.privacy, resolve=True)}
        if sampling_seed is not None:  # secure mode's secret: in the checkpoint, nowhere released
            self.meta["sampling_seed"] = sampling_seed
        self.lost_steps_charged = 0
        self._signal: int | None = None
        self._previous_handler: Any = None

    @property
    def path(self) -> Path:
        return self.directory / LAST

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        ledger = getattr(pl_module, "ledger", None)
        # one journal per run: rank 0 writes it (every rank steps an identical ledger)
        if stage == "fit" and ledger is not None and ledger.spec.secure_mode and trainer.is_global_zero:
            ledger.journal = self.directory / JOURNAL

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit" or self._previous_handler is None:
            return
        if self._signal is None:
            signal.signal(signal.SIGUSR2, self._previous_handler)
            self._previous_handler = None
        else:  # signalled after the last step (e.g. while validating): save the finished training, then hand over
            log.warning("%s after the last step: writing %s, then handing the signal over",
                        signal.Signals(self._signal).name, self.path)
            if trainer.world_size == 1:
                self._save(trainer)
            self._hand_over_signal()

    def _on_signal(self, signum: int, frame: Any) -> None:
        self._signal = signum  # only a flag: logging is not safe inside a signal handler

    def _hand_over_signal(self) -> None:
        """After the checkpoint: what the signal would have done without us (e.g. submitit requeues and exits)."""
        signum, previous = self._signal, self._previous_handler
        signal.signal(signum, previous if previous is not None else signal.SIG_DFL)
        self._previous_handler = None
        if callable(previous):
            previous(signum, None)
        elif previous in (signal.SIG_DFL, None):
            os.kill(os.getpid(), signum)

    def _save(self, trainer: L.Trainer) -> None:
        trainer.save_checkpoint(self.path)
        self._saved_at = trainer.global_step

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        stop = self._signal is not None
        if trainer.world_size > 1:  # every process saves at the same step (saving is collective)
            stop = trainer.strategy.reduce_boolean_decision(stop, all=False)
        if stop:
            log.warning("%s: writing %s at step %d, then handing the signal over",
                        signal.Signals(self._signal).name if self._signal else "a signal on another rank",
                        self.path, trainer.global_step)
        if stop or (self.every_n_steps and trainer.global_step % self.every_n_steps == 0):
            self._save(trainer)
        if stop and self._signal is not None:
            self._hand_over_signal()

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.keep and trainer.global_step > self._saved_at:
            self._save(trainer)

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        # Lightning raises SIGTERMException at the start of a step: the state is between two steps
        if isinstance(exception, SIGTERMException) and trainer.state.fn == "fit":
            log.warning("SIGTERM: writing %s before stopping", self.path)
            self._save(trainer)

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        logger = trainer.logger
        run_id = getattr(getattr(logger, "experiment", None), "id", None) if type(logger).__name__ == \
            "WandbLogger" else None
        checkpoint["dpft"] = {**self.meta, "wandb_run_id": run_id, "rng": _rng_states()}

    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        _set_rng_states(checkpoint["dpft"]["rng"])

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # after Lightning's own signal set-up, which restores what it found at the end of fit
        if threading.current_thread() is threading.main_thread():
            self._previous_handler = signal.signal(signal.SIGUSR2, self._on_signal)
        ledger = getattr(pl_module, "ledger", None)
        if ledger is None:
            return
        # with or without a checkpoint: the steps a killed secure run took released data
        folders = {self.directory} | ({self.resumed_from.parent} if self.resumed_from is not None else set())
        journals = [(f / JOURNAL, read_journal(f / JOURNAL)) for f in sorted(folders)] if ledger.spec.secure_mode else []
        journals = [(path, j) for path, j in journals if j is not None]
        for path, journal in journals:
            changed = statement_differences(journal["spec"], asdict(ledger.spec))
            if changed:
                raise PrivacyStatementMismatch(
                    f"{path} records {journal['steps_started']} step(s) of a secure run under another privacy "
                    f"statement ({'; '.join(changed)}); they cannot be charged to this one: rerun with that "
                    "statement, or use a new output folder")
        if journals:
            started = max(j["steps_started"] for _, j in journals)
            if started > ledger.steps:
                self.lost_steps_charged = started - ledger.steps
                log.warning("secure mode: %d step(s) ran after the checkpoint and their noise cannot be replayed; "
                            "they are charged, and the run ends %d step(s) early", self.lost_steps_charged,
                            self.lost_steps_charged)
                ledger.steps = started
                trainer.fit_loop.epoch_loop.max_steps = trainer.global_step + ledger.remaining()
        planned = trainer.max_steps - trainer.global_step
        if planned > ledger.remaining():
            raise BudgetExceededError(
                f"trainer.max_steps asks for {planned} more private steps, but the budget "
                f"(ε={ledger.spec.target_epsilon}, δ={ledger.spec.target_delta}, calibrated for {ledger.spec.steps} "
                f"steps) has {ledger.remaining()} left; no step was taken. Keep trainer.max_steps as calibrated, or "
                "start a new run with the new number of steps.")
