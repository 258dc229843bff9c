"""Privacy accounting with `dp-accounting`: one convention for the whole suite.

Adjacency: add/remove one example. Sampling: Poisson with rate q. One step releases K scalars
(or a gradient) whose per-example contribution is clipped; noise is added once to the sum.

- Gaussian (ε, δ)-DP: a step is `PoissonSampled(q, Gaussian(σ_eff))`, composed T times; K directions
  with noise multiplier σ each are one Gaussian query of L2 sensitivity C·√K, i.e. σ_eff = σ/√K.
  ε is reported by the PLD accountant (tight, pessimistic discretisation) and cross-checked by RDP.
- `convention="paper"`, DPZero's statement (Zhang et al. 2024): replace-one adjacency, under which two
  neighbours' clipped sums differ by up to 2C (PLD's replace-one Gaussian event takes σ relative to C and
  accounts the 2C itself). Sampling stays Poisson and ε comes from the PLD accountant: DPZero's code shuffles
  fixed-size batches and calibrates with Opacus's Poisson RDP, an analysis its sampling does not have, and
  dp-accounting's bound for fixed-size batches (RDP, sampling without replacement) needs about twice DPZero's
  noise at the same ε, where replace-one Poisson PLD needs about 0.9 times (docs/privacy.md). dp-accounting's
  RDP has no replace-one Poisson analysis, so such runs have no RDP cross-check.
- `local=True` (DR-Encoder's paper mode, each client noising its own upload fully): every upload is private on its
  own against a server that sees it and knows who it sampled, so replace-one (the client's data replaced) and no
  amplification by sampling: T rounds of the Gaussian at q = 1, accounted by PLD, whoever was sampled.
- Laplace pure ε-DP: a step with K directions of noise scale b is ε₀ = K·C/b-DP (L1 sensitivity K·C);
  Poisson subsampling amplifies it to ln(1 + q(e^ε₀ − 1)); T steps compose to T times that (basic
  composition). The PLD (ε, δ) of the same run is reported beside it for comparison.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from functools import lru_cache
from typing import Any

import dp_accounting as dpa
from dp_accounting import pld, rdp


class _UnconvergedOrders(logging.Filter):
    """dp-accounting's RDP accountant warns for every order α whose series fails to converge, and leaves that order
    out (ε stays a valid bound over the others): 18 such lines in one DP-LoRA run, none a user can act on."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "failed to converge" not in record.getMessage()


logging.getLogger("absl").addFilter(_UnconvergedOrders())

ACCOUNTANTS = ("pld", "rdp")
MECHANISMS = ("gaussian", "laplace")
CONVENTIONS = ("ours", "paper")  # add/remove one example (the suite's) | replace one example (DPZero's)
# PLD grid: pessimistic (never under-reports ε); 1e-4 keeps the reported ε within ~1e-3 of exact.
PLD_DISCRETIZATION = 1e-4
# Calibration searches on a 10x coarser grid (10x faster). The coarse grid contains the fine one and
# rounds losses up further, so a σ meeting the target there meets it on the reporting grid too.
PLD_SEARCH_DISCRETIZATION = 1e-3


class PrivacyConfigError(ValueError):
    """An (ε, δ, q, T) request that cannot be met or makes no sense."""


def validate_request(target_epsilon: float, target_delta: float, sample_rate: float, steps: int,
                     mechanism: str) -> None:
    if mechanism not in MECHANISMS:
        raise PrivacyConfigError(f"privacy.mechanism={mechanism!r} is not one of {MECHANISMS}")
    if not (isinstance(target_epsilon, int | float) and 0 < target_epsilon < math.inf):
        raise PrivacyConfigError(f"privacy.target_epsilon must be a finite number > 0, got {target_epsilon}")
    if mechanism == "gaussian" and not 0 < target_delta < 1:
        raise PrivacyConfigError(f"privacy.target_delta must be in (0, 1) for the Gaussian mechanism, "
                                 f"got {target_delta}")
    if mechanism == "laplace" and target_delta != 0:
        raise PrivacyConfigError(f"pure ε-DP (Laplace) has target_delta = 0, got {target_delta}")
    if not 0 < sample_rate <= 1:
        raise PrivacyConfigError(f"sample rate q = expected batch size / dataset size must be in (0, 1], "
                                 f"got {sample_rate}; lower method.batch_size")
    if steps < 1:
        raise PrivacyConfigError(f"a private run needs trainer.max_steps >= 1, got {steps}")


