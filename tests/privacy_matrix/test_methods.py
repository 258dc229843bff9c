"""The privacy matrix runs every claim over every private method: the list comes from the method configs, and a
method the matrix has no oracle for fails here (and in every claim) instead of being skipped."""

from __future__ import annotations

from dpft.validation import PRIVATE_METHODS
from tests.privacy_matrix.matrix import METHODS, family

ISSUE = {"dpzo", "dpzo_laplace", "dpzero", "dpzoso", "dpzopo", "dpsgd", "dpsgd_lora", "anadp", "dp_fedavg", "dr_encoder",
         "dpgd_zo"}  # DPZero's DPGD-0th baseline (issue 23)


def test_the_matrix_covers_every_private_method_config():
    # a new `private: true` config joins every claim's parametrisation; this says to check its oracles
    assert set(METHODS) == ISSUE
    assert {family(m) for m in METHODS} == {"zeroth_order", "first_order", "federated"}
    assert {m.strip() for m in PRIVATE_METHODS.split(",")} == set(METHODS)  # the list users are shown
