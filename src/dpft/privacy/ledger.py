"""The privacy ledger: stepped once per optimisation step, checkpointable, never past the budget."""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

from dpft.privacy.accounting import PrivacySpec


class BudgetExceededError(RuntimeError):
    pass


class PrivacyLedger:
    """Counts the private steps of a run against its `PrivacySpec` (calibrated for `spec.steps` steps).

    `step()` is called before the step's data are touched; it refuses step `spec.steps + 1`, so the
    spent ε never exceeds the target. ε spent is computed on demand from (σ, q, steps, δ).
    """

    def __init__(self, spec: PrivacySpec):
        self.spec = spec
        self.steps = 0

    def step(self) -> None:
        if self.steps >= self.spec.steps:
            raise BudgetExceededError(
                f"privacy budget exhausted: the noise was calibrated for {self.spec.steps} steps at "
                f"ε={self.spec.target_epsilon}, δ={self.spec.target_delta}; step {self.steps + 1} would exceed it. "
                "Raise trainer.max_steps before training (the noise is then calibrated for more steps).")
        self.steps += 1

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
            "sampling": spec.sampling,
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
        if state["spec"] != asdict(self.spec):
            changed = sorted(k for k in state["spec"] if state["spec"][k] != asdict(self.spec).get(k))
            raise ValueError(f"checkpoint was written under another privacy statement (differs in {changed}); "
                             "resume with the same privacy, method and data settings")
        self.steps = int(state["steps"])