def gaussian_event(noise_multiplier: float, sample_rate: float, steps: int) -> dpa.DpEvent:
    return dpa.SelfComposedDpEvent(dpa.PoissonSampledDpEvent(sample_rate, dpa.GaussianDpEvent(noise_multiplier)),
                                   steps)


def pld_accountant(discretization: float = PLD_DISCRETIZATION, replace_one: bool = False) -> pld.PLDAccountant:
    relation = dpa.NeighboringRelation.REPLACE_ONE if replace_one else dpa.NeighboringRelation.ADD_OR_REMOVE_ONE
    return pld.PLDAccountant(neighboring_relation=relation, value_discretization_interval=discretization)


def _gaussian_epsilon(noise_multiplier: float, sample_rate: float, steps: int, delta: float,
                      accountant: str = "pld", discretization: float = PLD_DISCRETIZATION,
                      replace_one: bool = False) -> float:
    """ε after `steps` Poisson-subsampled Gaussian steps (σ = effective noise multiplier), under add/remove
    adjacency or, `replace_one`, replace-one (PLD whatever `accountant` says: RDP has no such analysis)."""
    if steps == 0:
        return 0.0
    if accountant == "pld" or replace_one:
        acc = pld_accountant(discretization, replace_one)
    elif accountant == "rdp":
        acc = rdp.RdpAccountant()
    else:
        raise PrivacyConfigError(f"privacy.accountant={accountant!r} is not one of {ACCOUNTANTS}")
    acc.compose(gaussian_event(noise_multiplier, sample_rate, steps))
    return float(acc.get_epsilon(delta))


# Cached by assignment, not by decorator: mutmut (`make mutants`) leaves decorated functions unmutated.
gaussian_epsilon = lru_cache(maxsize=4096)(_gaussian_epsilon)


def calibrate_gaussian(target_epsilon: float, target_delta: float, sample_rate: float, steps: int,
                       accountant: str = "pld", rel_tol: float = 1e-3, replace_one: bool = False) -> float:
    """Smallest noise multiplier (to `rel_tol`) whose ε does not exceed the target: never overshoots.

    Bisection on σ. RDP is cheap and never tighter than PLD, so it brackets the PLD search.
    """
    validate_request(target_epsilon, target_delta, sample_rate, steps, "gaussian")

    def eps(sigma: float, acc: str = accountant) -> float:
        return gaussian_epsilon(sigma, sample_rate, steps, target_delta, acc, PLD_SEARCH_DISCRETIZATION, replace_one)

    high = 1.0
    while eps(high, "rdp") > target_epsilon:
        high *= 2
        if high > 1e6:
            raise PrivacyConfigError(
                f"(ε={target_epsilon}, δ={target_delta}) is unreachable with q={sample_rate:.4g} over "
                f"{steps} steps (noise multiplier would exceed 1e6): raise privacy.target_epsilon, or lower "
                "trainer.max_steps or method.batch_size")
    low = high / 2 if accountant == "rdp" else high / 4
    while low > 1e-3 and eps(low) <= target_epsilon:
        high, low = low, low / 2
    while high - low > rel_tol * high:
        mid = (low + high) / 2
        if eps(mid) <= target_epsilon:
            high = mid
        else:
            low = mid
    # the search ran on the coarse grid; the reporting grid must agree (a real check: `python -O` drops asserts)
    if (spent := gaussian_epsilon(high, sample_rate, steps, target_delta, accountant, PLD_DISCRETIZATION,
                                  replace_one)) > target_epsilon:
        raise RuntimeError(f"calibration found σ={high:.6g} but its ε={spent:.6g} exceeds "
                           f"privacy.target_epsilon={target_epsilon}: report this as a bug")
    return high


# --- pure ε-DP (Laplace) ------------------------------------------------------------------------
def amplified_pure_epsilon(step_epsilon: float, sample_rate: float) -> float:
    """ε of a Poisson-subsampled ε₀-DP mechanism (add/remove adjacency)."""
    return math.log1p(sample_rate * math.expm1(step_epsilon))


def laplace_pure_epsilon(noise_scale_over_clip: float, sample_rate: float, steps: int, directions: int = 1) -> float:
    """Pure ε of T steps, each releasing K Laplace-noised clipped sums with scale b = `noise_scale_over_clip`·C."""
    if steps == 0:
        return 0.0
    return steps * amplified_pure_epsilon(directions / noise_scale_over_clip, sample_rate)


