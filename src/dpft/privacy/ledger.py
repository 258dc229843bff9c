"""The privacy ledger: stepped once per optimisation step, checkpointable, never past the budget."""

from __future__ import annotations

import json
import os
from dataclasses import MISSING, asdict, fields
from pathlib import Path
from typing import Any

from dpft.privacy.accounting import PrivacySpec


class BudgetExceededError(RuntimeError):
    pass


class PrivacyStatementMismatch(ValueError):
    """A checkpoint written under one privacy statement resumed under another."""


def statement_differences(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """`key: saved -> current` for every field of two PrivacySpec dicts that differs (a field added since the
    checkpoint was written counts as its default, which is what the checkpoint's run did)."""
    defaults = {f.name: f.default for f in fields(PrivacySpec) if f.default is not MISSING}
    saved = {**{k: v for k, v in defaults.items() if k in current}, **saved}
    return [f"{key}: {saved.get(key)!r} -> {current.get(key)!r}"
            for key in sorted(set(saved) | set(current)) if saved.get(key) != current.get(key)]


class PrivacyLedger:
    """Counts the private steps of a run against its `PrivacySpec` (calibrated for `spec.steps` steps).

    `step()` is called before the step's data are touched; it refuses step `spec.steps + 1`, so the
    spent ε never exceeds the target. ε spent is computed on demand from (σ, q, steps, δ).

    With a `journal` file, every step is written there (atomically) before it runs: a write-ahead record
    that survives a crash between checkpoints. Secure-mode runs charge such lost steps on resume, since
    their noise cannot be replayed (see `dpft.checkpointing`).
    """

    def __init__(self, spec: PrivacySpec, journal: Path | None = None):
        self.spec = spec
        self.steps = 0
        self.journal = journal

    def step(self) -> None:
        if self.steps >= self.spec.steps:
            raise BudgetExceededError(
                f"privacy budget exhausted: the noise was calibrated for {self.spec.steps} steps at "
                f"ε={self.spec.target_epsilon}, δ={self.spec.target_delta}; step {self.steps + 1} would exceed it. "
                "Raise trainer.max_steps before training (the noise is then calibrated for more steps).")
        self.steps += 1
        if self.journal is not None:
            write_journal(self.journal, self.steps, asdict(self.spec))

    def remaining(self) -> int:
        return self.spec.steps - self.steps

    def epsilon_spent(self, accountant: str | None = None) -> float | None:
        return self.spec.epsilon(self.steps, accountant)

    def report(self) -> dict[str, Any]:
        """The results.json privacy block."""
        spec = self.spec
        block = {
            "target_epsilon": spec.target_epsilon,
            "target_delta": spec.target_delta,
            "epsilon_spent": self.epsilon_spent(),
            "noise_multiplier": spec.noise_multiplier,
            "step_noise_multiplier": spec.step_noise_multiplier,
            "sample_rate": spec.sample_rate,
            "expected_batch_size": spec.expected_batch_size,
            "dataset_size": spec.dataset_size,
            "steps": self.steps,
            "budget_steps": spec.steps,
            "clip": spec.clip,
            "directions": spec.directions,
            "mechanism": spec.mechanism,
            "accountant": spec.accountant,
            "adjacency": spec.adjacency,
            "convention": spec.convention,
            "local": spec.local,
            "sampling": spec.sampling,
            "secure_mode": spec.secure_mode,
            "randomness": ("OS CSPRNG: the sampling seed is a secret kept in the run's checkpoint only, noise is "
                           "never replayed" if spec.secure_mode else
                           "seeded from `seed` (reproducible: the guarantee assumes the sampling and noise seeds "
                           "stay secret, which a published seed does not give: use secure mode to release)"),
            "large_delta_allowed": spec.large_delta_allowed,
            "covers": "the trainable weights and the privatised values logged in training (ε spent, noise scales, "
                      "noised (projected) gradients or updates); evaluation on the dev and test splits is not "
                      "training data",
            "not_covered": "cost.* (time and peak memory vary with the sampled batch sizes) and anything under "
                           "nonprivate_releases (privacy.diagnostics=true)",
        }
        if spec.mechanism == "gaussian":
            block["epsilon_rdp"] = self.epsilon_spent("rdp")
            block["epsilon_pld"] = self.epsilon_spent("pld")
        else:
            block["epsilon_pld"] = self.epsilon_spent("pld")
            block["comparison_delta"] = spec.comparison_delta
        return block

    def state_dict(self) -> dict[str, Any]:
        return {"spec": asdict(self.spec), "steps": self.steps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        changed = statement_differences(state["spec"], asdict(self.spec))
        if changed:
            raise PrivacyStatementMismatch(
                "the checkpoint was written under another privacy statement (" + "; ".join(changed) + "). "
                "Resume with the privacy, method and data settings it was started with, or start a new run.")
        self.steps = int(state["steps"])


def write_journal(path: Path, steps: int, spec: dict[str, Any]) -> None:
    """`{"steps_started": steps, "spec": ...}`, replaced atomically and flushed to disk."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as handle:
        json.dump({"steps_started": steps, "spec": spec}, handle)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def read_journal(path: Path) -> dict[str, Any] | None:
    return json.loads(path.read_text()) if path.is_file() else None
