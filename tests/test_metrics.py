"""SQuAD v1.1 EM/F1 and accuracy against hand-computed values."""

import pytest

from dpft.data.metrics import accuracy, normalize_answer, squad_em, squad_f1


def test_normalize_answer():
    assert normalize_answer("The  Denver Broncos!") == "denver broncos"
    assert normalize_answer("an apple, a pear") == "apple pear"
    assert normalize_answer("theory") == "theory"  # articles only as whole words


def test_exact_match():
    assert squad_em("the Denver Broncos", ["Denver Broncos"]) == 1.0
    assert squad_em("Denver", ["Denver Broncos"]) == 0.0
    assert squad_em("Carolina", ["Denver Broncos", "carolina."]) == 1.0  # any gold
    assert squad_em("", ["Denver Broncos"]) == 0.0


def test_f1():
    assert squad_f1("the Denver Broncos", ["Denver Broncos"]) == 1.0
    # precision 1/1, recall 1/2 -> 2 * 0.5 / 1.5
    assert squad_f1("Denver", ["Denver Broncos"]) == pytest.approx(2 / 3)
    # precision 2/3, recall 2/2 -> 2 * (2/3) / (5/3) = 0.8
    assert squad_f1("Denver Broncos won", "Denver Broncos") == pytest.approx(0.8)
    assert squad_f1("Denver", ["Carolina Panthers", "Denver Broncos"]) == pytest.approx(2 / 3)  # max over gold
    assert squad_f1("", ["Denver Broncos"]) == 0.0
    assert squad_f1("Panthers", ["Denver Broncos"]) == 0.0
    assert squad_f1("x", []) == 0.0


def test_accuracy():
    assert accuracy([1, 0, 2, 2], [1, 1, 2, 0]) == 0.5
    with pytest.raises(ValueError):
        accuracy([1], [1, 0])