def calibrate_laplace(target_epsilon: float, sample_rate: float, steps: int, directions: int = 1) -> float:
    """b/C such that T amplified steps spend exactly ε (closed form, rounded up so it never overshoots)."""
    validate_request(target_epsilon, 0.0, sample_rate, steps, "laplace")
    step_epsilon = math.log1p(math.expm1(target_epsilon / steps) / sample_rate)
    scale = directions / step_epsilon
    while laplace_pure_epsilon(scale, sample_rate, steps, directions) > target_epsilon:
        scale = math.nextafter(scale, math.inf)
    return scale


def _laplace_pld_epsilon(noise_scale_over_clip: float, sample_rate: float, steps: int, delta: float) -> float:
    """(ε, δ) of the same Laplace run from the PLD accountant (K = 1), for comparison with Gaussian runs."""
    if steps == 0:
        return 0.0
    acc = pld_accountant()
    acc.compose(dpa.SelfComposedDpEvent(
        dpa.PoissonSampledDpEvent(sample_rate, dpa.LaplaceDpEvent(noise_scale_over_clip)), steps))
    return float(acc.get_epsilon(delta))


laplace_pld_epsilon = lru_cache(maxsize=1024)(_laplace_pld_epsilon)


def composed_epsilon(blocks: Iterable[Mapping[str, Any]]) -> tuple[float, float]:
    """(ε, δ) of running all these runs on the same data (each a results.json privacy block): the Gaussian
    runs, each `steps` Poisson-subsampled Gaussian steps of its step noise multiplier, compose in one RDP
    accountant (exact composition, never tighter than PLD; PLD for replace-one runs, which RDP cannot analyse)
    and δ is their smallest target δ; pure-ε (Laplace) runs add their ε (basic composition, δ = 0). A
    non-private run makes ε infinite."""
    blocks = list(blocks)
    def adjacency(block: Mapping[str, Any]) -> str:
        return "replace" if block.get("convention") == "paper" or block.get("local") else "add/remove"

    adjacencies = {adjacency(block) for block in blocks if block.get("mechanism") == "gaussian"}
    if len(adjacencies) > 1:
        raise PrivacyConfigError("runs under add/remove adjacency (privacy.convention=ours) and replace-one "
                                 "(privacy.convention=paper, local noise) bound different adjacencies: compose "
                                 "each adjacency's runs separately")
    accountant = pld_accountant(replace_one=True) if adjacencies == {"replace"} else rdp.RdpAccountant()
    pure, deltas = 0.0, []

    def field(block: Mapping[str, Any], key: str) -> Any:
        if block.get(key) is None:
            raise PrivacyConfigError(f"a {block.get('mechanism')} run's privacy block has no {key!r}: it was "
                                     "written by an older version; rerun it to have it composed")
        return block[key]

    for block in blocks:
        mechanism = block.get("mechanism")
        if mechanism == "none":
            return math.inf, 0.0
        if mechanism not in MECHANISMS:
            raise PrivacyConfigError(f"privacy.mechanism={mechanism!r} of a run is not one of "
                                     f"{('none', *MECHANISMS)}: cannot compose it")
        steps = int(field(block, "steps"))
        if mechanism == "laplace":
            pure += laplace_pure_epsilon(float(field(block, "noise_multiplier")), float(field(block, "sample_rate")),
                                         steps, int(block.get("directions") or 1))
        else:
            deltas.append(float(field(block, "target_delta")))
            if steps:
                accountant.compose(gaussian_event(float(field(block, "step_noise_multiplier")),
                                                  1.0 if block.get("local") else float(field(block, "sample_rate")),
                                                  steps))
    delta = min(deltas, default=0.0)
    return pure + (float(accountant.get_epsilon(delta)) if deltas else 0.0), delta


