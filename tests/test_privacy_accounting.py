"""Calibration, accounting and the ledger, checked against independent dp-accounting computations."""

from __future__ import annotations

import math
from dataclasses import asdict, fields

import dp_accounting as dpa
import pytest
from dp_accounting import pld, rdp

from dpft.privacy import accounting
from dpft.privacy.accounting import (
    PLD_DISCRETIZATION,
    PrivacyConfigError,
    PrivacySpec,
    amplified_pure_epsilon,
    calibrate_gaussian,
    calibrate_laplace,
    composed_epsilon,
    gaussian_epsilon,
    laplace_pld_epsilon,
    laplace_pure_epsilon,
    make_spec,
)
from dpft.privacy.ledger import (
    BudgetExceededError,
    PrivacyLedger,
    PrivacyStatementMismatch,
    read_journal,
    statement_differences,
)


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


# --- the ledger on a given statement (no calibration: σ is an input here) ---------------------------------
def _statement(mechanism: str = "gaussian", steps: int = 10, sigma: float = 2.0, **changes) -> PrivacySpec:
    laplace = mechanism == "laplace"
    values = dict(mechanism=mechanism, accountant="basic" if laplace else "pld", target_epsilon=3.0,
                  target_delta=0.0 if laplace else 1e-5, sample_rate=0.05, expected_batch_size=5.0,
                  dataset_size=100, steps=steps, clip=0.5, directions=1, noise_multiplier=sigma,
                  step_noise_multiplier=sigma)
    return PrivacySpec(**{**values, **changes})


def test_the_report_restates_the_whole_statement_and_the_steps_spent():
    """A reader rebuilds the run's PrivacySpec from the results.json block alone (`steps` there are the steps
    spent, `budget_steps` the calibrated budget), and the steps and ε agree with the ledger's count."""
    for spec in (_statement(), _statement("laplace", secure_mode=True, large_delta_allowed=True, directions=2,
                                          comparison_delta=1e-6, adjacency="replace one", sampling="Poisson*")):
        ledger = PrivacyLedger(spec)
        for _ in range(3):
            ledger.step()
        report = ledger.report()
        rebuilt = {f.name: report["budget_steps" if f.name == "steps" else f.name] for f in fields(PrivacySpec)
                   if f.name in report or f.name == "steps"}
        assert PrivacySpec(**rebuilt) == spec == PrivacySpec(**spec.as_dict())
        assert report["steps"] == 3 and ledger.remaining() == spec.steps - 3
        assert {"epsilon_spent", "epsilon_pld", "randomness", "covers", "not_covered"} <= set(report)


def test_a_gaussian_ledger_reports_the_epsilon_of_its_accountant_and_of_the_other():
    spec = _statement(accountant="rdp", sigma=1.5, steps=30)
    ledger = PrivacyLedger(spec)
    for _ in range(12):
        ledger.step()
    report = ledger.report()
    independent = {a: _independent_epsilon(1.5, spec.sample_rate, 12, spec.target_delta, a) for a in ("pld", "rdp")}
    assert report["epsilon_spent"] == report["epsilon_rdp"] == pytest.approx(independent["rdp"], rel=1e-9)
    assert report["epsilon_pld"] == pytest.approx(independent["pld"], rel=1e-9)
    assert "comparison_delta" not in report


def test_the_report_says_where_the_randomness_came_from():
    seeded, secure = (PrivacyLedger(_statement(secure_mode=s)).report()["randomness"] for s in (False, True))
    assert "CSPRNG" in secure and "seeded" not in secure
    assert "seeded" in seeded and "CSPRNG" not in seeded


def test_a_laplace_ledger_reports_its_pure_epsilon_and_the_pld_epsilon_of_the_same_run():
    spec = _statement("laplace", steps=20, sigma=4.0, comparison_delta=1e-6)
    ledger = PrivacyLedger(spec)
    for _ in range(7):
        ledger.step()
    report = ledger.report()
    q, b = spec.sample_rate, spec.noise_multiplier
    assert report["epsilon_spent"] == pytest.approx(7 * math.log1p(q * math.expm1(1 / b)), rel=1e-12)
    acc = pld.PLDAccountant(value_discretization_interval=PLD_DISCRETIZATION)
    acc.compose(dpa.SelfComposedDpEvent(dpa.PoissonSampledDpEvent(q, dpa.LaplaceDpEvent(b)), 7))
    assert report["epsilon_pld"] == pytest.approx(acc.get_epsilon(1e-6), rel=1e-9)
    assert report["comparison_delta"] == 1e-6 and "epsilon_rdp" not in report


