"""`dpft-audit` end to end: the real private steps in a real Trainer, the correct mechanisms pass and
deliberately broken ones are flagged (seeded: the outcomes are stable)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from scipy.stats import beta

from dpft.audit_game import compose_audit_config, main, run_audit
from tests.conftest import requires_data

pytestmark = requires_data

FAST = ["trainer.enable_progress_bar=false"]
FIELDS = {"method", "claimed_epsilon", "delta", "epsilon_lower_bound", "confidence", "trials", "verdict"}


@pytest.mark.parametrize("broken", ["none", "no_noise", "no_clip"])
@pytest.mark.parametrize("method", ["dpzo", "dpsgd"])
def test_audit_passes_the_mechanism_and_flags_broken_ones(tmp_path, capsys, method, broken):
    out = tmp_path / "audit.json"
    main([f"method={method}", "privacy=eps0.5", f"broken={broken}", "audit.trials=200", *FAST, "--out", str(out)])
    record = json.loads(out.read_text())
    assert FIELDS <= set(record) and record["trials"] == 200 and record["confidence"] == 0.95
    assert f"| {method} | {broken} |" in capsys.readouterr().out
    # the claim is the ledger's ε for the one audited step (q = 1): the calibrated target
    assert record["claimed_epsilon"] == record["privacy"]["epsilon_spent"] == pytest.approx(0.5, rel=0.01)
    assert record["delta"] == 1e-5 and record["privacy"]["sample_rate"] == 1.0
    assert record["canary"]["contribution_over_clip"] == pytest.approx(100, rel=1e-3)
    # the clipped canary uses the whole sensitivity: it moves a step's release by 1/σ noise scales
    assert record["canary"]["noise_units"] == pytest.approx(record["canary"]["max_noise_units"], rel=1e-3)
    if broken == "none":
        assert record["verdict"] == "consistent"
        assert record["epsilon_lower_bound"] <= record["claimed_epsilon"]
    else:  # perfectly separated worlds: the ceiling of 200 trials, 5x the claim
        assert record["verdict"] == "violation"
        assert record["epsilon_lower_bound"] == pytest.approx(record["epsilon_ceiling"])
        assert record["epsilon_lower_bound"] > 4 * record["claimed_epsilon"]


def test_a_sweep_writes_one_json_per_audit_and_one_table(tmp_path, capsys):
    main(["method=dpsgd", "broken=none,no_noise", "audit.trials=20", *FAST, "--out", str(tmp_path / "audits")])
    written = sorted(p.name for p in (tmp_path / "audits").iterdir())
    assert written == ["no_noise.json", "none.json"]
    assert json.loads((tmp_path / "audits" / "no_noise.json").read_text())["broken"] == "no_noise"
    table = capsys.readouterr().out
    assert "| dpsgd | none |" in table and "| dpsgd | no_noise |" in table and table.count("| method |") == 1
    with pytest.raises(SystemExit):  # several audits cannot share one file
        main(["method=dpzo,dpsgd", "--out", str(tmp_path / "audit.json")])


def _clopper_pearson_epsilon(test: dict, delta: float, confidence: float) -> float:
    """ε_lb of a test's counts by hand: one-sided Clopper–Pearson bounds at (1 − confidence)/2 per rate."""
    a = (1 - confidence) / 2
    tp, pos, fp, neg = test["true_positives"], test["positives"], test["false_positives"], test["negatives"]
    tpr = beta.ppf(a, tp, pos - tp + 1) if tp else 0.0
    fpr = beta.ppf(1 - a, fp + 1, neg - fp) if fp < neg else 1.0
    bounds = [math.log((tpr - delta) / fpr)] if tpr > delta else []
    bounds += [math.log((1 - fpr - delta) / (1 - tpr))] if 1 - fpr > delta else []
    return max([0.0, *bounds])


def test_the_audits_of_one_invocation_hold_together_at_the_familywise_confidence(tmp_path, capsys):
    """Two audits at audit.confidence=0.95: each bound is at 1 − 0.05/2 (Bonferroni), so a false violation in
    either has probability at most 5%; the JSON says both levels."""
    main(["method=dpsgd", "broken=none,no_noise", "audit.trials=60", *FAST, "--out", str(tmp_path)])
    for name in ("none", "no_noise"):
        record = json.loads((tmp_path / f"{name}.json").read_text())
        assert record["family_size"] == 2 and record["familywise_confidence"] == 0.95
        assert record["confidence"] == pytest.approx(0.975, abs=1e-12)
        corrected = _clopper_pearson_epsilon(record["test"], record["delta"], 0.975)
        assert record["epsilon_lower_bound"] == pytest.approx(corrected, rel=1e-9, abs=1e-12)
    # without noise the worlds separate: the corrected bound (1.14 from 30 held-out trials) is below the
    # uncorrected one (1.35), and it is the ceiling at 0.975
    assert record["test"]["true_positives"] == record["test"]["positives"] and record["test"]["false_positives"] == 0
    assert 0 < record["epsilon_lower_bound"] < _clopper_pearson_epsilon(record["test"], record["delta"], 0.95)
    assert record["epsilon_ceiling"] == pytest.approx(record["epsilon_lower_bound"])
    assert "Family-wise confidence 0.95 over the 2 audits (Bonferroni: each at 0.975)." in capsys.readouterr().out
    with pytest.raises(ValueError, match="audit.confidence=0.9,0.95: the audits of one invocation share one"):
        main(["method=dpsgd", "audit.confidence=0.9,0.95", *FAST])


