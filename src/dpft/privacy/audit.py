"""Empirical lower bounds on ε from a distinguishing game (Jagielski et al. 2020; Nasr et al. 2021).

The game: in each trial a fair coin puts a canary example in the data set or leaves it out (worlds
D' = D ∪ {canary} and D, add/remove adjacency), the mechanism runs, and the auditor computes a
score from what it released. A threshold test "score > t ⇒ the canary was in" has a true-positive
rate TPR and a false-positive rate FPR. If the mechanism is (ε, δ)-DP, every such test satisfies

    TPR ≤ e^ε FPR + δ    and    1 − FPR ≤ e^ε (1 − TPR) + δ,

so ε ≥ max(log((TPR − δ)/FPR), log((1 − FPR − δ)/(1 − TPR))). The rates are estimated from the
trials with one-sided Clopper–Pearson bounds TPR ≥ TPR_low and FPR ≤ FPR_high at level α/2 each:
both hold together with probability ≥ 1 − α (union bound), and then the bound below holds for both
inequalities at once. So ε_lb is a lower bound on the true ε with confidence 1 − α.

The test (threshold and whether the canary raises or lowers the score) is chosen on the first part of
the trials and ε_lb is computed on the rest only: choosing it on the same trials would bias the bound up.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
from scipy.stats import beta


def clopper_pearson_lower(successes: np.ndarray | int, trials: np.ndarray | int, alpha: float) -> np.ndarray:
    """One-sided lower bound on a binomial rate: P(rate < bound) ≤ alpha."""
    k, n = np.asarray(successes, dtype=float), np.asarray(trials, dtype=float)
    bound = beta.ppf(alpha, k, n - k + 1)  # NaN at k = 0 (a shape of 0), replaced below
    return np.where(k <= 0, 0.0, np.nan_to_num(bound, nan=0.0))


def clopper_pearson_upper(successes: np.ndarray | int, trials: np.ndarray | int, alpha: float) -> np.ndarray:
    """One-sided upper bound on a binomial rate: P(rate > bound) ≤ alpha."""
    k, n = np.asarray(successes, dtype=float), np.asarray(trials, dtype=float)
    bound = beta.ppf(1 - alpha, k + 1, n - k)  # NaN at k = n, replaced below
    return np.where(k >= n, 1.0, np.nan_to_num(bound, nan=1.0))


def epsilon_bound(true_positives, positives, false_positives, negatives, delta: float,
                  confidence: float) -> np.ndarray:
    """ε_lb ≥ 0 of threshold tests with these counts (vectorised over tests), at `confidence`."""
    alpha = 1.0 - confidence
    tpr = clopper_pearson_lower(true_positives, positives, alpha / 2)
    fpr = clopper_pearson_upper(false_positives, negatives, alpha / 2)
    with np.errstate(divide="ignore"):  # log(0) = -inf where a rate bound leaves no evidence; the max drops it
        in_direction = np.log(np.maximum(tpr - delta, 0.0) / fpr)
        out_direction = np.log(np.maximum(1.0 - fpr - delta, 0.0) / (1.0 - tpr))
    bound = np.maximum(np.nan_to_num(in_direction, nan=0.0, neginf=0.0),
                       np.nan_to_num(out_direction, nan=0.0, neginf=0.0))
    return np.maximum(bound, 0.0)


def epsilon_ceiling(positives: int, negatives: int, delta: float, confidence: float) -> float:
    """The largest ε_lb these trial counts can give (a perfectly separating test): an audit with this
    many trials cannot show a violation of a claim at or above it."""
    return float(epsilon_bound(positives, positives, 0, negatives, delta, confidence))


@dataclass(frozen=True)
class AuditOutcome:
    epsilon_lower_bound: float
    confidence: float
    delta: float
    threshold: float
    direction: str  # "up": the canary raises the score (test: score > threshold); "down": score < threshold
    true_positives: int  # evaluation trials with the canary that the test flags
    positives: int  # evaluation trials with the canary
    false_positives: int  # evaluation trials without the canary that the test flags
    negatives: int  # evaluation trials without the canary
    selection_trials: int  # trials spent choosing the test (not in the counts above)
    epsilon_ceiling: float

    def as_dict(self) -> dict:
        return asdict(self)


def _counts(scores_in: np.ndarray, scores_out: np.ndarray, thresholds: np.ndarray):
    """(true positives, false positives) of "score > t" for each t."""
    tp = len(scores_in) - np.searchsorted(np.sort(scores_in), thresholds, side="right")
    fp = len(scores_out) - np.searchsorted(np.sort(scores_out), thresholds, side="right")
    return tp, fp


def choose_test(scores: np.ndarray, canary_in: np.ndarray, delta: float, confidence: float) -> tuple[float, float]:
    """(sign, threshold) of the test "sign·score > threshold" with the largest ε_lb on these trials."""
    best = (0.0, 1.0, math.inf)  # (bound, sign, threshold): by default flag nothing
    for sign in (1.0, -1.0):
        signed = sign * scores
        values = np.unique(signed)
        if len(values) < 2:
            continue
        thresholds = (values[:-1] + values[1:]) / 2
        tp, fp = _counts(signed[canary_in], signed[~canary_in], thresholds)
        bounds = epsilon_bound(tp, canary_in.sum(), fp, (~canary_in).sum(), delta, confidence)
        i = int(np.argmax(bounds))
        if bounds[i] > best[0]:
            best = (float(bounds[i]), sign, float(thresholds[i]))
    return best[1], best[2]


def audit_scores(scores, canary_in, delta: float, confidence: float = 0.95,
                 selection_fraction: float = 0.5) -> AuditOutcome:
    """ε_lb from one score per trial and whether the canary was in that trial (trials i.i.d.).

    The first `selection_fraction` of the trials choose the test, the rest evaluate it.
    """
    scores, canary_in = np.asarray(scores, dtype=float), np.asarray(canary_in, dtype=bool)
    if scores.shape != canary_in.shape or scores.ndim != 1:
        raise ValueError("need one score and one world per trial")
    if not np.isfinite(scores).all():
        raise ValueError("the audit scores must be finite")
    if not 0 < confidence < 1:
        raise ValueError(f"audit.confidence={confidence} must be in (0, 1)")
    if not 0 < selection_fraction < 1:
        raise ValueError(f"audit.selection_fraction={selection_fraction} must be in (0, 1)")
    split = int(round(selection_fraction * len(scores)))
    sign, threshold = choose_test(scores[:split], canary_in[:split], delta, confidence)
    held_scores, held_in = sign * scores[split:], canary_in[split:]
    positives, negatives = int(held_in.sum()), int((~held_in).sum())
    tp, fp = _counts(held_scores[held_in], held_scores[~held_in], np.array([threshold]))
    bound = float(epsilon_bound(tp[0], positives, fp[0], negatives, delta, confidence))
    return AuditOutcome(
        epsilon_lower_bound=bound, confidence=confidence, delta=delta, threshold=sign * threshold,
        direction="up" if sign > 0 else "down", true_positives=int(tp[0]), positives=positives,
        false_positives=int(fp[0]), negatives=negatives, selection_trials=split,
        epsilon_ceiling=epsilon_ceiling(positives, negatives, delta, confidence))