def test_zero_steps_spend_nothing_and_one_step_spends_one_amplified_release():
    q, b = 0.05, 2.0
    assert laplace_pure_epsilon(b, q, 0) == laplace_pld_epsilon(b, q, 0, 1e-5) == 0.0
    assert laplace_pure_epsilon(b, q, 1, directions=3) == pytest.approx(math.log1p(q * math.expm1(3 / b)), rel=1e-12)
    acc = pld.PLDAccountant(value_discretization_interval=PLD_DISCRETIZATION)
    acc.compose(dpa.SelfComposedDpEvent(dpa.PoissonSampledDpEvent(q, dpa.LaplaceDpEvent(b)), 1))
    assert laplace_pld_epsilon(b, q, 1, 1e-5) == pytest.approx(acc.get_epsilon(1e-5), rel=1e-9)


@pytest.mark.parametrize("directions", [1, 2, 3])
def test_laplace_calibration_never_overshoots_where_the_closed_form_rounds_up(directions):
    """The closed-form scale of these requests spends a few ulps more than the target in floating point."""
    for epsilon, q, steps in [(0.1, 0.01, 3), (0.5, 0.01, 1), (0.1, 0.05, 100), (2.0, 0.3, 7), (8.0, 1.0, 10),
                              (1.0, 0.016, 1000), (4.0, 0.1, 1)]:
        scale = calibrate_laplace(epsilon, q, steps, directions)
        spent = steps * math.log1p(q * math.expm1(directions / scale))
        assert spent <= epsilon and spent == pytest.approx(epsilon, rel=1e-12)


def test_the_budget_is_the_calibrated_step_count_and_the_refusal_names_the_step():
    ledger = PrivacyLedger(_statement(steps=4))
    for done in range(4):
        assert ledger.remaining() == 4 - done
        ledger.step()
    with pytest.raises(BudgetExceededError, match="calibrated for 4 steps.*step 5 would exceed it"):
        ledger.step()
    assert ledger.steps == 4 and ledger.remaining() == 0


def test_every_step_is_journaled_before_it_runs(tmp_path):
    journal = tmp_path / "not" / "yet" / "there" / "journal.json"
    spec = _statement()
    ledger = PrivacyLedger(spec, journal=journal)
    assert read_journal(journal) is None
    for done in (1, 2, 3):
        ledger.step()
        assert read_journal(journal) == {"steps_started": done, "spec": asdict(spec)}
        assert [p.name for p in journal.parent.iterdir()] == ["journal.json"]  # replaced whole, no leftover
    assert not list(tmp_path.rglob("*.tmp"))


def test_a_statement_differs_in_every_field_that_either_side_has():
    assert statement_differences({"clip": 1.0, "steps": 5}, {"clip": 1.0, "steps": 5}) == []
    assert statement_differences({"clip": 1.0}, {"clip": 2.0, "secure_mode": True}) == [
        "clip: 1.0 -> 2.0", "secure_mode: False -> True"]  # a field the checkpoint predates: its default
    assert statement_differences({"clip": 1.0, "old_field": 3}, {"clip": 1.0}) == ["old_field: 3 -> None"]
    ledger = PrivacyLedger(_statement())
    with pytest.raises(PrivacyStatementMismatch, match="clip: 0.5 -> 1.0"):
        PrivacyLedger(_statement(clip=1.0)).load_state_dict(ledger.state_dict())


# --- several runs on the same data --------------------------------------------------------------------------
def _gaussian_block(sigma: float, q: float, steps: int, delta: float) -> dict:
    return {"mechanism": "gaussian", "step_noise_multiplier": sigma, "sample_rate": q, "steps": steps,
            "target_delta": delta}


