"""The audit's statistics on synthetic scores with a known privacy level (no models)."""

from __future__ import annotations

import math
from functools import lru_cache

import numpy as np
import pytest
from scipy.stats import binomtest

from dpft.privacy.accounting import gaussian_epsilon
from dpft.privacy.audit import (
    audit_scores,
    clopper_pearson_lower,
    clopper_pearson_upper,
    epsilon_bound,
    epsilon_ceiling,
)

DELTA = 1e-5


@lru_cache
def _exact_interval(k: int, n: int, confidence: float) -> tuple[float, float]:
    """Two-sided Clopper–Pearson interval from scipy's binomial test: its ends are the one-sided bounds at
    (1 - confidence)/2 each, the levels the audit uses for TPR and FPR."""
    if n == 0:
        return 0.0, 1.0
    ci = binomtest(k, n).proportion_ci(confidence_level=confidence, method="exact")
    return ci.low, ci.high


def _epsilon(tp: int, n1: int, fp: int, n0: int, delta: float, confidence: float) -> float:
    """ε_lb written out from the two (ε, δ)-DP inequalities of the module docstring, with an independent CP."""
    tpr, fpr = _exact_interval(tp, n1, confidence)[0], _exact_interval(fp, n0, confidence)[1]
    bounds = [0.0]
    if tpr > delta:
        bounds.append(math.log((tpr - delta) / fpr))
    if 1 - fpr - delta > 0:
        bounds.append(math.log((1 - fpr - delta) / (1 - tpr)))
    return max(bounds)


def _game(rng: np.random.Generator, trials: int, shift: float, noise: str = "gaussian", scale: float = 1.0):
    """Scores of a one-dimensional mechanism: noise without the canary, noise + shift with it."""
    canary_in = rng.random(trials) < 0.5
    draw = rng.normal if noise == "gaussian" else rng.laplace
    return draw(scale=scale, size=trials) + shift * canary_in, canary_in


def test_clopper_pearson_bounds_cover_the_rate_at_their_level():
    rng = np.random.default_rng(0)
    n, rate, alpha = 60, 0.3, 0.05
    k = rng.binomial(n, rate, size=20_000)
    low, high = clopper_pearson_lower(k, n, alpha), clopper_pearson_upper(k, n, alpha)
    assert (low <= high).all()
    # exact intervals are conservative: each side misses the rate at most alpha of the time
    assert 0.01 < (low > rate).mean() <= alpha and 0.01 < (high < rate).mean() <= alpha
    assert clopper_pearson_lower(0, n, alpha) == 0.0 and clopper_pearson_upper(n, n, alpha) == 1.0
    # no successes in n trials: the upper bound solves (1 - p)^n = alpha
    assert clopper_pearson_upper(0, n, alpha) == pytest.approx(1 - alpha ** (1 / n))


@pytest.mark.parametrize("n", [1, 7, 60])
def test_clopper_pearson_bounds_are_the_exact_binomial_interval(n):
    k, alpha = np.arange(n + 1), 0.05
    low, high = zip(*(_exact_interval(int(i), n, 1 - 2 * alpha) for i in k))
    assert clopper_pearson_lower(k, n, alpha) == pytest.approx(low, rel=1e-9, abs=1e-12)
    assert clopper_pearson_upper(k, n, alpha) == pytest.approx(high, rel=1e-9, abs=1e-12)
    # one success in n trials: the lower bound solves 1 - (1 - p)^n = alpha
    assert clopper_pearson_lower(1, n, alpha) == pytest.approx(1 - (1 - alpha) ** (1 / n))


def test_epsilon_bound_is_the_larger_of_the_two_inequalities():
    cases = [
        (30, 30, 12, 30),  # every canary flagged, 40% of the rest: the second inequality gives the bound
        (25, 30, 1, 30),  # few false positives: the first one does
        (40, 40, 0, 25),  # perfectly separating
        (30, 30, 30, 30),  # flags every trial: no evidence
        (0, 30, 0, 30),  # flags none
        (15, 30, 15, 30),  # chance
    ]
    for delta in (0.0, DELTA, 0.02):
        tp, n1, fp, n0 = map(np.array, zip(*cases))
        expected = [_epsilon(*case, delta, 0.9) for case in cases]
        assert epsilon_bound(tp, n1, fp, n0, delta, 0.9) == pytest.approx(expected, rel=1e-9, abs=1e-12)
        assert min(expected[:3]) > 0 and expected[3:5] == [0.0, 0.0]


