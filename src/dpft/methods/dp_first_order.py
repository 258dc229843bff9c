"""DP-SGD / DP-AdamW (full, LoRA or head) and ANADP, on per-example gradients from `PerExampleGradients`.

The private step is split as in Opacus's DPOptimizer, so variants override one piece:

    clip_and_accumulate  p.summed_grad = Σ_i c_i ∇ℓ_i,  c_i = min(1, C/‖∇ℓ_i‖)
    add_noise            p.grad = p.summed_grad + N(0, (σC)²)   (rank 0 only under data parallelism)
    reduce               p.grad summed over data-parallel processes
    scale_grad           p.grad /= expected batch size
    then the wrapped optimizer (SGD or AdamW) steps.

ANADP (Li et al. 2024) overrides clipping and noise: parameter groups k (one per layer) are clipped
to C_k = C/√K each and get noise σ_k·C_k with Σ_k σ_k⁻² = σ⁻², so the step is exactly as private as
one Gaussian mechanism with multiplier σ (its sensitivity/noise ratios add up in quadrature to 1/σ).
σ_k follows importance scores (AdaLoRA-style moving averages of |θ·g| and of its deviation) computed
only from the already-noised gradient, so the allocation is post-processing and costs no budget.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from dpft.distributed import all_reduce_sum, rank
from dpft.methods.base import MethodModule
from dpft.privacy.accounting import PrivacySpec
from dpft.privacy.ledger import PrivacyLedger
from dpft.privacy.noise import NoiseSource
from dpft.privacy.per_example import PerExampleGradients
from dpft.seeding import derive_seed

OPTIMIZERS = {"sgd": torch.optim.SGD, "adamw": torch.optim.AdamW}


def make_optimizer(name: str, params, lr: float, **kwargs: Any) -> torch.optim.Optimizer:
    if name not in OPTIMIZERS:
        raise ValueError(f"method.optimizer={name!r} is not one of {sorted(OPTIMIZERS)}")
    return OPTIMIZERS[name](params, lr=lr, **kwargs)


class DPOptimizer:
    """Private gradient for `params` from one captured forward/backward; the wrapped optimizer steps."""

    def __init__(self, per_example: PerExampleGradients, params: list[nn.Parameter], noise_multiplier: float,
                 max_grad_norm: float, expected_batch_size: float, noise: NoiseSource):
        if not max_grad_norm > 0:
            raise ValueError(f"method.clip must be > 0, got {max_grad_norm}")
        self.per_example, self.params = per_example, params
        self.noise_multiplier, self.max_grad_norm = noise_multiplier, max_grad_norm
        self.expected_batch_size, self.noise = expected_batch_size, noise
        self.last_norms: torch.Tensor | None = None
        self.dropped = 0
        self._excluded: torch.Tensor | None = None  # this step's examples dropped for their loss

    def exclude(self, examples: torch.Tensor) -> None:
        """Drop examples (bool [B]) from this step's sums, e.g. those whose loss is not finite; counted."""
        self._excluded = examples
        self.per_example.drop(examples)
        self.dropped += int(examples.sum())

    def drop_nonfinite(self, norms: torch.Tensor) -> torch.Tensor:
        """Examples whose gradient is not finite though their loss is (an overflow in the backward) are dropped too,
        with every row they own, and counted: one NaN would otherwise make the whole clipped sum NaN. Returns them."""
        bad = ~torch.isfinite(norms)
        if bad.any():
            self.per_example.drop(bad if self._excluded is None else bad | self._excluded)
            self.dropped += int(bad.sum())
        return bad

    def clip_and_accumulate(self) -> None:
        norms = torch.stack(list(self.per_example.norms_by_layer().values())).sum(0).sqrt()
        bad = self.drop_nonfinite(norms)
        self.last_norms = torch.where(bad, 0.0, norms)
        factors = torch.where(bad, 0.0, (self.max_grad_norm / (norms + 1e-6)).clamp(max=1.0))
        self.per_example.accumulate(factors)

    def zero_sum(self) -> None:
        """An empty Poisson batch: the sum is zero, the noise is still added."""
        for p in self.params:
            p.summed_grad = torch.zeros_like(p, memory_format=torch.contiguous_format)

    def noise_std(self, p: nn.Parameter) -> float:
        return self.noise_multiplier * self.max_grad_norm

    def add_noise(self) -> None:
        """p.grad = clipped sum + N(0, std²), the noise drawn once for the global sum: by rank 0, before `reduce`."""
        if rank() == 0:
            self.noise.add_to([p.summed_grad for p in self.params], [self.noise_std(p) for p in self.params])
        for p in self.params:
            p.grad = p.summed_grad

    def reduce(self) -> None:
        """Sum over data-parallel processes (each holds the clipped sum of its share of the batch)."""
        for p in self.params:
            all_reduce_sum(p.grad)

    def scale_grad(self) -> None:
        for p in self.params:
            p.grad.div_(self.expected_batch_size)

    def pre_step(self, empty: bool) -> None:
        if empty:
            self.zero_sum()
        else:
            self.clip_and_accumulate()
            self.per_example.release()  # the activations are not needed past the clipped sum
        self.add_noise()
        self.reduce()
        self.scale_grad()
        for p in self.params:
            del p.summed_grad
        self._excluded = None

    def state_dict(self) -> dict:
        return {"noise": self.noise.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.noise.load_state_dict(state["noise"])


class AdaptiveNoiseDPOptimizer(DPOptimizer):
    """ANADP: per-group clipping C_k = C/√K, noise σ_k·C_k with Σ_k σ_k⁻² = σ⁻², σ_k from importance."""

    def __init__(self, *args: Any, beta1: float = 0.85, beta2: float = 0.85, mix: float = 0.5,
                 warmup_steps: int = 10, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.groups = [name for name, _ in self.per_example.layers]
        self.group_of = {id(p): name for name, m in self.per_example.layers for p in m.parameters(recurse=False)
                         if p.requires_grad}
        self.beta1, self.beta2, self.mix, self.warmup_steps = beta1, beta2, mix, warmup_steps
        k = len(self.groups)
        self.group_clip = self.max_grad_norm / math.sqrt(k)
        self.sensitivity = {g: 0.0 for g in self.groups}  # EMA of mean |θ·ĝ| per group
        self.uncertainty = {g: 0.0 for g in self.groups}  # EMA of |I - Ī|
        self.steps = 0
        self.sigmas = {g: self.noise_multiplier * math.sqrt(k) for g in self.groups}  # uniform to start

    def clip_and_accumulate(self) -> None:
        norms = {name: n.sqrt() for name, n in self.per_example.norms_by_layer().items()}
        total = torch.stack(list(norms.values())).pow(2).sum(0).sqrt()
        bad = self.drop_nonfinite(total)  # an example non-finite in one group is dropped from every group
        self.last_norms = torch.where(bad, 0.0, total)
        self.per_example.accumulate({name: torch.where(bad, 0.0, (self.group_clip / (n + 1e-6)).clamp(max=1.0))
                                     for name, n in norms.items()})
        # a layer that did not influence the loss has no norm entry and a zero sum

    def noise_std(self, p: nn.Parameter) -> float:
        return self.sigmas[self.group_of[id(p)]] * self.group_clip

    def allocation_weights(self) -> dict[str, float]:
        """w_k ≥ 0, Σ w_k = 1; σ_k⁻² = w_k σ⁻². Uniform during warm-up, then mixed with importance."""
        k = len(self.groups)
        if self.steps < self.warmup_steps:
            return {g: 1.0 / k for g in self.groups}
        scores = {g: self.sensitivity[g] * self.uncertainty[g] for g in self.groups}
        total = sum(scores.values())
        if not total > 0 or not math.isfinite(total):
            return {g: 1.0 / k for g in self.groups}
        return {g: (1 - self.mix) / k + self.mix * scores[g] / total for g in self.groups}

    def update_importance(self, noisy_grads: dict[int, torch.Tensor]) -> None:
        """Post-processing of the released (noised, scaled) gradient only."""
        per_group: dict[str, list[torch.Tensor]] = {g: [] for g in self.groups}
        for p in self.params:
            per_group[self.group_of[id(p)]].append((p.detach().float() * noisy_grads[id(p)].float()).abs().flatten())
        for g, values in per_group.items():
            current = float(torch.cat(values).mean())
            self.sensitivity[g] = self.beta1 * self.sensitivity[g] + (1 - self.beta1) * current
            self.uncertainty[g] = self.beta2 * self.uncertainty[g] + (1 - self.beta2) * abs(current - self.sensitivity[g])
        self.steps += 1
        weights = self.allocation_weights()
        # weights are bounded below by (1 - mix)/K > 0 after warm-up, so every σ_k is finite
        self.sigmas = {g: self.noise_multiplier / math.sqrt(w) for g, w in weights.items()}

    def pre_step(self, empty: bool) -> None:
        super().pre_step(empty)
        self.update_importance({id(p): p.grad for p in self.params})

    def state_dict(self) -> dict:
        return {**super().state_dict(), "sensitivity": self.sensitivity, "uncertainty": self.uncertainty,
                "steps": self.steps, "sigmas": self.sigmas}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.sensitivity, self.uncertainty = dict(state["sensitivity"]), dict(state["uncertainty"])
        self.steps, self.sigmas = int(state["steps"]), dict(state["sigmas"])


class DPFirstOrder(MethodModule):
    """DP-SGD / DP-AdamW with Poisson sampling; `adaptive_noise=True` gives ANADP.

    Gaussian noise only: the clipped sum is bounded in L2 (C), and per-coordinate Laplace noise would need its
    L1 sensitivity, up to √d·C."""

    noise_mechanisms = ("gaussian",)

    def __init__(self, *args: Any, privacy: PrivacySpec, clip: float = 1.0, optimizer: str = "adamw",
                 seed: int = 0, adaptive_noise: bool = False, anadp: dict | None = None, **kwargs: Any):
        super().__init__(*args, **kwargs)
        if optimizer not in OPTIMIZERS:
            raise ValueError(f"method.optimizer={optimizer!r} is not one of {sorted(OPTIMIZERS)}")
        if privacy.clip != clip:
            raise ValueError("the privacy statement was calibrated for another clip")
        self.check_mechanism(privacy.mechanism)
        self.privacy, self.clip, self.optimizer_name, self.seed = privacy, clip, optimizer, seed
        self.adaptive_noise, self.anadp_options = adaptive_noise, dict(anadp or {})
        self.ledger = PrivacyLedger(privacy)
        self.per_example = PerExampleGradients(self.model, self.trainable_parameters())  # fails early if unsupported
        self.dp: DPOptimizer | None = None
        self.sigma_history: list[dict[str, float]] = []

    def configure_optimizers(self):
        params = self.trainable_parameters()
        noise = NoiseSource(self.privacy.mechanism, derive_seed(self.seed, 0x4015E), secure=self.privacy.secure_mode)
        common = dict(noise_multiplier=self.privacy.noise_multiplier, max_grad_norm=self.clip,
                      expected_batch_size=self.privacy.expected_batch_size, noise=noise)
        if self.adaptive_noise:
            self.dp = AdaptiveNoiseDPOptimizer(self.per_example, params, **common, **self.anadp_options)
        else:
            self.dp = DPOptimizer(self.per_example, params, **common)
        return make_optimizer(self.optimizer_name, self.param_groups(), self.lr)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        optimizer = self.optimizers()
        self.ledger.step()  # before the data are touched: never past the budget
        empty = not batch["examples"]
        optimizer.zero_grad(set_to_none=True)
        loss = torch.zeros((), device=self.device)
        if empty:
            self.forward_passes += 1  # counted as if run: the cost must not reveal an empty batch
        else:
            with self.per_example.capture(len(batch["examples"]), batch.get("owner")):  # rows -> examples
                losses = self.per_example_losses(batch)
            bad = ~torch.isfinite(losses.detach())
            self.dp.exclude(bad)
            self.per_example.backward(torch.where(bad, 0.0, losses).sum())  # no loss scaling: validation refuses it
            loss = losses.detach()[~bad].mean() if (~bad).any() else loss
        self.dp.pre_step(empty)
        optimizer.step()
        if not empty:
            self.log_raw("train/loss", loss, prog_bar=True, batch_size=1)
            self.log_raw("train/grad_norm_median", self.dp.last_norms.median(), batch_size=1)
        self.log_raw("train/batch_size", float(len(batch["examples"])), batch_size=1)
        if isinstance(self.dp, AdaptiveNoiseDPOptimizer):  # from the noised gradient: post-processing
            self.sigma_history.append(dict(self.dp.sigmas))
            for g, sigma in self.dp.sigmas.items():
                self.log(f"anadp/sigma/{g}", sigma, batch_size=1)
        return loss

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["privacy_ledger"] = self.ledger.state_dict()
        checkpoint["dp_optimizer"] = {**self.dp.state_dict(), "dropped": self.dp.dropped,
                                      "sigma_history": self.sigma_history}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        self.ledger.load_state_dict(checkpoint["privacy_ledger"])
        self._pending_dp_state = checkpoint["dp_optimizer"]

    def on_fit_start(self) -> None:
        super().on_fit_start()
        if getattr(self, "_pending_dp_state", None) is not None:
            state = self._pending_dp_state
            self.dp.load_state_dict(state)
            self.dp.dropped = int(state.get("dropped", 0))
            self.sigma_history = list(state.get("sigma_history", []))

    def privacy_block(self) -> dict[str, Any]:
        block = self.ledger.report()
        if isinstance(self.dp, AdaptiveNoiseDPOptimizer):
            block["group_clip"] = self.dp.group_clip
            block["final_group_noise_multipliers"] = dict(self.dp.sigmas)
            block["group_noise_multipliers_history"] = self.sigma_history[:: max(1, len(self.sigma_history) // 100)]
        return block

    def raw_statistics(self) -> dict[str, Any]:
        return {"dropped_nonfinite_examples": self.dp.dropped if self.dp else 0}

    def hyperparameters(self) -> dict[str, Any]:
        out = {**super().hyperparameters(), "optimizer": self.optimizer_name, "clip": self.clip,
               "per_example": "book-keeping (ghost norms where cheaper)", "groups": len(self.per_example.layers)}
        if self.adaptive_noise:
            out["anadp"] = self.anadp_options
        return out
