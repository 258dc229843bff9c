"""Private zeroth-order methods end to end: the stated guarantee, the ledger, and early errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dpft.privacy.accounting import PrivacyConfigError
from dpft.train import run
from tests.conftest import requires_data

pytestmark = requires_data

PRIVATE = [("dpzo", "eps1"), ("dpzo_laplace", "pure_eps4"), ("dpzero", "eps2"), ("dpzoso", "eps4"),
           ("dpzopo", "eps8"), ("dpsgd", "eps2"), ("dpsgd_lora", "eps2"), ("anadp", "eps4")]
ZEROTH_ORDER = {"dpzo", "dpzo_laplace", "dpzero", "dpzoso", "dpzopo"}
BLOCK = {"target_epsilon", "target_delta", "epsilon_spent", "noise_multiplier", "sample_rate",
         "expected_batch_size", "steps", "clip", "mechanism", "accountant", "adjacency", "sampling"}


@pytest.mark.parametrize("model,task", [("opt-tiny", "sst2"), ("roberta-tiny", "sst2-k16")])
@pytest.mark.parametrize("method,privacy", PRIVATE)
def test_private_methods_run_and_state_their_guarantee(make_cfg, model, task, method, privacy):
    zo_knobs = ["++method.first_stage=2", "++method.mask_queries=2"] if method in ZEROTH_ORDER else []
    cfg = make_cfg(f"model={model}", f"task={task}", f"method={method}", f"privacy={privacy}", *zo_knobs)
    results = run(cfg)
    on_disk = json.loads((Path(cfg.paths.output_dir) / "results.json").read_text())
    p = on_disk["privacy"]
    assert BLOCK <= set(p)
    assert p["steps"] == 3 and p["sampling"] == "Poisson" and p["adjacency"] == "add/remove one example"
    assert 0 < p["epsilon_spent"] <= p["target_epsilon"] == cfg.privacy.target_epsilon
    assert p["noise_multiplier"] > 0 and p["clip"] == cfg.method.clip
    assert p["sample_rate"] == pytest.approx(cfg.method.batch_size / on_disk["data_sizes"]["train"])
    assert p["mechanism"] == ("laplace" if method == "dpzo_laplace" else "gaussian")
    assert on_disk["summary"]["privacy/epsilon_spent"] == p["epsilon_spent"]
    assert results["metrics"] == on_disk["metrics"] and "test/acc" in on_disk["metrics"]
    # Poisson batches vary (empty ones skip the forward); a ZO step costs two forwards, DP-SGD one
    per_step = 2 if method in ZEROTH_ORDER else 1
    assert on_disk["cost"]["forward_passes"] % per_step == 0 and on_disk["cost"]["forward_passes"] <= 3 * per_step
    if method == "anadp":  # the allocation is exposed, and keeps Σ σ_k⁻² = σ⁻²
        sigmas = p["final_group_noise_multipliers"]
        assert len(sigmas) > 1 and len(p["group_noise_multipliers_history"]) == 3
        assert sum(s ** -2 for s in sigmas.values()) == pytest.approx(p["noise_multiplier"] ** -2)


def test_dpzopo_mask_does_not_depend_on_the_training_data(make_cfg):
    digests = []
    for data_seed in (0, 1):
        cfg = make_cfg("model=opt-tiny", "task=sst2", "method=dpzopo", "privacy=eps8", "method.mask_queries=2",
                       f"task.data_seed={data_seed}", "trainer.max_steps=1")
        digests.append(run(cfg)["hyperparameters"]["mask_sha1"])
    assert digests[0] == digests[1]


@pytest.mark.parametrize("method,privacy,message", [
    ("dpzo", "none", "is private: choose a privacy budget"),
    ("mezo", "eps2", "is not private"),
    ("dpzo", "pure_eps4", "use e.g. privacy=eps2"),
    ("dpzo_laplace", "eps2", "use e.g. privacy=pure_eps4"),
])
def test_method_privacy_mismatch_fails_before_training(make_cfg, method, privacy, message):
    cfg = make_cfg("model=opt-tiny", "task=sst2", f"method={method}", f"privacy={privacy}")
    with pytest.raises(ValueError, match=message):
        run(cfg)
    assert not (Path(cfg.paths.output_dir) / "results.json").exists()  # refused, not a failed run


@pytest.mark.parametrize("override,match", [
    ("privacy.target_epsilon=1e-9 privacy.target_delta=1e-15", "unreachable"), ("privacy.target_epsilon=-1", "target_epsilon"),
    ("privacy.target_delta=2", "target_delta"), ("method.clip=0", "clip"),
    ("method.batch_size=100", "batch_size=100 exceeds"),
    ("method=dpsgd method.clip=-1", "clip"), ("method=dpsgd method.optimizer=lion", "optimizer"),
])
def test_bad_privacy_values_fail_before_the_model_is_loaded(make_cfg, monkeypatch, override, match):
    import dpft.train

    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded before the privacy request was checked")

    monkeypatch.setattr(dpft.train, "load_model", no_model)
    cfg = make_cfg("model=opt-tiny", "task=sst2", "method=dpzo", "privacy=eps1", *override.split())
    with pytest.raises((PrivacyConfigError, ValueError), match=match):
        run(cfg)


def test_dpsgd_on_real_minilm_learns_sst2_at_eps8(make_cfg):
    """A short real run: pretrained MiniLM, SST-2 512-shot, DP-AdamW on the head at ε = 8, tested on the
    872 test sentences. The majority class is 50.9%."""
    cfg = make_cfg("model=minilm-l6", "task=sst2-k512", "method=dpsgd", "privacy=eps8", "method.trainable=head",
                   "method.lr=5e-2", "method.batch_size=128", "trainer.max_steps=16", "task.max_length=48",
                   "method.eval_batch_size=128", "trainer.limit_test_batches=1.0", "validate=false")
    results = run(cfg)
    assert results["privacy"]["epsilon_spent"] <= 8.0
    assert results["data_sizes"]["test"] == 872
    assert results["metrics"]["test/acc"] > 65.0, results["metrics"]
