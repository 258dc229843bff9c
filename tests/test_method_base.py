"""What every method shares: the privacy block of a non-private run, the refusal of a mechanism a method has no
analysis for, and raw statistics logged with their options (only where a run may release them)."""

from __future__ import annotations

import math

import pytest
from torch import nn

from dpft.methods.base import MethodModule
from dpft.methods.dp_first_order import DPFirstOrder
from dpft.methods.zeroth_order import ParameterNoiseZerothOrder, ZerothOrder


def _module() -> MethodModule:
    return MethodModule(nn.Linear(2, 2), scorer=None)


def test_a_non_private_run_states_infinite_epsilon_and_no_noise():
    assert _module().privacy_block() == {
        "target_epsilon": math.inf, "target_delta": 0.0, "epsilon_spent": 0.0, "noise_multiplier": 0.0,
        "sample_rate": None, "expected_batch_size": None, "steps": 0, "clip": None, "mechanism": "none",
        "accountant": None, "adjacency": None, "sampling": "shuffled fixed-size batches"}


@pytest.mark.parametrize("cls,mechanism,analysed", [
    (ZerothOrder, "exponential", "('gaussian', 'laplace')"), (DPFirstOrder, "laplace", "('gaussian',)"),
    (ParameterNoiseZerothOrder, "laplace", "('gaussian',)"), (MethodModule, "gaussian", "none")])
def test_a_mechanism_without_analysis_is_refused_naming_what_is_implemented(cls, mechanism, analysed):
    with pytest.raises(ValueError) as err:
        cls.check_mechanism(mechanism)
    assert str(err.value) == (f"{cls.__name__} has no sensitivity analysis for {mechanism} noise (it implements "
                              f"{analysed})")
    for ok in cls.noise_mechanisms:
        cls.check_mechanism(ok)


@pytest.mark.parametrize("private,diagnostics,logged", [(False, False, True), (True, False, False),
                                                        (True, True, True)])
def test_raw_statistics_are_logged_with_their_options_only_where_released(private, diagnostics, logged):
    module = _module()
    calls = []
    module.log = lambda name, value, **kwargs: calls.append((name, value, kwargs))
    module.ledger = object() if private else None
    module.diagnostics = diagnostics
    module.log_raw("train/loss", 0.5, prog_bar=True, batch_size=3)
    assert calls == ([("train/loss", 0.5, {"prog_bar": True, "batch_size": 3})] if logged else [])
    assert module.raw_logged == ({"train/loss"} if private and logged else set())