@pytest.mark.parametrize("method", ["dpzo", "dpsgd"])
def test_restore_between_multi_step_trials_is_complete(method):
    """Without noise a q = 1 release is a function of the world only: every trial of a world scores the
    same only if parameters, optimizer and DP state, ZO step counter and ledger are all restored."""
    record = run_audit(compose_audit_config([f"method={method}", "broken=no_noise", "audit.trials=24",
                                             "method.steps=2", *FAST]))
    assert record["privacy"]["steps"] == 2 and record["steps_per_trial"] == 2
    scores = record["scores"]
    assert scores["std_with_canary"] < 1e-12 and scores["std_without_canary"] < 1e-12
    assert scores["mean_with_canary"] > scores["mean_without_canary"]


@pytest.mark.parametrize("method", ["dpzo", "dpsgd"])
def test_poisson_sampled_trials_run_with_their_claim(method):
    # q = 2/4: batches vary and can be empty (a pure-noise step); the claim is the ledger's for q and T
    record = run_audit(compose_audit_config([f"method={method}", "audit.trials=24", "method.steps=2",
                                             "method.batch_size=2", *FAST]))
    assert record["privacy"]["sample_rate"] == 0.5 and record["privacy"]["steps"] == 2
    assert record["claimed_epsilon"] == record["privacy"]["epsilon_spent"] <= record["target_epsilon"] == 1.0
    assert record["verdict"] == "consistent"


def test_the_canary_moves_the_zo_score_by_one_over_sigma_noise_deviations():
    """At q = 1 one DP-ZO step is a Gaussian mechanism with sensitivity/noise 1/σ: the score's shift
    between the worlds, in noise standard deviations, estimates it — end to end, the noise the module
    adds to the projected gradient (clip bound C/2φ, division by B) is the calibrated one."""
    record = run_audit(compose_audit_config(["method=dpzo", "privacy=eps8", "audit.trials=300", *FAST]))
    expected = 1 / record["privacy"]["noise_multiplier"]  # 1.67 at ε = 8, δ = 1e-5
    assert record["scores"]["separation"] == pytest.approx(expected, abs=0.45)  # standard error ≈ 0.13
    assert 0 < record["epsilon_lower_bound"] <= record["claimed_epsilon"]


@pytest.mark.parametrize("override,match", [
    ("broken=zero_noise", r"broken=zero_noise is invalid: must be one of \('none', 'no_noise', 'no_clip'\)"),
    ("audit.trials=5", "audit.trials=5 is invalid"),
    ("audit.confidence=1.5", "audit.confidence=1.5 is invalid"),
    ("method=mezo privacy=none", "method=mezo is not private: nothing to audit"),
    ("audit.base_size=5000", "audit.base_size=5000 exceeds"),
    ("privacy.convention=paper", "privacy.convention=paper is invalid: must be ours: the game adds or removes"),
])
def test_bad_audit_settings_fail_with_the_key(override, match):
    with pytest.raises(ValueError, match=match):
        run_audit(compose_audit_config(override.split()))


@pytest.mark.slow
@pytest.mark.parametrize("method,privacy", [("dpzero", "eps1"), ("anadp", "eps1"), ("dpzo_laplace", "pure_eps1")])
@pytest.mark.parametrize("broken", ["none", "no_noise", "no_clip"])
def test_other_private_methods_pass_and_broken_ones_are_flagged(method, privacy, broken):
    record = run_audit(compose_audit_config([f"method={method}", f"privacy={privacy}", f"broken={broken}",
                                             "audit.trials=400", *FAST]))
    assert record["claimed_epsilon"] <= 1.0
    if broken == "none":
        assert record["verdict"] == "consistent"
    else:
        assert record["verdict"] == "violation" and record["epsilon_lower_bound"] > 3 * record["claimed_epsilon"]
    assert np.isfinite(record["epsilon_lower_bound"])
