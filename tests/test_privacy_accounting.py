"""Calibration, accounting and the ledger, checked against independent dp-accounting computations."""

from __future__ import annotations

import math

import dp_accounting as dpa
import pytest
from dp_accounting import pld, rdp

from dpft.privacy.accounting import (
    PLD_DISCRETIZATION,
    PrivacyConfigError,
    amplified_pure_epsilon,
    calibrate_gaussian,
    calibrate_laplace,
    gaussian_epsilon,
    laplace_pld_epsilon,
    laplace_pure_epsilon,
    make_spec,
)
from dpft.privacy.ledger import BudgetExceededError, PrivacyLedger


def _independent_epsilon(sigma: float, q: float, steps: int, delta: float, accountant: str) -> float:
    acc = rdp.RdpAccountant() if accountant == "rdp" else pld.PLDAccountant(
        value_discretization_interval=PLD_DISCRETIZATION)
    acc.compose(dpa.SelfComposedDpEvent(dpa.PoissonSampledDpEvent(q, dpa.GaussianDpEvent(sigma)), steps))
    return acc.get_epsilon(delta)


def test_known_point_dpzero_roberta():
    """q = 64/1024, T = 10k, δ = 1e-5, σ ≈ 13.47 gives ε ≈ 2 under RDP (DPZero's SST-2 setting)."""
    assert gaussian_epsilon(13.47, 0.0625, 10_000, 1e-5, "rdp") == pytest.approx(2.0, abs=0.01)
    assert calibrate_gaussian(2.0, 1e-5, 0.0625, 10_000, "rdp") == pytest.approx(13.47, rel=0.005)
    # PLD is tighter: less noise for the same guarantee
    assert calibrate_gaussian(2.0, 1e-5, 0.0625, 10_000, "pld") < 13.2


@pytest.mark.parametrize("eps,q,steps,accountant", [(2.0, 0.0625, 10_000, "pld"), (6.0, 0.008, 20_000, "rdp"),
                                                    (0.5, 0.016, 1000, "pld"), (8.0, 0.5, 10, "pld")])
def test_calibration_reaches_the_target_without_overshooting(eps, q, steps, accountant):
    sigma = calibrate_gaussian(eps, 1e-5, q, steps, accountant)
    spent = _independent_epsilon(sigma, q, steps, 1e-5, accountant)
    assert spent <= eps
    # and is tight: 1% less noise would overshoot
    assert _independent_epsilon(sigma * 0.99, q, steps, 1e-5, accountant) > eps


def test_unreachable_target_fails_with_a_clear_message():
    with pytest.raises(PrivacyConfigError, match="unreachable.*target_epsilon"):
        calibrate_gaussian(1e-4, 1e-5, 0.5, 10_000)


@pytest.mark.parametrize("kwargs,match", [
    ({"target_epsilon": 0.0}, "target_epsilon"), ({"target_epsilon": -1.0}, "target_epsilon"),
    ({"target_delta": 0.0}, "target_delta"), ({"target_delta": 1.0}, "target_delta"),
    ({"expected_batch_size": 2000}, "sample rate"), ({"clip": 0.0}, "clip"), ({"steps": 0}, "max_steps"),
])
def test_invalid_requests_are_refused(kwargs, match):
    args = dict(mechanism="gaussian", accountant="pld", target_epsilon=2.0, target_delta=1e-5, dataset_size=1000,
                expected_batch_size=16, steps=100, clip=1.0)
    with pytest.raises(PrivacyConfigError, match=match):
        make_spec(**{**args, **kwargs})


def test_laplace_pure_dp_composition_and_calibration():
    q, steps = 0.016, 1000
    # amplification by Poisson subsampling, then basic composition
    assert amplified_pure_epsilon(1.0, q) == pytest.approx(math.log(1 + q * (math.e - 1)))
    scale = calibrate_laplace(4.0, q, steps)
    assert laplace_pure_epsilon(scale, q, steps) <= 4.0
    assert laplace_pure_epsilon(scale, q, steps) == pytest.approx(4.0, rel=1e-9)
    # K directions: each of the K released scalars has sensitivity C, so ε₀ = K·C/b
    assert calibrate_laplace(4.0, q, steps, directions=3) == pytest.approx(3 * scale)
    # the (ε, δ) of the same run is no larger than its pure ε
    assert laplace_pld_epsilon(scale, q, steps, 1e-5) <= 4.0


def test_k_directions_are_one_gaussian_query_of_sensitivity_c_sqrt_k():
    one = make_spec("gaussian", "pld", 2.0, 1e-5, 1000, 16, 200, clip=1.0, directions=1)
    four = make_spec("gaussian", "pld", 2.0, 1e-5, 1000, 16, 200, clip=1.0, directions=4)
    assert four.step_noise_multiplier == one.step_noise_multiplier
    assert four.noise_multiplier == pytest.approx(2 * one.noise_multiplier)


def test_ledger_epsilon_matches_an_independent_computation_and_enforces_the_budget():
    spec = make_spec("gaussian", "pld", 1.0, 1e-5, 1000, 16, 50, clip=0.05)
    ledger = PrivacyLedger(spec)
    for _ in range(20):
        ledger.step()
    report = ledger.report()
    # recompute from the logged figures only
    sigma, q, steps, delta = report["step_noise_multiplier"], report["sample_rate"], report["steps"], report[
        "target_delta"]
    assert report["epsilon_spent"] == pytest.approx(_independent_epsilon(sigma, q, steps, delta, "pld"), rel=1e-9)
    assert report["epsilon_rdp"] == pytest.approx(_independent_epsilon(sigma, q, steps, delta, "rdp"), rel=1e-9)
    assert report["epsilon_rdp"] >= report["epsilon_pld"]
    for _ in range(30):
        ledger.step()
    assert ledger.epsilon_spent() <= 1.0
    with pytest.raises(BudgetExceededError, match="trainer.max_steps"):
        ledger.step()
    assert ledger.steps == 50


def test_ledger_state_round_trips_and_refuses_another_statement():
    spec = make_spec("gaussian", "pld", 2.0, 1e-5, 1000, 16, 50, clip=1.0)
    ledger = PrivacyLedger(spec)
    for _ in range(7):
        ledger.step()
    resumed = PrivacyLedger(spec)
    resumed.load_state_dict(ledger.state_dict())
    assert resumed.steps == 7 and resumed.epsilon_spent() == ledger.epsilon_spent()
    other = PrivacyLedger(make_spec("gaussian", "pld", 2.0, 1e-5, 1000, 16, 50, clip=2.0))
    with pytest.raises(ValueError, match="clip"):
        other.load_state_dict(ledger.state_dict())