def test_gaussian_runs_compose_as_one_rdp_accountant_at_the_smallest_delta():
    runs = [(3.0, 0.02, 300, 1e-5), (1.5, 0.1, 40, 1e-6), (8.0, 0.5, 7, 1e-4)]
    acc = rdp.RdpAccountant()
    for sigma, q, steps, _ in runs:
        acc.compose(dpa.SelfComposedDpEvent(dpa.PoissonSampledDpEvent(q, dpa.GaussianDpEvent(sigma)), steps))
    epsilon, delta = composed_epsilon([_gaussian_block(*run) for run in runs])
    assert delta == 1e-6
    assert epsilon == pytest.approx(acc.get_epsilon(1e-6), rel=1e-9)
    # a run that took no step spends nothing, but its δ still bounds the statement
    assert composed_epsilon([_gaussian_block(2.0, 0.1, 0, 1e-7)]) == (0.0, 1e-7)


def test_pure_epsilon_runs_add_their_closed_form_and_keep_delta_zero():
    blocks = [{"mechanism": "laplace", "noise_multiplier": 4.0, "sample_rate": 0.1, "steps": 5, "directions": 2},
              {"mechanism": "laplace", "noise_multiplier": 0.5, "sample_rate": 1.0, "steps": 2, "directions": None}]
    by_hand = 5 * math.log1p(0.1 * math.expm1(2 / 4.0)) + 2 * (1 / 0.5)  # q = 1: no amplification
    epsilon, delta = composed_epsilon(blocks)
    assert epsilon == pytest.approx(by_hand, rel=1e-12) and delta == 0.0
    gaussian = _gaussian_block(3.0, 0.05, 100, 1e-5)
    mixed, mixed_delta = composed_epsilon([*blocks, gaussian])
    assert mixed == pytest.approx(by_hand + composed_epsilon([gaussian])[0], rel=1e-12) and mixed_delta == 1e-5


def test_a_non_private_run_makes_the_composition_unbounded():
    assert composed_epsilon([_gaussian_block(3.0, 0.05, 10, 1e-5), {"mechanism": "none"}]) == (math.inf, 0.0)


@pytest.mark.parametrize("block,match", [
    ({"mechanism": "exponential"}, r"privacy.mechanism='exponential' of a run is not one of \('none', 'gaussian'"),
    ({"mechanism": "gaussian", "sample_rate": 0.1, "steps": 3, "target_delta": 1e-5}, "no 'step_noise_multiplier'"),
    ({"mechanism": "gaussian", "step_noise_multiplier": 1.0, "sample_rate": 0.1, "steps": 3}, "no 'target_delta'"),
    ({"mechanism": "gaussian", "step_noise_multiplier": 1.0, "steps": 3, "target_delta": 1e-5}, "no 'sample_rate'"),
    ({"mechanism": "laplace", "noise_multiplier": 1.0, "sample_rate": 0.1, "steps": None}, "laplace run's .* no 'steps'"),
    ({"mechanism": "laplace", "sample_rate": 0.1, "steps": 2}, "no 'noise_multiplier'"),
])
def test_a_block_that_cannot_be_composed_is_refused_by_name(block, match):
    with pytest.raises(PrivacyConfigError, match=match):
        composed_epsilon([block])


# --- against the exact Gaussian mechanism (q = 1: T steps of σ are one Gaussian of σ/√T) ---------------------
def _exact_delta(epsilon: float, mu: float) -> float:
    """δ(ε) of the Gaussian mechanism whose sensitivity is μ noise standard deviations (Balle & Wang 2018, Thm 8)."""
    phi = lambda x: 0.5 * math.erfc(-x / math.sqrt(2))  # noqa: E731
    return phi(mu / 2 - epsilon / mu) - math.exp(epsilon) * phi(-mu / 2 - epsilon / mu)


def _exact_epsilon(mu: float, delta: float) -> float:
    low, high = 0.0, 100.0
    for _ in range(200):
        mid = (low + high) / 2
        low, high = (mid, high) if _exact_delta(mid, mu) > delta else (low, mid)
    return high


