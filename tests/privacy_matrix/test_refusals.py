"""Claim 8 — validation refuses every spelling, for every method it concerns.

- Loss scaling (first-order DP clips per-example gradients a GradScaler would have scaled; a zeroth-order step has
  no gradients to scale), trained weights cast to a half dtype the model's `trainable_dtype` does not name (a ZO
  restore drifts, updates round away), float16 without loss scaling for first-order, and fp8: every precision value
  Lightning's Trainer accepts, as a user types it (16 is an int, '16' a string), refused exactly when Lightning maps
  it to such a mode. Lightning's own mapping is the oracle.
- Laplace noise for the L2-clipped methods (first-order, federated), asked for by a pure-ε budget, by the method's
  mechanism, or by keys; and a budget of the other mechanism for every private method.
- δ ≥ 1/n (n examples, or clients) for every Gaussian method, at n itself; δ ≠ 0 for Laplace; and every spelling
  of privacy.allow_large_delta that is not a boolean.
"""

from __future__ import annotations

import warnings
from typing import get_args

import pytest
from lightning.fabric.connector import _PRECISION_INPUT, _convert_precision_to_unified_args
from omegaconf import OmegaConf

import dpft.train
from dpft.validation import ConfigError, check_delta, validate_config
from tests.conftest import requires_data
from tests.privacy_matrix.matrix import (
    LAPLACE_ANALYSED,
    METHODS,
    PARAMETER_NOISE,
    family,
    in_family,
    mechanism,
    method_cfg,
    typed,
    units,
)

# Lightning's modes: a GradScaler; casting every weight to a half dtype; fp8
SCALING, HALF_CAST, FP8 = {"16-mixed"}, {"bf16-true": "bfloat16", "16-true": "float16"}, {"transformer-engine",
                                                                                        "transformer-engine-float16"}


def _flat(hint) -> list:
    return [v for a in get_args(hint) for v in (_flat(a) if get_args(a) else [a])]


def _typed_as_a_user_would(value) -> str:
    """The command-line text for a precision value: '16' must be quoted to stay a string."""
    text = f"'{value}'" if isinstance(value, str) and value.isdigit() else str(value)
    assert typed(f"trainer.precision={text}") == value and type(typed(f"trainer.precision={text}")) is type(value)
    return text


PRECISIONS = _flat(_PRECISION_INPUT)  # every value Trainer(precision=...) accepts
with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # Lightning warns about the legacy aliases
    UNIFIED = {repr(v): _convert_precision_to_unified_args(v) for v in PRECISIONS}


def _with(cfg, **values):
    for key, value in values.items():
        OmegaConf.update(cfg, key, value, force_add=True)
    return cfg


@pytest.mark.parametrize("trainable_dtype", ["float32", "bfloat16", "float16"])
@pytest.mark.parametrize("method", in_family("first_order") + in_family("zeroth_order"))
def test_every_precision_spelling_is_refused_exactly_when_it_scales_or_casts_to_half(method, trainable_dtype):
    assert {16, "16", "16-mixed", "bf16"} <= set(PRECISIONS)  # the aliases this test is about are all listed
    outcomes = {}
    for value in PRECISIONS:
        text = _typed_as_a_user_would(value)
        unified = UNIFIED[repr(value)]
        refuse = (unified in SCALING | FP8 or HALF_CAST.get(unified, trainable_dtype) != trainable_dtype
                  or (family(method) == "first_order" and unified == "16-true")  # float16 AdamW, no scaler
                  or (unified == "32-true" and trainable_dtype != "float32"))  # the model is float32: no autocast
        cfg = _with(method_cfg(method), **{"trainer.precision": typed(f"trainer.precision={text}"),
                                           "model.trainable_dtype": trainable_dtype})
        if refuse:
            with pytest.raises(ConfigError, match="trainer.precision"):
                validate_config(cfg)
        else:
            validate_config(cfg)
        outcomes[text] = refuse
    # the spellings of loss scaling are all refused; bf16 autocast is not
    assert outcomes["16"] and outcomes["'16'"] and outcomes["16-mixed"] and not outcomes["bf16-mixed"]
    assert outcomes["bf16-true"] == (trainable_dtype != "bfloat16")


