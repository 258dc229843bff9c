"""Claim 6 — the accountant's inputs, every private method.

For non-default values of every input (ε 1.5, δ 3e-4, q = B/n with B ≠ default, T including DR-Encoder's stage-1
round, K = 2 and 3 directions, Gaussian and Laplace, PLD and RDP), the ε a method's privacy block reports after
its budget equals an independent computation from the block's noise (σ per scalar, so σ/√K per step), and the
calibration is tight: 1% less noise would overshoot the target.
"""

from __future__ import annotations

import math

import pytest

from tests.conftest import requires_data
from tests.privacy_matrix.matrix import (
    LAPLACE_ANALYSED,
    METHODS,
    STEPS,
    build,
    check_epsilon,
    family,
    gaussian_epsilon,
    mechanism,
    pure_laplace_epsilon,
    run_overrides,
    units,
)

pytestmark = requires_data


def _cases():
    for method in METHODS:
        if family(method) == "zeroth_order":  # K directions; Laplace has an L1 analysis here
            if mechanism(method) == "gaussian":
                yield method, "gaussian", "pld", 2
                yield method, "gaussian", "rdp", 3
            if method in LAPLACE_ANALYSED:
                yield method, "laplace", "basic", 2
                yield method, "laplace", "basic", 1  # K = 1: the PLD (ε, δ) of the same run is reported too
        else:
            yield method, "gaussian", "pld", 1
            yield method, "gaussian", "rdp", 1


@pytest.mark.parametrize("method,noise,accountant,directions", list(_cases()))
def test_reported_epsilon_is_an_independent_computation_on_the_run_inputs(method, noise, accountant, directions):
    overrides = run_overrides(method, noise) + ([f"privacy.accountant={accountant}"] if noise == "gaussian" else [])
    if family(method) == "zeroth_order":
        overrides.append(f"method.directions={directions}")
    built = build(method, *overrides, setup=False)
    cfg = built.cfg
    # the inputs, read from the configuration the user wrote
    n = units(cfg)
    q = cfg.method.batch_size / n
    steps = int(cfg.trainer.max_steps) + int(cfg.method.get("prior_rounds", 0) or 0)
    delta, target = float(cfg.privacy.target_delta), float(cfg.privacy.target_epsilon)
    assert steps == STEPS and (noise == "laplace" or delta == 3e-4) and target == 1.5
    for _ in range(steps):
        built.module.ledger.step()
    block = built.module.privacy_block()
    assert (block["mechanism"], block["accountant"], block["directions"]) == (noise, accountant, directions)
    assert block["sample_rate"] == q and block["steps"] == steps and block["target_delta"] == (delta if noise ==
                                                                                              "gaussian" else 0.0)
    check_epsilon(block, q, steps, delta, directions)
    if noise == "gaussian":  # tight: the run does not add more noise than its budget needs
        sigma = block["noise_multiplier"] / math.sqrt(directions)
        assert gaussian_epsilon(0.99 * sigma, q, steps, delta, accountant) > target
    else:
        assert pure_laplace_epsilon(0.99 * block["noise_multiplier"], q, steps, directions) > target