@pytest.mark.parametrize("epsilon,delta,steps", [(1.0, 1e-5, 1), (3.0, 1e-6, 4), (0.5, 1e-3, 9)])
def test_full_batch_calibration_meets_the_exact_gaussian_profile_and_is_tight(epsilon, delta, steps):
    for accountant in ("pld", "rdp"):
        sigma = calibrate_gaussian(epsilon, delta, 1.0, steps, accountant)
        mu = math.sqrt(steps) / sigma
        assert _exact_delta(epsilon, mu) <= delta  # never less noise than the exact analysis needs
        assert _exact_epsilon(mu, delta) <= gaussian_epsilon(sigma, 1.0, steps, delta, accountant) <= epsilon
    # PLD is within 1% of the exact σ; RDP, never tighter, may need more
    pld_sigma = calibrate_gaussian(epsilon, delta, 1.0, steps, "pld")
    assert _exact_delta(epsilon, math.sqrt(steps) / (0.99 * pld_sigma)) > delta
    assert calibrate_gaussian(epsilon, delta, 1.0, steps, "rdp") >= pld_sigma
    assert calibrate_gaussian(epsilon, delta, 1.0, steps) == pld_sigma  # PLD unless asked otherwise


@pytest.mark.parametrize("epsilon", [12.0, 20.0, 40.0])
def test_calibration_below_the_first_bracket_is_tight_too(epsilon):
    """Large ε needs σ < 1/2, below where the search starts (RDP here: it is cheap at small σ, and has no grid, so
    σ is the smallest to rel_tol = 1e-3 exactly: 0.1% less noise overshoots)."""
    sigma = calibrate_gaussian(epsilon, 1e-5, 1.0, 1, "rdp")
    assert sigma < 0.5 and _exact_delta(epsilon, 1 / sigma) <= 1e-5
    rdp_epsilon = lambda s: _independent_epsilon(s, 1.0, 1, 1e-5, "rdp")  # noqa: E731
    assert rdp_epsilon(sigma) <= epsilon < rdp_epsilon((1 - 1e-3) * sigma)


def test_a_sigma_the_reporting_grid_rejects_is_never_returned(monkeypatch):
    """Fault injection: were the reporting grid to find more ε than the search grid, calibration refuses."""
    real = accounting.gaussian_epsilon

    def stricter_when_reporting(sigma, q, steps, delta, accountant="pld", discretization=PLD_DISCRETIZATION,
                                replace_one=False):
        epsilon = real(sigma, q, steps, delta, accountant, discretization, replace_one)
        return epsilon * 1.01 if discretization == PLD_DISCRETIZATION else epsilon

    monkeypatch.setattr(accounting, "gaussian_epsilon", stricter_when_reporting)
    with pytest.raises(RuntimeError, match=r"exceeds privacy.target_epsilon=1.0: report this as a bug"):
        calibrate_gaussian(1.0, 1e-5, 1.0, 1, "pld")


def test_reported_epsilon_is_pessimistic_and_close_to_exact():
    for sigma, steps in [(1.0, 1), (2.0, 16)]:
        exact = _exact_epsilon(math.sqrt(steps) / sigma, 1e-5)
        fine = gaussian_epsilon(sigma, 1.0, steps, 1e-5)
        coarse = gaussian_epsilon(sigma, 1.0, steps, 1e-5, "pld", 1e-3)
        assert exact <= fine <= exact + 2e-3 and fine <= coarse  # the search grid rounds up further
        assert gaussian_epsilon(sigma, 1.0, steps, 1e-5, "rdp") >= exact
    assert gaussian_epsilon(1.0, 0.5, 0, 1e-5) == 0.0
    with pytest.raises(PrivacyConfigError, match="privacy.accountant='prv' is not one of"):
        gaussian_epsilon(1.0, 0.5, 3, 1e-5, "prv")


def test_a_target_below_what_any_noise_reaches_is_refused():
    with pytest.raises(PrivacyConfigError, match="unreachable"):  # ε(σ = 1e6) > 1e-9 at δ = 1e-15
        calibrate_gaussian(1e-9, 1e-15, 1.0, 1, "rdp")
    assert calibrate_gaussian(1e-3, 1e-5, 1.0, 1, "rdp") > 1e3  # reachable, with much noise