# first-order and federated methods, and DPGD-0th's d-dimensional release: no L1 analysis
L2_METHODS = in_family("first_order") + in_family("federated") + sorted(PARAMETER_NOISE)


@pytest.mark.parametrize("method", L2_METHODS)
def test_laplace_is_refused_for_l2_clipped_methods_however_it_is_asked_for(method):
    asks = [(["privacy=pure_eps1", "method.mechanism=laplace"], "no sensitivity analysis"),
            (["privacy=pure_eps4", "method.mechanism=laplace"], "no sensitivity analysis"),
            (["privacy=pure_eps4"], "adds gaussian noise but privacy=pure_eps4 is a laplace budget"),
            (["privacy.mechanism=laplace", "privacy.target_delta=0", "method.mechanism=laplace"],
             "no sensitivity analysis"),
            (["privacy.mechanism=Laplace", "privacy.target_delta=0", "method.mechanism=laplace"], "is not one of"),
            (["privacy=pure_eps4", "method.mechanism=LAPLACE"], "adds LAPLACE noise")]
    for overrides, message in asks:
        with pytest.raises(ConfigError, match=message):
            validate_config(method_cfg(method, *overrides))


@pytest.mark.parametrize("method", sorted(LAPLACE_ANALYSED))
def test_zeroth_order_methods_take_laplace_spelled_either_way(method):
    # the contrast: where an L1 analysis exists, the same spellings pass
    for overrides in (["privacy=pure_eps4", "method.mechanism=laplace"],
                      ["privacy.mechanism=laplace", "privacy.target_delta=0", "method.mechanism=laplace",
                       "privacy.accountant=basic"]):
        assert validate_config(method_cfg(method, *overrides))


@pytest.mark.parametrize("method", METHODS)
def test_a_budget_of_the_other_mechanism_is_refused(method):
    other = "privacy=eps2" if mechanism(method) == "laplace" else "privacy=pure_eps4"
    with pytest.raises(ConfigError, match=f"adds {mechanism(method)} noise but"):
        validate_config(method_cfg(method, other))


@requires_data
@pytest.mark.parametrize("method", METHODS)
def test_delta_at_one_over_n_is_refused_before_the_model(method, monkeypatch, tmp_path):
    if mechanism(method) == "laplace":  # pure ε-DP: δ is 0, and any other value is refused
        with pytest.raises(ConfigError, match="pure ε-DP"):
            validate_config(method_cfg(method, "privacy.target_delta=1e-5"))
        return
    n = units(method_cfg(method))
    unit = "client" if family(method) == "federated" else "example"

    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded before δ was checked")

    monkeypatch.setattr(dpft.train, "load_model", no_model)
    with pytest.raises(ConfigError, match=rf"target_delta={1 / n:g} is not below 1/n = 1/{n} \({unit}s"):
        dpft.train.run(method_cfg(method, f"privacy.target_delta={1 / n!r}", output_dir=tmp_path))
    below = method_cfg(method, f"privacy.target_delta={0.99 / n!r}")
    assert check_delta(below.privacy, n, unit) is False  # just below 1/n: allowed, and not flagged
    assert check_delta(_with(method_cfg(method, f"privacy.target_delta={1 / n!r}"),
                             **{"privacy.allow_large_delta": True}).privacy, n, unit) is True
    for spelling in ("1", "yes", "'true'", "on"):  # only a boolean allows it
        cfg = method_cfg(method, f"privacy.target_delta={1 / n!r}")
        _with(cfg, **{"privacy.allow_large_delta": typed(f"x={spelling}")})
        with pytest.raises(ConfigError, match="privacy.allow_large_delta=.* is invalid: must be true or false"):
            validate_config(cfg)
