"""`select=best_val`: the tested weights are those of the best validation, exactly those a run stopped there trains."""

from __future__ import annotations

import pytest

from dpft.train import run
from dpft.validation import ConfigError
from tests.conftest import requires_data

pytestmark = requires_data

BASE = ["model=opt-tiny", "task=sst2", "method.lr=1e-2", "trainer.limit_test_batches=1"]


def _check_selection(results: dict) -> int:
    selection = results["selection"]
    steps, values = zip(*selection["evaluations"])
    assert list(steps) == [2, 4, 6] and selection["metric"] == "val/acc" and selection["rule"] == "best_val"
    assert selection["step"] == steps[values.index(max(values))] and selection["value"] == max(values)
    return selection["step"]


def test_the_tested_weights_are_those_of_a_run_stopped_at_the_best_validation(make_cfg):
    best = run(make_cfg(*BASE, "method=mezo", "trainer.max_steps=6", "trainer.val_check_interval=2",
                        "select=best_val"))
    step = _check_selection(best)
    stopped = run(make_cfg(*BASE, "method=mezo", f"trainer.max_steps={step}"))
    assert stopped["selection"] == {"rule": "last"}
    assert best["trainable_parameters_sha256"] == stopped["trainable_parameters_sha256"]
    assert best["metrics"]["test/acc"] == stopped["metrics"]["test/acc"]
    assert "validation_treated_as_public" not in best["privacy"]


def test_a_private_run_says_it_chose_by_the_validation_split(make_cfg):
    last = run(make_cfg(*BASE, "method=dpzo", "privacy=eps8", "trainer.max_steps=6", "trainer.val_check_interval=2"))
    best = run(make_cfg(*BASE, "method=dpzo", "privacy=eps8", "trainer.max_steps=6", "trainer.val_check_interval=2",
                        "select=best_val"))
    step = _check_selection(best)
    assert best["privacy"]["validation_treated_as_public"] is True
    assert best["privacy"]["epsilon_spent"] == last["privacy"]["epsilon_spent"]  # the choice is not charged
    same = best["trainable_parameters_sha256"] == last["trainable_parameters_sha256"]
    assert same == (step == 6)  # the last weights exactly when the last validation was the best


def test_best_val_needs_validations_and_training(make_cfg):
    with pytest.raises(ConfigError, match="select=best_val .* needs validate=true"):
        run(make_cfg(*BASE, "method=mezo", "select=best_val", "validate=false"))
    with pytest.raises(ConfigError, match="select=bogus is invalid"):
        run(make_cfg(*BASE, "method=mezo", "select=bogus"))