# --- the statement make_spec returns -----------------------------------------------------------------------
def test_the_statement_records_what_was_asked():
    spec = make_spec("gaussian", "rdp", 3.0, 1e-6, 50, 50, 2, clip=0.25, directions=4, secure_mode=True,
                     adjacency="replace one", sampling="Poisson*", large_delta_allowed=True)
    assert (spec.mechanism, spec.accountant, spec.target_epsilon, spec.target_delta) == ("gaussian", "rdp", 3.0, 1e-6)
    assert (spec.dataset_size, spec.expected_batch_size, spec.sample_rate, spec.steps) == (50, 50.0, 1.0, 2)
    assert (spec.clip, spec.directions, spec.secure_mode, spec.large_delta_allowed) == (0.25, 4, True, True)
    assert (spec.adjacency, spec.sampling) == ("replace one", "Poisson*")
    assert spec.step_noise_multiplier == calibrate_gaussian(3.0, 1e-6, 1.0, 2, "rdp")
    assert spec.noise_multiplier == pytest.approx(2 * spec.step_noise_multiplier)
    default = make_spec("gaussian", "pld", 3.0, 1e-6, 50, 50, 2, clip=1.0)
    assert (default.secure_mode, default.large_delta_allowed, default.adjacency, default.sampling) == (
        False, False, "add/remove one example", "Poisson")


def test_a_laplace_statement_spends_its_pure_epsilon_by_basic_composition():
    spec = make_spec("laplace", "pld", 2.0, 0.0, 200, 10, 30, clip=1.0, directions=3)
    q = 10 / 200
    assert spec.accountant == "basic" and spec.sample_rate == q
    assert spec.noise_multiplier == spec.step_noise_multiplier
    spent = 30 * math.log1p(q * math.expm1(3 / spec.noise_multiplier))  # ε₀ = K·C/b per step, amplified, composed
    assert spent <= 2.0 and spent == pytest.approx(2.0, rel=1e-9)
    assert spec.epsilon(30) == spec.epsilon(30, "rdp") == pytest.approx(spent, rel=1e-12)
    assert spec.epsilon(30, "pld") is None  # the PLD comparison covers one direction only
    one = make_spec("laplace", "pld", 2.0, 0.0, 200, 10, 30, clip=1.0)
    acc = pld.PLDAccountant(value_discretization_interval=PLD_DISCRETIZATION)
    acc.compose(dpa.SelfComposedDpEvent(dpa.PoissonSampledDpEvent(q, dpa.LaplaceDpEvent(one.noise_multiplier)), 30))
    assert one.epsilon(30, "pld") == pytest.approx(acc.get_epsilon(one.comparison_delta), rel=1e-9)


@pytest.mark.parametrize("args,match", [
    (("exponential", "pld", 2.0, 1e-5), "privacy.mechanism='exponential' is not one of"),
    (("laplace", "pld", 2.0, 1e-5), "pure ε-DP .* target_delta = 0"),
    (("gaussian", "pld", math.inf, 1e-5), "target_epsilon must be a finite number"),
    (("gaussian", "pld", "2", 1e-5), "target_epsilon must be a finite number"),
])
def test_a_request_without_a_meaning_is_refused(args, match):
    with pytest.raises(PrivacyConfigError, match=match):
        make_spec(*args, dataset_size=100, expected_batch_size=10, steps=5, clip=1.0)
    assert make_spec("gaussian", "pld", 2.0, 1e-5, 1, 1, 1, clip=1.0).sample_rate == 1.0  # one example, q = 1
    for kwargs, key in [({"dataset_size": 0}, "non-empty training set"), ({"directions": 0}, "method.directions"),
                        ({"expected_batch_size": 0}, "sample rate")]:
        with pytest.raises(PrivacyConfigError, match=key):
            make_spec(**{**dict(mechanism="gaussian", accountant="pld", target_epsilon=2.0, target_delta=1e-5,
                                dataset_size=100, expected_batch_size=10, steps=5, clip=1.0), **kwargs})


def test_rdp_orders_that_do_not_converge_are_not_logged(capfd, caplog):
    """dp-accounting warns per unconverged order (absl); the filter drops those lines only, the ε is unchanged."""
    import logging

    from dpft.privacy.accounting import gaussian_epsilon

    with caplog.at_level(logging.WARNING):
        eps = gaussian_epsilon(0.897705, 0.064, 3, 1e-5, "rdp")
        logging.getLogger("absl").warning("another absl warning")
    accountant = rdp.RdpAccountant()
    accountant.compose(dpa.PoissonSampledDpEvent(0.064, dpa.GaussianDpEvent(0.897705)), 3)
    assert eps == pytest.approx(accountant.get_epsilon(1e-5), rel=1e-9)
    text = caplog.text + "".join(capfd.readouterr())
    assert "failed to converge" not in text and "another absl warning" in text
