"""The zeroth-order engine: MeZO, DP-ZO, DPZero, DP-ZOSO and DP-ZOPO are configurations of it.

One step with seed s and K directions z_k ~ N(0, I), each regenerated from (s, k, parameter), never stored:

    for k: θ += φz_k; ℓ⁺ = L(θ); θ -= 2φz_k; ℓ⁻ = L(θ); r_i = (ℓ⁺_i - ℓ⁻_i)/2φ; g_k = estimate(r); θ += φz_k
    θ ← θ - η/K Σ_k g_k z_k - η λ θ - η ρ (θ - θ_ref)

The last restore is folded into the update (one pass over the parameters). z is applied in chunks
(`dpft.seeding.CHUNK` entries on CPU) spread over threads; it never exists whole (memory stays that of
inference), the global RNG is never touched, and a parameter's direction depends on (step seed, parameter
name) alone, not on the other parameters (order, placement). Its generator (`z_generator`):
- "philox" (default): on CPU, entry e of the direction is Philox4x32-10 of (key, e) through Box–Muller
  (`dpft.philox`, a compiled kernel that adds it to θ in the same pass, 3× faster than torch's normal_);
  on accelerators, torch's generator of the device (as "torch");
- "torch": torch's generator of the parameter's device, reseeded per chunk from (key, chunk).

`direction=sphere` rescales each z_k to the sphere of radius √d (√d / ‖z_k‖, one more pass generating it), DPZero's
directions; the clipping and the noise do not change (they act on the scalars).

What the variants change:
- `estimate` (`GradientEstimator`): MeZO averages r_i; private estimators clip r_i (DPZero) or the raw
  difference ℓ⁺_i - ℓ⁻_i (DP-ZO; equivalently r_i to C/2φ), sum, add Gaussian or Laplace noise to the
  sum and divide by the expected batch size;
- K directions per step (each one is released, and charged to the budget);
- a coordinate mask (DP-ZOPO): only the chosen coordinates are perturbed and updated;
- a stage schedule (DP-ZOSO): stage lengths doubling, lr halving, φ shrinking, anchor θ_ref reset,
  proximal coefficient ρ.

Being an Optimizer, the step advances Lightning's `global_step`; its state (step counter, last
projected gradients, anchors, noise generator) is checkpointed.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch.optim import Optimizer

from dpft import philox
from dpft.distributed import all_reduce_sum, rank
from dpft.methods.base import MethodModule
from dpft.privacy.accounting import PrivacySpec
from dpft.privacy.ledger import PrivacyLedger
from dpft.privacy.noise import NoiseSource
from dpft.seeding import chunks, derive_seed, for_each, thread_generator

CLIP_TARGETS = ("difference", "normalized")
Z_GENERATORS = ("philox", "torch")
DIRECTIONS = ("gaussian", "sphere")


# --- projected-gradient estimators ---------------------------------------------------------------
class GradientEstimator:
    """MeZO: g = Σ_i r_i / B, with r_i = (ℓ⁺_i - ℓ⁻_i)/2φ (the mean of the per-example scalars)."""

    private = False

    def scalars(self, loss_plus: torch.Tensor, loss_minus: torch.Tensor, eps: float) -> torch.Tensor:
        return (loss_plus.double() - loss_minus.double()) / (2 * eps)

    def __call__(self, loss_plus: torch.Tensor, loss_minus: torch.Tensor, eps: float) -> float:
        r = self.scalars(loss_plus, loss_minus, eps)
        total = all_reduce_sum(torch.stack([r.sum(), r.new_tensor(float(len(r)))]))  # (Σ r_i, B) over processes
        return float(total[0] / total[1]) if total[1] else 0.0

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


class PrivateEstimator(GradientEstimator):
    """g = (Σ_i clip(r_i) + noise) / B_expected; each example moves the sum by at most the clip bound.

    `clip_target="difference"` (DP-ZO) bounds |ℓ⁺_i - ℓ⁻_i| ≤ C, i.e. |r_i| ≤ C/2φ; `"normalized"`
    (DPZero) bounds |r_i| ≤ C. Noise is N(0, (σ·bound)²) or Laplace(b = multiplier·bound) on the sum.
    Non-finite scalars (NaN, ±inf: a loss that overflowed at θ ± φz) are dropped, as in the first-order and
    federated methods: they contribute 0, so the release equals the release without them (±inf clipped to ±bound
    would move it by a full bound in a direction set by which side overflowed); counted in `nonfinite`.
    """

    private = True

    def __init__(self, clip: float, clip_target: str, noise_multiplier: float, mechanism: str,
                 expected_batch_size: float, seed: int, secure: bool = False):
        if clip_target not in CLIP_TARGETS:
            raise ValueError(f"method.clip_target={clip_target!r} is not one of {CLIP_TARGETS}")
        if not clip > 0:
            raise ValueError(f"method.clip must be > 0, got {clip}")
        self.clip, self.clip_target = clip, clip_target
        self.noise_multiplier, self.expected_batch_size = noise_multiplier, expected_batch_size
        self.noise = NoiseSource(mechanism if noise_multiplier > 0 else "none", seed, secure=secure)
        self.nonfinite = 0

    def bound(self, eps: float) -> float:
        return self.clip / (2 * eps) if self.clip_target == "difference" else self.clip

    def clipped_sum(self, loss_plus: torch.Tensor, loss_minus: torch.Tensor, eps: float) -> torch.Tensor:
        r = self.scalars(loss_plus, loss_minus, eps)
        finite = torch.isfinite(r)
        self.nonfinite += int((~finite).sum())
        bound = self.bound(eps)
        return torch.where(finite, r, 0.0).clamp(-bound, bound).sum()

    def __call__(self, loss_plus: torch.Tensor, loss_minus: torch.Tensor, eps: float) -> float:
        total = self.clipped_sum(loss_plus, loss_minus, eps)
        if self.noise_multiplier > 0 and rank() == 0:  # one draw for the global sum (see dpft.distributed)
            total = total + self.noise.sample(self.noise_multiplier * self.bound(eps))
        return float(all_reduce_sum(total) / self.expected_batch_size)

    def state_dict(self) -> dict:
        return {"noise": self.noise.state_dict(), "nonfinite": self.nonfinite}

    def load_state_dict(self, state: dict) -> None:
        self.noise.load_state_dict(state["noise"])
        self.nonfinite = int(state["nonfinite"])


class ParameterNoiseEstimator(PrivateEstimator):
    """DPGD-0th, DPZero's "direct combination" baseline (Zhang et al. 2024): each example's zeroth-order gradient
    estimate g_i = r_i z is clipped in L2, ‖g_i‖ ≤ C, i.e. |r_i| ≤ C/‖z‖, and the Gaussian noise N(0, σ²C² I_d) is
    added to the d-dimensional sum, not to its projection on z. The papers' code has none: ours. The optimizer sets
    `direction_norm` (‖z‖ of the direction as applied) before each call and calls `add_noise` after the update;
    the returned scalar (Σ clip(r_i) / B) is not private on its own and is logged only as a raw statistic."""

    noise_space = "parameters"

    def __init__(self, clip: float, noise_multiplier: float, expected_batch_size: float, seed: int,
                 secure: bool = False):
        super().__init__(clip, "normalized", noise_multiplier, "gaussian", expected_batch_size, seed, secure)
        self.direction_norm = 1.0

    def bound(self, eps: float) -> float:
        return self.clip / self.direction_norm

    def __call__(self, loss_plus: torch.Tensor, loss_minus: torch.Tensor, eps: float) -> float:
        return float(all_reduce_sum(self.clipped_sum(loss_plus, loss_minus, eps)) / self.expected_batch_size)

    def noise_std(self, lr: float, directions: int) -> float:
        """Per coordinate of the update θ -= η/K Σ_k (Σ_i clip(g_ik) + ξ_k)/B: K draws of std σC averaged, one
        draw of std ησC/(B√K) (the sum is a post-processing of the K noised releases)."""
        return lr * self.noise_multiplier * self.clip / (self.expected_batch_size * math.sqrt(directions))

    def add_noise(self, params: list[torch.Tensor], lr: float, directions: int) -> None:
        if self.noise_multiplier > 0:
            std = self.noise_std(lr, directions)
            self.noise.add_to(params, [std] * len(params))


# --- DP-ZOSO stages ------------------------------------------------------------------------------
@dataclass(frozen=True)
class StageSchedule:
    """Stage s lasts first_stage·2^s steps; at its start lr ← lr0·lr_decay^s, φ ← φ0·eps_decay^s, θ_ref ← θ."""

    first_stage: int
    lr_decay: float = 0.5
    eps_decay: float = 1.0

    def stage(self, step: int) -> int:
        # stage s covers steps [first·(2^s - 1), first·(2^{s+1} - 1))
        return int(math.floor(math.log2(step / self.first_stage + 1)))

    def starts_stage(self, step: int) -> bool:
        return step == 0 or self.stage(step) != self.stage(step - 1)


# --- the optimizer -------------------------------------------------------------------------------
class ZerothOrderSGD(Optimizer):
    """SPSA/MeZO update. `closure()` returns per-example losses [B] at the current parameters.

    `masks[i]` (flat indices into parameter i, or None for all of it) restricts perturbation and update.
    """

    def __init__(self, params, lr: float, eps: float = 1e-3, weight_decay: float = 0.0, seed: int = 0,
                 directions: int = 1, estimator: GradientEstimator | None = None,
                 masks: Sequence[torch.Tensor | None] | None = None, schedule: StageSchedule | None = None,
                 proximal: float = 0.0, param_names: Sequence[str] | None = None, z_generator: str = "philox",
                 direction: str = "gaussian"):
        if lr < 0 or eps <= 0 or directions < 1:
            raise ValueError(f"need lr >= 0, eps (perturbation scale φ) > 0 and directions >= 1; got lr={lr}, "
                             f"eps={eps}, directions={directions}")
        super().__init__(params, {"lr": lr, "eps": eps, "weight_decay": weight_decay,
                                  "initial_lr": lr, "initial_eps": eps})
        self.seed, self.directions = int(seed), int(directions)
        self.estimator = estimator or GradientEstimator()
        self.schedule, self.proximal = schedule, float(proximal)
        n_params = sum(len(g["params"]) for g in self.param_groups)
        self.masks = list(masks) if masks is not None else [None] * n_params
        if len(self.masks) != n_params:
            raise ValueError(f"{len(self.masks)} masks for {n_params} parameters")
        # a parameter's direction is seeded by its name when given (independent of order and placement)
        names = list(param_names) if param_names is not None else [str(i) for i in range(n_params)]
        if len(names) != n_params or len(set(names)) != n_params:
            raise ValueError("param_names must name each parameter once")
        self._keys = [int.from_bytes(hashlib.blake2b(n.encode(), digest_size=8).digest(), "little") for n in names]
        if z_generator not in Z_GENERATORS:
            raise ValueError(f"method.z_generator={z_generator!r} is not one of {Z_GENERATORS}")
        self.z_generator = z_generator
        if direction not in DIRECTIONS:
            raise ValueError(f"method.direction={direction!r} is not one of {DIRECTIONS}")
        self.direction, self._scales = direction, {}
        if getattr(self.estimator, "noise_space", "projection") == "parameters" and any(
                m is not None for m in self.masks):
            raise ValueError("noise on the parameters covers every coordinate: a coordinate mask has no analysis")
        if z_generator == "philox" and any(p.device.type == "cpu" for _, _, p in self._params()):
            philox.kernel()  # builds it now, or says what to change
        self.state["zo"] = {"step": 0, "projected_grads": [], "z_generator": z_generator}

    # --- directions -----------------------------------------------------------------------------
    def step_seed(self, step: int, direction: int = 0) -> int:
        return derive_seed(derive_seed(self.seed, step), direction)

    def _params(self):
        index = 0
        for group in self.param_groups:
            for p in group["params"]:
                yield index, group, p
                index += 1

    def _for_each_chunk(self, fn: Callable[[int, dict, torch.Tensor, int, slice], None]) -> None:
        """Run fn(index, group, p, c, part) on every chunk c of every parameter, spread over threads on CPU
        (`dpft.seeding.for_each`): generating z is the cost of a ZO step beyond its forwards, and each
        chunk's z comes from its own seed, so the result does not depend on the scheduling."""
        items = [(i, group, p, c, part) for i, group, p in self._params()
                 for c, part in enumerate(self._parts(p, i))]
        for_each(fn, items, sum(part.stop - part.start for *_, part in items), (p.device for _, _, p, _, _ in items))

    def _parts(self, p: torch.Tensor, index: int) -> list[slice]:
        """The chunks of parameter `index`'s z (over its masked coordinates under a mask)."""
        return chunks(p.numel() if self.masks[index] is None else self.masks[index].numel(), p.device)

    def _philox(self, p: torch.Tensor) -> bool:
        return self.z_generator == "philox" and p.device.type == "cpu"

    def _key(self, index: int, seed: int) -> int:
        """The stream of parameter `index`'s z in the step or direction with this seed."""
        return derive_seed(seed, self._keys[index])

    def _coords(self, index: int, part: slice) -> slice | torch.Tensor:
        """The coordinates of parameter `index`'s flat view that entries `part` of its z go to: `part`
        itself, or the mask's flat indices there."""
        mask = self.masks[index]
        return part if mask is None else mask[part]

    def _chunk(self, p: torch.Tensor, index: int, seed: int, c: int, part: slice) -> torch.Tensor:
        """Chunk c of parameter `index`'s z (entries `part` of it), from (seed, parameter) and, with torch's
        generator, c. z never exists whole: at most one chunk per thread beside the weights."""
        key, size = self._key(index, seed), part.stop - part.start
        if self._philox(p):
            return philox.normal_(torch.empty(size, dtype=torch.float32), key, part.start).to(p.dtype)
        gen = thread_generator(p.device, derive_seed(key, c))
        return torch.randn(size, generator=gen, device=p.device, dtype=p.dtype)

    def _add_z(self, p: torch.Tensor, index: int, seed: int, c: int, part: slice, alpha: float) -> None:
        """θ += alpha · z on chunk c; in the kernel's own pass (z not stored) where it can."""
        flat = p.view(-1)
        if self._philox(p) and p.dtype == torch.float32 and self.masks[index] is None:
            philox.add_normal_(flat[part], self._key(index, seed), part.start, alpha)
            return
        z, coords = self._chunk(p, index, seed, c, part), self._coords(index, part)
        if isinstance(coords, slice):
            flat[coords].add_(z, alpha=alpha)
        else:  # in place on the parameter itself (indexing a parameter returns a copy)
            flat.index_add_(0, coords, z, alpha=alpha)

    def _z(self, p: torch.Tensor, index: int, seed: int) -> torch.Tensor:
        """The whole z of parameter `index` (its masked coordinates under a mask), for checks and audits."""
        z = torch.cat([self._chunk(p, index, seed, c, part) for c, part in enumerate(self._parts(p, index))])
        if self.direction == "sphere":
            z = z * self.direction_scale(seed)
        return z.view(p.shape) if self.masks[index] is None else z

    def direction_scale(self, seed: int) -> float:
        """What z is multiplied by: 1 for Gaussian directions; √d / ‖z‖ for directions uniform on the sphere of
        radius √d (DPZero's), d the coordinates perturbed. ‖z‖ costs one more pass generating z (not stored)."""
        if self.direction == "gaussian":
            return 1.0
        squares, d = self._squares(seed)
        return math.sqrt(d / squares)

    def direction_norm(self, seed: int) -> float:
        """‖z‖ of the direction as applied (√d on the sphere)."""
        squares, d = self._squares(seed)
        return math.sqrt(d) if self.direction == "sphere" else math.sqrt(squares)

    def _squares(self, seed: int) -> tuple[float, int]:
        """(Σ z², d) of this step's direction `seed` before scaling, cached for the step."""
        if seed not in self._scales:
            squares: list[tuple[float, int]] = []

            def one(i: int, group: dict, p: torch.Tensor, c: int, part: slice) -> None:
                z = self._chunk(p, i, seed, c, part)  # in the parameter's dtype, as it is added
                squares.append((float(z.double().pow(2).sum()), z.numel()))

            self._for_each_chunk(one)
            self._scales[seed] = (sum(q for q, _ in squares), sum(n for _, n in squares))
        return self._scales[seed]

    def perturb(self, seed: int, scale: float) -> None:
        scale *= self.direction_scale(seed)

        @torch.no_grad()
        def one(i: int, group: dict, p: torch.Tensor, c: int, part: slice) -> None:
            self._add_z(p, i, seed, c, part, scale)

        self._for_each_chunk(one)

    def restore_and_update(self, seeds: list[int], grads: list[float]) -> None:
        """From θ - φz_K: restore the last direction and apply the whole update, in one pass. The decay and
        proximal shrink s (θ's terms in the rule) applies to θ - φz_K first, so z_K's coefficient is
        φ(1 - s) - ηg_K/K; every z_k is then added once."""
        k_last = len(seeds) - 1

        @torch.no_grad()
        def one(i: int, group: dict, p: torch.Tensor, c: int, part: slice) -> None:
            lr, eps, decay = group["lr"], group["eps"], group["weight_decay"]
            shrink, pull = lr * (decay + self.proximal), lr * self.proximal
            anchor = self.state[p].get("anchor")
            if shrink:
                self._shrink(p.view(-1), self._coords(i, part), shrink, pull,
                             None if anchor is None else anchor.view(-1)[part])
            for k, (seed, grad) in enumerate(zip(seeds, grads)):
                step = -lr * grad / len(seeds)
                coefficient = step + eps * (1 - shrink) if k == k_last else step
                self._add_z(p, i, seed, c, part, coefficient * self.direction_scale(seed))

        self._for_each_chunk(one)

    @staticmethod
    def _shrink(flat: torch.Tensor, coords: slice | torch.Tensor, shrink: float, pull: float,
                anchor: torch.Tensor | None) -> None:
        """θ ← θ(1 - η(λ+ρ)) + ηρ θ_ref on these coordinates (`anchor`: θ_ref's entries for them)."""
        values = flat[coords]  # a view for a slice, a copy for indices
        values.mul_(1.0 - shrink)
        if pull and anchor is not None:
            values.add_(anchor, alpha=pull)
        if not isinstance(coords, slice):
            flat[coords] = values

    def _start_stage(self, step: int) -> None:
        stage = self.schedule.stage(step)
        for group in self.param_groups:
            group["lr"] = group["initial_lr"] * self.schedule.lr_decay ** stage
            group["eps"] = group["initial_eps"] * self.schedule.eps_decay ** stage
        if self.proximal:
            for i, _, p in self._params():
                mask = self.masks[i]
                self.state[p]["anchor"] = (p if mask is None else p.view(-1)[mask]).detach().clone()

    # --- the step -----------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor]) -> torch.Tensor:  # type: ignore[override]
        if closure is None:
            raise ValueError("ZerothOrderSGD.step needs a closure returning per-example losses")
        state = self.state["zo"]
        if self.schedule is not None and self.schedule.starts_stage(state["step"]):
            self._start_stage(state["step"])
        eps = self.param_groups[0]["eps"]
        seeds = [self.step_seed(state["step"], k) for k in range(self.directions)]
        self._scales = {}  # this step's (Σz², d) per direction (sphere directions, DPGD-0th's clip)
        parameter_noise = getattr(self.estimator, "noise_space", "projection") == "parameters"
        grads, losses = [], []
        for k, seed in enumerate(seeds):
            self.perturb(seed, eps)
            loss_plus = closure()
            self.perturb(seed, -2 * eps)
            loss_minus = closure()
            if parameter_noise:  # clips r_i to C/‖z_k‖: ‖r_i z_k‖ ≤ C
                self.estimator.direction_norm = self.direction_norm(seed)
            grads.append(self.estimator(loss_plus, loss_minus, eps))
            losses.append((loss_plus + loss_minus) / 2)
            if k < len(seeds) - 1:
                self.perturb(seed, eps)
        self.restore_and_update(seeds, grads)
        if parameter_noise:
            for group in self.param_groups:
                self.estimator.add_noise(group["params"], group["lr"], len(seeds))
        state["step"] += 1
        state["projected_grads"] = grads
        return torch.stack(losses).mean(0)

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state["estimator"] = self.estimator.state_dict()
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state_dict = dict(state_dict)
        # checkpoints from before the option drew z with torch's generator
        saved = state_dict["state"].get("zo", {}).get("z_generator", "torch")
        if saved != self.z_generator:
            raise ValueError(f"this checkpoint's directions came from z_generator={saved!r}; resume it with "
                             f"method.z_generator={saved} (this run has {self.z_generator!r})")
        self.estimator.load_state_dict(state_dict.pop("estimator", {}))
        super().load_state_dict(state_dict)


