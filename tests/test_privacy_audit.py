"""The audit's statistics on synthetic scores with a known privacy level (no models)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from dpft.privacy.accounting import gaussian_epsilon
from dpft.privacy.audit import (
    audit_scores,
    clopper_pearson_lower,
    clopper_pearson_upper,
    epsilon_bound,
    epsilon_ceiling,
)

DELTA = 1e-5


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


def test_identical_worlds_give_no_evidence():
    rng = np.random.default_rng(5)
    assert audit_scores(*_game(rng, 4_000, 0.0), DELTA).epsilon_lower_bound < 0.2
    # the test is chosen on the first half only: a threshold fitted to noise does not carry over
    assert epsilon_bound(0, 100, 0, 100, DELTA, 0.95) == 0.0


def test_bad_inputs_are_refused():
    with pytest.raises(ValueError, match="confidence"):
        audit_scores([0.0, 1.0], [False, True], DELTA, confidence=1.0)
    with pytest.raises(ValueError, match="one score and one world"):
        audit_scores([0.0, 1.0], [True], DELTA)
    with pytest.raises(ValueError, match="finite"):
        audit_scores([0.0, math.nan], [False, True], DELTA)