@pytest.mark.parametrize("mu", [0.5, 1.0, 2.0])
def test_gaussian_scores_give_a_bound_below_the_true_epsilon_that_grows_with_trials(mu):
    true = gaussian_epsilon(1 / mu, 1.0, 1, DELTA)  # one Gaussian release with sensitivity/σ = μ
    rng = np.random.default_rng(1)
    bounds = [audit_scores(*_game(rng, n, mu), DELTA).epsilon_lower_bound for n in (2_000, 200_000)]
    assert 0 <= bounds[0] < bounds[1] < true
    assert bounds[1] > 0.35 * true  # measured 0.45-0.57 of the true ε at δ = 1e-5


def test_laplace_scores_approach_the_pure_epsilon():
    # Laplace(b) vs shift 1: ε = 1/b exactly, reached by every threshold past the shift
    rng = np.random.default_rng(2)
    outcome = audit_scores(*_game(rng, 200_000, 1.0, "laplace", scale=1.0), delta=0.0)
    assert 0.75 < outcome.epsilon_lower_bound < 1.0  # measured 0.85


def test_bound_exceeds_the_true_epsilon_at_most_one_minus_confidence_of_the_time():
    rng = np.random.default_rng(3)
    bounds = np.array([audit_scores(*_game(rng, 2_000, 1.0, "laplace"), delta=0.0).epsilon_lower_bound
                       for _ in range(200)])
    assert bounds.mean() > 0.5  # the audits have power: a check of validity that cannot pass vacuously
    # measured 1.5%; choosing the test on the same trials that give the bound would exceed it 10% of the time
    assert (bounds > 1.0).mean() <= 0.05 + 0.03  # 5% plus about two binomial standard errors of 200 audits


@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_perfectly_separated_scores_give_the_ceiling_in_either_direction(sign):
    canary_in = np.random.default_rng(4).random(400) < 0.5
    outcome = audit_scores(sign * canary_in.astype(float), canary_in, DELTA, confidence=0.95)
    assert outcome.direction == ("up" if sign > 0 else "down")
    held = canary_in[200:]
    n1, n0 = int(held.sum()), int((~held).sum())
    assert (outcome.true_positives, outcome.false_positives) == (n1, 0)
    # TPR ≥ (α/2)^(1/n1), FPR ≤ 1 - (α/2)^(1/n0): ε_lb ≈ log(n/ln(2/α)) grows like log(trials)
    expected = math.log((0.025 ** (1 / n1) - DELTA) / (1 - 0.025 ** (1 / n0)))
    assert outcome.epsilon_lower_bound == pytest.approx(expected) == outcome.epsilon_ceiling
    assert epsilon_ceiling(2_000, 2_000, DELTA, 0.95) > outcome.epsilon_ceiling + 2


@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_the_chosen_test_is_the_best_threshold_found_by_brute_force(sign):
    rng = np.random.default_rng(6)
    canary_in = rng.random(60) < 0.5
    scores = 5 + sign * canary_in + rng.normal(scale=0.7, size=60).round(1)  # rounded: ties between trials
    # evaluated on a copy of the selection trials, ε_lb is the best bound on them over every test
    outcome = audit_scores(np.tile(scores, 2), np.tile(canary_in, 2), DELTA, confidence=0.9)
    values = np.unique(scores)
    cuts = (values[:-1] + values[1:]) / 2
    n1, n0 = int(canary_in.sum()), int((~canary_in).sum())
    best = max(_epsilon(int(flag[canary_in].sum()), n1, int(flag[~canary_in].sum()), n0, DELTA, 0.9)
               for cut in cuts for flag in (scores > cut, scores < cut))
    assert outcome.epsilon_lower_bound == pytest.approx(best, rel=1e-9) and best > 0.5
    assert outcome.direction == ("up" if sign > 0 else "down") and outcome.threshold in cuts.tolist()
    flag = scores > outcome.threshold if sign > 0 else scores < outcome.threshold
    assert (outcome.true_positives, outcome.false_positives) == (flag[canary_in].sum(), flag[~canary_in].sum())
    assert (outcome.positives, outcome.negatives, outcome.selection_trials) == (n1, n0, 60)


