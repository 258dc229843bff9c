"""The zeroth-order engine (MeZO's SPSA step) as a `torch.optim.Optimizer`.

One step with seed s and direction z ~ N(0, I) regenerated from s, never stored:

    θ += φz; ℓ⁺ = L(θ + φz); θ -= 2φz; ℓ⁻ = L(θ - φz); g = (ℓ⁺ - ℓ⁻) / 2φ; θ += φz - η(g z + λθ)

Restoring and updating are folded into one pass over the parameters (three generations of z,
not MeZO's four). z is drawn from a dedicated generator reseeded per parameter from
(step seed, parameter index): the global RNG is never touched, and a parameter's direction
does not depend on the others (order, device placement). Being an Optimizer, the step advances
Lightning's `global_step` and its state (step counter, last projected gradient) is checkpointed.

Variants override `projected_gradient` (what is clipped, what noise is added).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch.optim import Optimizer

from dpft.methods.base import MethodModule

_MIX = 0x9E3779B97F4A7C15  # golden-ratio constant: spreads (seed, index) pairs over the seed space
_MASK = (1 << 63) - 1


def direction_seed(step_seed: int, index: int) -> int:
    return (step_seed * _MIX + (index + 1) * 0xBF58476D1CE4E5B9) & _MASK


class ZerothOrderSGD(Optimizer):
    """SPSA/MeZO update. `closure()` returns per-example losses [B] of the current parameters."""

    def __init__(self, params, lr: float, eps: float = 1e-3, weight_decay: float = 0.0, seed: int = 0):
        if lr < 0 or eps <= 0:
            raise ValueError(f"need lr >= 0 and eps (perturbation scale φ) > 0, got lr={lr}, eps={eps}")
        super().__init__(params, {"lr": lr, "eps": eps, "weight_decay": weight_decay})
        self.seed = int(seed)
        self._generators: dict[torch.device, torch.Generator] = {}
        self.state["zo"] = {"step": 0, "projected_grad": 0.0}

    # --- directions -----------------------------------------------------------------------------
    def step_seed(self, step: int) -> int:
        return direction_seed(self.seed, step)

    def _z(self, p: torch.Tensor, seed: int) -> torch.Tensor:
        gen = self._generators.get(p.device)
        if gen is None:
            gen = self._generators[p.device] = torch.Generator(device=p.device)
        gen.manual_seed(seed)
        return torch.randn(p.shape, generator=gen, device=p.device, dtype=p.dtype)

    def _params(self):
        index = 0
        for group in self.param_groups:
            for p in group["params"]:
                yield index, group, p
                index += 1

    @torch.no_grad()
    def perturb(self, step_seed: int, scale: float) -> None:
        for i, _, p in self._params():
            p.add_(self._z(p, direction_seed(step_seed, i)), alpha=scale)

    @torch.no_grad()
    def restore_and_update(self, step_seed: int, eps: float, grad: float) -> None:
        """From θ - φz: θ ← θ + φz - η(g z + λθ), one generation of z per parameter."""
        for i, group, p in self._params():
            z = self._z(p, direction_seed(step_seed, i))
            lr, decay = group["lr"], group["weight_decay"]
            if decay:
                p.add_(z, alpha=eps)
                p.mul_(1.0 - lr * decay)
                p.add_(z, alpha=-lr * grad)
            else:
                p.add_(z, alpha=eps - lr * grad)

    # --- the step -----------------------------------------------------------------------------
    def projected_gradient(self, loss_plus: torch.Tensor, loss_minus: torch.Tensor, eps: float) -> float:
        """MeZO: (mean ℓ⁺ - mean ℓ⁻) / 2φ."""
        return float((loss_plus.double().mean() - loss_minus.double().mean()) / (2 * eps))

    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor]) -> torch.Tensor:  # type: ignore[override]
        if closure is None:
            raise ValueError("ZerothOrderSGD.step needs a closure returning per-example losses")
        state = self.state["zo"]
        eps = self.param_groups[0]["eps"]
        seed = self.step_seed(state["step"])
        self.perturb(seed, eps)
        loss_plus = closure()
        self.perturb(seed, -2 * eps)
        loss_minus = closure()
        grad = self.projected_gradient(loss_plus, loss_minus, eps)
        self.restore_and_update(seed, eps, grad)
        state["step"] += 1
        state["projected_grad"] = grad
        return (loss_plus + loss_minus) / 2


class ZerothOrder(MethodModule):
    """MeZO: two forward passes per step, dropout off, no backward. Memory = inference."""

    name = "mezo"
    dropout_in_training = False
    optimizer_class: type[ZerothOrderSGD] = ZerothOrderSGD

    def __init__(self, *args: Any, eps: float = 1e-3, seed: int = 0, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.eps, self.seed = eps, seed

    def configure_optimizers(self):
        return self.optimizer_class(self.param_groups(), lr=self.lr, eps=self.eps, seed=self.seed)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        optimizer = self.optimizers()
        step = self.global_step

        def closure() -> torch.Tensor:
            losses = self.per_example_losses(batch)
            self.check_finite(losses, step)
            return losses

        loss = optimizer.step(closure=closure).mean()
        self.log("train/loss", loss, prog_bar=True, batch_size=len(batch["examples"]))
        self.log("train/projected_grad", optimizer.optimizer.state["zo"]["projected_grad"],
                 batch_size=len(batch["examples"]))
        return loss

    def hyperparameters(self) -> dict[str, Any]:
        return {**super().hyperparameters(), "eps": self.eps, "zo_seed": self.seed}
