"""privacy.convention=paper: DPZero's replace-one statement, checked against dp-accounting directly.

Under replace-one adjacency two neighbouring training sets' clipped sums differ by up to 2C; dp-accounting's PLD
accountant takes the Gaussian's σ relative to the per-example bound C and accounts for the 2C itself (with q = 1
its replace-one ε at σ equals the add/remove ε at σ/2). dp-accounting's RDP accountant has no replace-one Poisson
analysis, so such a run has no RDP cross-check and privacy.accountant=rdp is refused.
"""

from __future__ import annotations

import math

import dp_accounting as dpa
import pytest
from dp_accounting import pld, rdp

from dpft.privacy.accounting import PrivacyConfigError, calibrate_gaussian, composed_epsilon, make_spec
from dpft.privacy.ledger import PrivacyLedger
from dpft.train import run
from dpft.validation import ConfigError
from tests.conftest import requires_data
from tests.test_privacy_claims import _no_data
from tests.test_report import _fake

REPLACE = dpa.NeighboringRelation.REPLACE_ONE


def replace_one_epsilon(sigma: float, q: float, steps: int, delta: float) -> float:
    acc = pld.PLDAccountant(neighboring_relation=REPLACE, value_discretization_interval=1e-4)
    acc.compose(dpa.SelfComposedDpEvent(dpa.PoissonSampledDpEvent(q, dpa.GaussianDpEvent(sigma)), steps))
    return float(acc.get_epsilon(delta))


def test_replace_one_pld_counts_twice_the_bound():
    """The oracle's reading of dp-accounting: without sampling, replace-one at σ is add/remove at σ/2."""
    def one(sigma, relation):
        acc = pld.PLDAccountant(neighboring_relation=relation, value_discretization_interval=1e-4)
        acc.compose(dpa.GaussianDpEvent(sigma))
        return acc.get_epsilon(1e-5)

    assert one(3.0, REPLACE) == pytest.approx(one(1.5, dpa.NeighboringRelation.ADD_OR_REMOVE_ONE), rel=1e-3)


def test_paper_convention_spends_the_replace_one_epsilon_of_its_own_noise():
    """K = 3 directions, δ = 3e-6, C = 0.7: ε equals dp-accounting's replace-one PLD at the spec's own σ/√K, stays
    under the target, and σ is the smallest that does (1 % less noise overshoots); the add/remove calibration's
    noise would overshoot."""
    n, batch, steps, delta, target = 500, 20, 40, 3e-6, 3.0
    spec = make_spec("gaussian", "pld", target, delta, n, batch, steps, clip=0.7, directions=3, convention="paper")
    assert (spec.convention, spec.adjacency) == ("paper", "replace one example")
    sigma = spec.noise_multiplier / math.sqrt(3)
    assert spec.step_noise_multiplier == pytest.approx(sigma, rel=1e-12)
    ledger = PrivacyLedger(spec)
    for _ in range(steps):
        ledger.step()
    block = ledger.report()
    expected = replace_one_epsilon(sigma, batch / n, steps, delta)
    assert block["epsilon_spent"] == block["epsilon_pld"] == pytest.approx(expected, rel=1e-6)
    assert block["epsilon_rdp"] is None and block["convention"] == "paper"
    assert expected <= target < replace_one_epsilon(sigma * 0.99, batch / n, steps, delta)
    ours = make_spec("gaussian", "pld", target, delta, n, batch, steps, clip=0.7, directions=3)
    assert replace_one_epsilon(ours.step_noise_multiplier, batch / n, steps, delta) > target


@pytest.mark.slow  # 13 s of PLD calibration
def test_paper_convention_adds_about_the_noise_of_dpzeros_code():
    """DPZero's code adds 2·σ·C with σ from Opacus's Poisson RDP (add/remove) at (ε, δ, q, T); the replace-one
    PLD calibration adds σ'·C: at ε = 2, q = 64/1024, T = 1000 it is 0.85-0.95 times theirs, where the analysis
    of fixed-size batches (RDP, sampling without replacement, σ'' relative to 2C) needs 1.8-2.2 times theirs
    (docs/privacy.md)."""
    theirs = 2 * calibrate_gaussian(2.0, 1e-5, 1 / 16, 1000, "rdp")
    ours = calibrate_gaussian(2.0, 1e-5, 1 / 16, 1000, "pld", replace_one=True)
    assert 0.85 < ours / theirs < 0.95

    def fixed_size_epsilon(sigma):
        acc = rdp.RdpAccountant(neighboring_relation=REPLACE)
        acc.compose(dpa.SelfComposedDpEvent(dpa.SampledWithoutReplacementDpEvent(1024, 64, dpa.GaussianDpEvent(
            sigma)), 1000))
        return acc.get_epsilon(1e-5)

    low, high = 1.0, 64.0
    while high - low > 1e-3 * high:
        low, high = ((low + high) / 2, high) if fixed_size_epsilon((low + high) / 2) > 2.0 else (low, (low + high) / 2)
    assert 1.8 < 2 * high / theirs < 2.2