@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_the_outcome_reports_the_test_and_scores_on_its_threshold_are_not_flagged(sign):
    selection_in = np.arange(20) % 2 == 0  # separated: the test is "score > 0.5" (or "score < -0.5")
    held_in = np.array([True] * 6 + [False] * 8 + [True, False] * 3)
    held = np.array([1.0] * 6 + [0.0] * 8 + [0.5] * 6)  # the last 3 canary and 3 other trials sit on the threshold
    scores, canary_in = sign * np.concatenate([selection_in, held]), np.concatenate([selection_in, held_in])
    outcome = audit_scores(scores, canary_in, DELTA, confidence=0.9)
    assert outcome.as_dict() == {
        "epsilon_lower_bound": pytest.approx(_epsilon(6, 9, 0, 11, DELTA, 0.9), rel=1e-9),
        "confidence": 0.9, "delta": DELTA, "threshold": sign * 0.5, "direction": "up" if sign > 0 else "down",
        "true_positives": 6, "positives": 9, "false_positives": 0, "negatives": 11, "selection_trials": 20,
        "epsilon_ceiling": pytest.approx(_epsilon(9, 9, 0, 11, DELTA, 0.9), rel=1e-9),
    }
    # worlds given as 0/1 are the same worlds
    assert audit_scores(scores, canary_in.astype(int).tolist(), DELTA, confidence=0.9) == outcome


def test_a_selection_half_without_evidence_flags_nothing():
    canary_in = np.array([True, False] * 51)
    assert _epsilon(1, 1, 0, 1, DELTA, 0.95) == 0.0  # two selection trials: no test on them shows anything
    outcome = audit_scores(canary_in.astype(float), canary_in, DELTA, selection_fraction=2 / 102)
    assert (outcome.threshold, outcome.direction) == (math.inf, "up")
    assert (outcome.true_positives, outcome.false_positives, outcome.epsilon_lower_bound) == (0, 0, 0.0)
    assert outcome.epsilon_ceiling > 1  # the evaluation trials, separated, would have shown a lot


def test_float32_scores_one_ulp_apart_are_separated():
    low = np.float32(1.0000001)
    high = np.nextafter(low, np.float32(2))
    assert (low + high) / 2 == high  # their midpoint in float32 is the upper score: the audit must not use it
    canary_in = np.random.default_rng(7).random(200) < 0.5
    outcome = audit_scores(np.where(canary_in, high, low), canary_in, DELTA)
    assert (outcome.true_positives, outcome.false_positives) == (outcome.positives, 0)
    assert outcome.epsilon_lower_bound == outcome.epsilon_ceiling > 1


def test_identical_worlds_give_no_evidence():
    rng = np.random.default_rng(5)
    assert audit_scores(*_game(rng, 4_000, 0.0), DELTA).epsilon_lower_bound < 0.2
    # the test is chosen on the first half only: a threshold fitted to noise does not carry over
    assert epsilon_bound(0, 100, 0, 100, DELTA, 0.95) == 0.0


def test_bad_inputs_are_refused():
    with pytest.raises(ValueError, match="confidence"):
        audit_scores([0.0, 1.0], [False, True], DELTA, confidence=1.0)
    with pytest.raises(ValueError, match="confidence"):
        audit_scores([0.0, 1.0], [False, True], DELTA, confidence=0.0)
    for fraction in (0.0, 1.0, 1.5):
        with pytest.raises(ValueError, match="selection_fraction"):
            audit_scores([0.0, 1.0], [False, True], DELTA, selection_fraction=fraction)
    with pytest.raises(ValueError, match="one score and one world"):
        audit_scores([0.0, 1.0], [True], DELTA)
    with pytest.raises(ValueError, match="finite"):
        audit_scores([0.0, math.nan], [False, True], DELTA)


def test_bounds_at_the_edges_of_the_counts_warn_about_nothing():
    """No evidence (no true positive: log 0) and all-or-nothing counts (beta.ppf's NaN at k = 0, k = n) are expected
    cases: no RuntimeWarning reaches the user, and the bounds are the masked values."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert float(epsilon_bound(0, 10, 0, 10, 1e-5, 0.95)) == 0.0
        assert float(clopper_pearson_lower(0, 10, 0.05)) == 0.0 and float(clopper_pearson_upper(10, 10, 0.05)) == 1.0
