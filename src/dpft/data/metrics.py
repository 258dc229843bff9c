"""Metrics: accuracy and the official SQuAD v1.1 answer normalisation, EM and token F1.

DROP is scored with the same SQuAD EM/F1, as MeZO does (``large_models/metrics.py``); this is not
DROP's official metric (which also compares numbers and aligns multi-span answers bag by bag).
"""

from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Iterable, Sequence

_PUNCT = set(string.punctuation)


def normalize_answer(s: str) -> str:
    """Lower-case, drop punctuation, drop articles (a/an/the), collapse whitespace (SQuAD v1.1)."""
    s = "".join(ch for ch in s.lower() if ch not in _PUNCT)
    s = re.sub(r"\b(a|an|the)\b", " ", s)
    return " ".join(s.split())


def _f1(prediction: str, truth: str) -> float:
    pred, gold = normalize_answer(prediction).split(), normalize_answer(truth).split()
    same = sum((Counter(pred) & Counter(gold)).values())
    if same == 0:
        return 0.0
    precision, recall = same / len(pred), same / len(gold)
    return 2 * precision * recall / (precision + recall)


def _golds(ground_truths: str | Iterable[str]) -> list[str]:
    return [ground_truths] if isinstance(ground_truths, str) else list(ground_truths)


def squad_f1(prediction: str, ground_truths: str | Iterable[str]) -> float:
    """Token F1 in [0, 1], the maximum over the gold answers (0 when there are none)."""
    return max((_f1(prediction, g) for g in _golds(ground_truths)), default=0.0)


def squad_em(prediction: str, ground_truths: str | Iterable[str]) -> float:
    """1.0 if the normalised prediction equals any normalised gold answer, else 0.0."""
    pred = normalize_answer(prediction)
    return float(any(pred == normalize_answer(g) for g in _golds(ground_truths)))


def accuracy(predictions: Sequence[int], labels: Sequence[int]) -> float:
    """Fraction of predictions equal to their label."""
    if len(predictions) != len(labels):
        raise ValueError(f"{len(predictions)} predictions for {len(labels)} labels")
    return sum(int(p == y) for p, y in zip(predictions, labels)) / max(len(labels), 1)