@dataclass(frozen=True)
class PrivacySpec:
    """What a private run promises; stored in results.json and checkpoints."""

    mechanism: str  # gaussian | laplace
    accountant: str  # pld | rdp (gaussian) or basic (laplace: basic composition of amplified pure ε)
    target_epsilon: float
    target_delta: float
    sample_rate: float
    expected_batch_size: float
    dataset_size: int
    steps: int  # the budget: the ledger refuses step steps + 1
    clip: float
    directions: int  # K scalars released per step
    # noise per released scalar/coordinate over C: Gaussian std σ, or Laplace scale b/C
    noise_multiplier: float
    # Gaussian: the multiplier of the single equivalent query per step (σ/√K), what the accountant sees
    step_noise_multiplier: float
    comparison_delta: float = 1e-5  # δ at which a Laplace run's PLD (ε, δ) is reported
    adjacency: str = "add/remove one example"
    sampling: str = "Poisson"
    convention: str = "ours"  # ours (add/remove one example) | paper (DPZero's: replace one example)
    local: bool = False  # each unit's release is private on its own: replace-one, no amplification by sampling
    secure_mode: bool = False  # sampling and noise from the OS CSPRNG instead of the seeded generators
    large_delta_allowed: bool = False  # δ ≥ 1/n, run by explicit request (privacy.allow_large_delta=true)

    def epsilon(self, steps: int, accountant: str | None = None) -> float | None:
        """ε spent after `steps` (None where the accountant cannot analyse the run)."""
        accountant = accountant or self.accountant
        if self.mechanism == "laplace":
            if accountant != "pld":
                return laplace_pure_epsilon(self.noise_multiplier, self.sample_rate, steps, self.directions)
            if self.directions != 1:
                return None
            return laplace_pld_epsilon(self.noise_multiplier, self.sample_rate, steps, self.comparison_delta)
        replace_one = self.convention == "paper" or self.local
        if replace_one and accountant != "pld":
            return None
        return gaussian_epsilon(self.step_noise_multiplier, 1.0 if self.local else self.sample_rate, steps,
                                self.target_delta, accountant, PLD_DISCRETIZATION, replace_one)

    def as_dict(self) -> dict:
        return asdict(self)


def make_spec(mechanism: str, accountant: str, target_epsilon: float, target_delta: float, dataset_size: int,
              expected_batch_size: float, steps: int, clip: float, directions: int = 1,
              secure_mode: bool = False, adjacency: str = "add/remove one example",
              sampling: str = "Poisson", large_delta_allowed: bool = False, convention: str = "ours",
              local: bool = False) -> PrivacySpec:
    """Calibrate the noise for (ε, δ, q, T) and return the run's privacy statement."""
    if dataset_size < 1:
        raise PrivacyConfigError("a private run needs a non-empty training set")
    if not clip > 0:
        raise PrivacyConfigError(f"method.clip must be > 0, got {clip}")
    if directions < 1:
        raise PrivacyConfigError(f"method.directions must be >= 1, got {directions}")
    sample_rate = expected_batch_size / dataset_size
    validate_request(target_epsilon, target_delta, sample_rate, steps, mechanism)
    check_convention(convention, mechanism, accountant, local)
    replace_one = convention == "paper" or local
    if replace_one:
        adjacency = adjacency.replace("add/remove", "replace") + (" (each upload on its own: local)" if local else "")
    if mechanism == "laplace":
        multiplier = step_multiplier = calibrate_laplace(target_epsilon, sample_rate, steps, directions)
        accountant = "basic"
    else:
        step_multiplier = calibrate_gaussian(target_epsilon, target_delta, 1.0 if local else sample_rate, steps,
                                             accountant, replace_one=replace_one)
        multiplier = step_multiplier * math.sqrt(directions)
    return PrivacySpec(mechanism=mechanism, accountant=accountant, target_epsilon=float(target_epsilon),
                       target_delta=float(target_delta), sample_rate=sample_rate,
                       expected_batch_size=float(expected_batch_size), dataset_size=dataset_size, steps=steps,
                       clip=float(clip), directions=directions, noise_multiplier=multiplier,
                       step_noise_multiplier=step_multiplier, secure_mode=bool(secure_mode),
                       adjacency=adjacency, sampling=sampling, large_delta_allowed=bool(large_delta_allowed),
                       convention=convention, local=local)


def check_convention(convention: str, mechanism: str, accountant: str, local: bool = False) -> None:
    """Refuse what a convention (or local noise) has no analysis for."""
    if convention not in CONVENTIONS:
        raise PrivacyConfigError(f"privacy.convention={convention!r} is not one of {CONVENTIONS}")
    if convention == "paper" and mechanism != "gaussian":
        raise PrivacyConfigError(f"privacy.convention=paper (replace-one) is analysed for the Gaussian mechanism "
                                 f"only, not privacy.mechanism={mechanism}: use privacy.convention=ours")
    if convention == "paper" and accountant != "pld":
        raise PrivacyConfigError(f"privacy.convention=paper (replace-one) is accounted by PLD (dp-accounting's RDP "
                                 f"has no replace-one Poisson analysis), not privacy.accountant={accountant}: set "
                                 "privacy.accountant=pld")
    if local and accountant != "pld":
        raise PrivacyConfigError(f"method.noise_placement=local (replace-one, each upload on its own) is accounted "
                                 f"by PLD (dp-accounting's RDP has no replace-one analysis), not "
                                 f"privacy.accountant={accountant}: set privacy.accountant=pld")