@pytest.mark.parametrize("convention, mechanism, accountant, message", [
    ("paper", "gaussian", "rdp", "set privacy.accountant=pld"),
    ("paper", "laplace", "basic", "Gaussian mechanism only"),
    ("theirs", "gaussian", "pld", "is not one of"),
])
def test_what_the_paper_convention_has_no_analysis_for_is_refused(convention, mechanism, accountant, message):
    with pytest.raises(PrivacyConfigError, match=message):
        make_spec(mechanism, accountant, 2.0, 1e-5 if mechanism == "gaussian" else 0.0, 100, 10, 10, 1.0,
                  convention=convention)


def test_runs_of_different_conventions_are_not_composed_and_paper_runs_compose_replace_one():
    def block(convention, steps):
        spec = make_spec("gaussian", "pld", 2.0, 1e-5, 200, 10, 20, 1.0, convention=convention)
        return {**spec.as_dict(), "steps": steps}

    with pytest.raises(PrivacyConfigError, match="different adjacencies"):
        composed_epsilon([block("ours", 20), block("paper", 20)])
    a, b = block("paper", 20), block("paper", 7)
    acc = pld.PLDAccountant(neighboring_relation=REPLACE, value_discretization_interval=1e-4)
    for steps in (20, 7):
        acc.compose(dpa.SelfComposedDpEvent(dpa.PoissonSampledDpEvent(0.05, dpa.GaussianDpEvent(
            a["step_noise_multiplier"])), steps))
    eps, delta = composed_epsilon([a, b])
    assert delta == 1e-5 and eps == pytest.approx(acc.get_epsilon(1e-5), rel=1e-3)


@requires_data
@pytest.mark.parametrize("overrides, message", [
    (["privacy.accountant=rdp"], "privacy.convention=paper (replace-one) is accounted by PLD"),
    (["privacy=pure_eps4", "method=dpzo_laplace"], "Gaussian mechanism only"),
    (["privacy.convention=replace"], "privacy.convention='replace' is not one of"),
])
def test_a_convention_without_analysis_is_refused_before_data(make_cfg, monkeypatch, overrides, message):
    _no_data(monkeypatch)
    convention = [] if any(o.startswith("privacy.convention") for o in overrides) else ["privacy.convention=paper"]
    cfg = make_cfg("model=opt-tiny", "task=sst2", "method=dpzero", "privacy=eps8", *overrides, *convention)
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        run(cfg)


@requires_data
def test_a_paper_convention_run_states_and_spends_replace_one(make_cfg):
    """A real DPZero run (K = 2, δ = 2e-5): results.json names the convention and adjacency, and ε is dp-accounting's
    replace-one PLD at the run's own σ, q and steps."""
    cfg = make_cfg("model=opt-tiny", "task=sst2", "method=dpzero", "privacy=eps8", "privacy.convention=paper",
                   "privacy.target_delta=2e-5", "method.directions=2")
    p = run(cfg)["privacy"]
    assert (p["convention"], p["adjacency"], p["accountant"]) == ("paper", "replace one example", "pld")
    sigma = p["noise_multiplier"] / math.sqrt(2)
    assert p["epsilon_spent"] == pytest.approx(replace_one_epsilon(sigma, p["sample_rate"], p["steps"], 2e-5),
                                               rel=1e-6)
    assert p["epsilon_rdp"] is None and p["epsilon_spent"] <= 8