# --- the LightningModule -------------------------------------------------------------------------
class ZerothOrder(MethodModule):
    """Two forward passes per direction, dropout off, no backward: memory = inference.

    Non-private (MeZO) without `privacy`; with a `PrivacySpec` the estimator clips and adds the
    calibrated noise, batches are Poisson-sampled and the ledger is stepped before every step.
    """

    dropout_in_training = False
    # K scalars per step, each clipped to the bound: L2 sensitivity √K·bound, L1 K·bound (both accounted)
    noise_mechanisms = ("gaussian", "laplace")
    projection_is_raw = False  # the noised projected gradient is what a step releases
    clip_targets = CLIP_TARGETS  # what `clip_target` may name (validation reads it before anything loads)
    # noise on every trainable coordinate (DPGD-0th): no coordinate masks, and one process (each would add its own)
    noise_on_parameters = False

    def __init__(self, *args: Any, eps: float = 1e-3, seed: int = 0, directions: int = 1,
                 clip: float | None = None, clip_target: str | None = None,
                 first_stage: int | None = None, lr_decay: float = 0.5, eps_decay: float = 1.0,
                 proximal: float = 0.0, mask_fraction: float | None = None, mask_queries: int = 8,
                 mask_select: str = "largest", z_generator: str = "philox", direction: str = "gaussian",
                 privacy: PrivacySpec | None = None, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.eps, self.seed, self.directions, self.z_generator = eps, seed, directions, z_generator
        self.direction = direction
        self.clip, self.clip_target = clip, clip_target
        self.schedule = StageSchedule(first_stage, lr_decay, eps_decay) if first_stage else None
        self.proximal, self.mask_fraction, self.mask_queries = proximal, mask_fraction, mask_queries
        self.mask_select = mask_select
        self.privacy = privacy
        self.ledger = PrivacyLedger(privacy) if privacy is not None else None
        self.masks: list[torch.Tensor | None] | None = None
        if privacy is not None and (privacy.clip != clip or privacy.directions != directions):
            raise ValueError("the privacy statement was calibrated for another clip / number of directions")
        if privacy is not None:
            self.check_mechanism(privacy.mechanism)

    @property
    def private(self) -> bool:
        return self.privacy is not None

    def setup(self, stage: str) -> None:
        if stage == "fit" and self.mask_fraction and self.masks is None:
            from dpft.methods.pruning import data_free_mask

            # from the model alone: no private data, so no privacy cost
            self.masks = data_free_mask(self._optimizer_order(), self.model, self.mask_fraction,
                                        queries=self.mask_queries, seed=self.seed, select=self.mask_select)

    def estimator(self) -> GradientEstimator:
        if not self.private:
            return GradientEstimator()
        return PrivateEstimator(self.clip, self.clip_target, self.privacy.noise_multiplier, self.privacy.mechanism,
                                self.privacy.expected_batch_size, seed=derive_seed(self.seed, 0x4015E),
                                secure=self.privacy.secure_mode)

    def configure_optimizers(self):
        estimator = self.estimator()
        names = {id(p): n for n, p in self.model.named_parameters()}
        if self.masks is not None:  # built in setup() or restored from a checkpoint, before the model was moved
            self.masks = [m if m is None else m.to(p.device) for m, p in zip(self.masks, self._optimizer_order())]
        return ZerothOrderSGD(self.param_groups(), lr=self.lr, eps=self.eps, weight_decay=self.weight_decay,
                              seed=self.seed, directions=self.directions, estimator=estimator, masks=self.masks,
                              schedule=self.schedule, proximal=self.proximal, z_generator=self.z_generator,
                              direction=self.direction,
                              param_names=[names[id(p)] for p in self._optimizer_order()])

    def _optimizer_order(self) -> list[torch.nn.Parameter]:
        return [p for group in self.param_groups() for p in group["params"]]

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        optimizer = self.optimizers()
        step = self.global_step
        if self.ledger is not None:
            self.ledger.step()  # refuses to go past the calibrated budget, before any data are used
        empty = not batch["examples"]

        def closure() -> torch.Tensor:
            if empty:
                self.forward_passes += 1  # counted as if run: the cost must not reveal an empty batch
                return torch.zeros(0, device=self.device)
            losses = self.per_example_losses(batch)
            if not self.private:  # private estimators drop non-finite values and count them
                self.check_finite(losses, step)
            return losses

        loss = optimizer.step(closure=closure)
        if not empty:
            self.log_raw("train/loss", loss.mean(), prog_bar=True, batch_size=1)
        # the released (in private runs: noised) projected gradient; with the noise on the parameters (DPGD-0th),
        # the clipped sum alone, a raw statistic
        projected = optimizer.optimizer.state["zo"]["projected_grads"][0]
        if self.projection_is_raw:
            self.log_raw("train/clipped_projected_grad", projected, batch_size=1)
        else:
            self.log("train/projected_grad", projected, batch_size=1)
        if self.private:
            self.log_raw("train/batch_size", float(len(batch["examples"])), batch_size=1)
        return loss.mean() if not empty else loss.new_zeros(())

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        if self.ledger is not None:
            checkpoint["privacy_ledger"] = self.ledger.state_dict()
        if self.masks is not None:
            checkpoint["zo_masks"] = self.masks

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        if self.ledger is not None:
            self.ledger.load_state_dict(checkpoint["privacy_ledger"])
        self.masks = checkpoint.get("zo_masks", self.masks)

    def privacy_block(self) -> dict[str, Any]:
        if not self.private:
            return super().privacy_block()
        block = self.ledger.report()
        block["clip_target"] = self.clip_target
        return block

    def raw_statistics(self) -> dict[str, Any]:
        estimator = self.optimizers().optimizer.estimator if self._trainer is not None else None
        return {"nonfinite_scalars": getattr(estimator, "nonfinite", 0)} if self.private else {}

    def hyperparameters(self) -> dict[str, Any]:
        out = {**super().hyperparameters(), "eps": self.eps, "zo_seed": self.seed, "directions": self.directions,
               "z_generator": self.z_generator, "direction": self.direction}
        if self.private:
            out.update(clip=self.clip, clip_target=self.clip_target)
        if self.schedule:
            out.update(first_stage=self.schedule.first_stage, lr_decay=self.schedule.lr_decay,
                       eps_decay=self.schedule.eps_decay, proximal=self.proximal)
        if self.mask_fraction and self.masks is not None:
            digest = hashlib.sha1(b"".join(m.cpu().numpy().tobytes() for m in self.masks)).hexdigest()
            out.update(mask_fraction=self.mask_fraction, mask_select=self.mask_select, mask_sha1=digest,
                       masked_coordinates=sum(int(m.numel()) for m in self.masks))
        return out


class ParameterNoiseZerothOrder(ZerothOrder):
    """DPGD-0th (`method=dpgd_zo`): the zeroth-order step with each example's gradient estimate r_i z clipped in L2
    to C and Gaussian noise on all d trainable coordinates (`ParameterNoiseEstimator`), the baseline DPZero's
    analysis compares against (its noise grows with d). Gaussian only: a Laplace release of d coordinates would need
    an L1 bound, √d·C, that no one would run. No coordinate masks, one process (the noise is drawn once)."""

    noise_mechanisms = ("gaussian",)
    projection_is_raw = True  # Σ clip(r_i)/B carries no noise: the noise is on the parameters
    clip_targets = ("gradient_l2",)
    noise_on_parameters = True

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        if self.mask_fraction:
            raise ValueError("method=dpgd_zo adds noise to every coordinate: method.mask_fraction has no analysis")
        if self.private and self.clip_target != "gradient_l2":
            raise ValueError(f"method=dpgd_zo clips each example's gradient estimate in L2 (clip_target=gradient_l2), "
                             f"got {self.clip_target!r}")

    def estimator(self) -> GradientEstimator:
        if not self.private:
            return GradientEstimator()
        return ParameterNoiseEstimator(self.clip, self.privacy.noise_multiplier, self.privacy.expected_batch_size,
                                       seed=derive_seed(self.seed, 0x4015E), secure=self.privacy.secure_mode)

    def privacy_block(self) -> dict[str, Any]:
        block = super().privacy_block()
        if self.private:
            block["noise_space"] = "parameters"
        return block