def test_the_report_marks_a_paper_value_beside_runs_under_another_convention(tmp_path):
    """dpzero_roberta's values were obtained under replace-one: beside add/remove runs they carry ‡ and its
    footnote, beside privacy.convention=paper runs nothing; non-private cells have no convention to differ in."""
    from dpft.report.collect import report

    for seed in (0, 1):
        _fake(tmp_path, "dpzero", 2.0, seed, 90.0, privacy={"mechanism": "gaussian", "convention": "paper"},
              config={"privacy": {"convention": "paper"}}, name=f"paper-{seed}")
        _fake(tmp_path, "dpzero", 2.0, seed, 91.0, privacy={"mechanism": "gaussian", "convention": "ours"},
              config={"privacy": {"convention": "ours"}}, name=f"ours-{seed}")
    _fake(tmp_path, "mezo", math.inf, 0, 92.0, privacy={"mechanism": "none"})
    out = report(tmp_path, table="dpzero_roberta")
    rows = {(r["method"], r["variant"]): r for r in out.rows()}
    assert rows[("dpzero", "privacy.convention=paper")]["paper_privacy"]
    assert not rows[("dpzero", "privacy.convention=ours")]["paper_privacy"]
    assert rows[("mezo", None)]["paper_privacy"]
    table = (tmp_path / "table.md").read_text()
    assert "| 90.0 ± 0.0 | 91.8 | -1.8 |" in table and "| 91.0 ± 0.0 | 91.8‡ | -0.8 |" in table
    assert "‡ Not the paper's privacy convention" in table and "| 92.0 | 92.5 |" in table
    assert (tmp_path / "table.tex").read_text().count(r"$^\ddagger$") == 2


def test_a_checkpoint_from_before_the_convention_resumes_and_a_changed_convention_does_not():
    from dataclasses import asdict

    from dpft.privacy.ledger import PrivacyStatementMismatch

    spec = make_spec("gaussian", "pld", 2.0, 1e-5, 200, 10, 20, 1.0)
    old = {k: v for k, v in asdict(spec).items() if k not in ("convention", "local")}
    ledger = PrivacyLedger(spec)
    ledger.load_state_dict({"spec": old, "steps": 3})
    assert ledger.steps == 3
    paper = make_spec("gaussian", "pld", 2.0, 1e-5, 200, 10, 20, 1.0, convention="paper")
    with pytest.raises(PrivacyStatementMismatch, match="convention: 'ours' -> 'paper'"):
        PrivacyLedger(paper).load_state_dict({"spec": old, "steps": 3})


def test_a_local_statement_is_replace_one_without_amplification():
    """DR-Encoder's local noise: each upload private on its own, so T Gaussian releases at q = 1 under replace-one,
    whatever q the clients are sampled at; σ minimal for it; RDP refused; composed likewise."""
    n, m, steps, delta, target = 40, 4, 6, 1e-4, 5.0
    spec = make_spec("gaussian", "pld", target, delta, n, m, steps, 0.3, adjacency="add/remove one client",
                     local=True)
    assert spec.local and spec.adjacency == "replace one client (each upload on its own: local)"
    assert spec.sample_rate == m / n  # the clients are still sampled at q; the guarantee does not use it
    block = PrivacyLedger(spec).report()
    assert block["local"] is True and block["convention"] == "ours" and block["adjacency"] == spec.adjacency
    expected = replace_one_epsilon(spec.noise_multiplier, 1.0, steps, delta)
    assert spec.epsilon(steps) == pytest.approx(expected, rel=1e-6) and spec.epsilon(steps, "rdp") is None
    assert expected <= target < replace_one_epsilon(spec.noise_multiplier * 0.99, 1.0, steps, delta)
    amplified = make_spec("gaussian", "pld", target, delta, n, m, steps, 0.3, convention="paper")
    assert spec.noise_multiplier > 2 * amplified.noise_multiplier
    with pytest.raises(PrivacyConfigError, match="method.noise_placement=local .* set privacy.accountant=pld"):
        make_spec("gaussian", "rdp", target, delta, n, m, steps, 0.3, local=True)
    eps, _ = composed_epsilon([{**spec.as_dict(), "steps": 6}, {**spec.as_dict(), "steps": 2}])
    assert eps == pytest.approx(replace_one_epsilon(spec.noise_multiplier, 1.0, 8, delta), rel=1e-3)
    with pytest.raises(PrivacyConfigError, match="different adjacencies"):
        composed_epsilon([spec.as_dict(), make_spec("gaussian", "pld", target, delta, n, m, steps, 0.3).as_dict()])
