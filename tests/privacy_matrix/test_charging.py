"""Claim 5 — every release is charged, for every private method.

In real runs (plain, secure, and secure resumed from a checkpoint) the ledger's steps equal the releases counted
from outside the method (training steps, and DR-Encoder's stage-1 rounds), an empty last batch included, and ε
equals dp_accounting's (or the Laplace closed form) for the run's own σ, q, steps and δ. One step at a time,
each step is charged (and written to the secure journal a restart reads) before its data are read, and a step
past the budget is refused before it reads anything. Nothing uncharged is released: a private step logs only
privatised values and its results hold no raw statistics unless privacy.diagnostics=true.
"""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

from dpft.checkpointing import JOURNAL, ResumableRun
from dpft.privacy.ledger import BudgetExceededError
from tests.conftest import requires_data
from tests.privacy_matrix.matrix import (
    METHODS,
    RESUME_AT,
    STEPS,
    build,
    check_epsilon,
    family,
    run_overrides,
    units,
)

pytestmark = requires_data

# what a private step may log: values computed from the noised release only
PRIVATISED = ("train/projected_grad", "fed/update_norm", "anadp/sigma/")
RAW = ("train/loss", "train/grad_norm_median", "train/batch_size", "fed/clients", "fed/upload_bytes",
       "dropped_nonfinite_examples", "nonfinite_scalars", "nonfinite_client_updates", "clients_per_round",
       "upload_bytes_per_round", "clients_sampled", "upload_bytes_total", "prior_upload_bytes")


@pytest.mark.parametrize("method", METHODS)
def test_a_run_charges_every_release_once_at_the_epsilon_dp_accounting_gives(method, matrix_runs):
    runs = matrix_runs(method)
    cfg = runs.cfg
    n = units(cfg)
    q, delta, directions = cfg.method.batch_size / n, cfg.privacy.target_delta, int(cfg.method.get("directions", 1))
    last = int(cfg.trainer.max_steps) - 1
    assert runs.plain.batches[last] == []  # the last step released pure noise: it must be charged too
    resumed = runs.secure.stage_one_releases + RESUME_AT + runs.resumed.released  # both sessions of that run
    # the ledger came back from the checkpoint (not rebuilt from the secure journal, which would charge a lost step)
    assert runs.resumed.results["resume"]["from_step"] == RESUME_AT
    assert runs.resumed.results["resume"]["lost_steps_charged"] == 0
    for session, released in [(runs.plain, runs.plain.stage_one_releases + runs.plain.released),
                              (runs.plain_again, runs.plain_again.stage_one_releases + runs.plain_again.released),
                              (runs.secure, runs.secure.stage_one_releases + runs.secure.released),
                              (runs.secure_again, runs.secure_again.stage_one_releases + runs.secure_again.released),
                              (runs.resumed, resumed)]:
        block = session.results["privacy"]
        assert block["steps"] == released == STEPS == block["budget_steps"]
        assert block["target_delta"] == delta
        check_epsilon(block, q, released, delta, directions)
    # nothing uncharged in what the run wrote
    for session in (runs.plain, runs.secure):
        written = {*session.results["privacy"], *session.results.get("communication", {}), *session.results["summary"]}
        assert not {key.split("/")[-1] for key in written} & set(RAW)
        assert "nonprivate_releases" not in session.results


def _reads_data(built, record):
    """Wrap where each family reads training data (a forward on a batch, a client's local steps)."""
    module = built.module
    name = "local_update" if family(built.method) == "federated" else "per_example_losses"
    original = getattr(module, name)

    def spy(*args, **kwargs):
        record()
        return original(*args, **kwargs)

    setattr(module, name, spy)


def _weights(built) -> list[torch.Tensor]:
    return [p.detach().clone() for p in built.params]


@pytest.mark.parametrize("method", METHODS)
def test_each_step_is_charged_and_journalled_before_its_data_are_read_and_none_past_the_budget(method, tmp_path):
    built = build(method, *run_overrides(method), "privacy.secure_mode=true")
    module, ledger = built.module, built.module.ledger
    ResumableRun(tmp_path, built.cfg, None).setup(SimpleNamespace(is_global_zero=True), module, "fit")
    journal = tmp_path / "checkpoints" / JOURNAL

    def started() -> int:
        return json.loads(journal.read_text())["steps_started"] if journal.exists() else 0

    reads: list[tuple[int, int]] = []
    _reads_data(built, lambda: reads.append((ledger.steps, started())))
    built.stepper.start()
    charged = ledger.steps  # DR-Encoder's stage-1 rounds
    assert charged == int(built.cfg.method.get("prior_rounds", 0) or 0) == started()
    federated = family(method) == "federated"
    nonempty = {"clients": [0, 3, 5]} if federated else built.batch([0, 3, 5])
    empty = {"clients": []} if federated else built.batch([])
    for batch in [nonempty] * (STEPS - charged - 1) + [empty]:  # the last step's batch is empty
        before = _weights(built)
        built.stepper.step(batch)
        charged += 1
        assert ledger.steps == started() == charged
        assert any(not torch.equal(a, b) for a, b in zip(before, built.params))  # a release took place
    assert reads and all(steps == journalled > 0 for steps, journalled in reads)  # charged before reading
    assert ledger.steps == STEPS == ledger.spec.steps
    reads.clear()
    before = _weights(built)
    with pytest.raises(BudgetExceededError):
        built.stepper.step(nonempty)
    assert not reads and all(torch.equal(a, b) for a, b in zip(before, built.params)) and started() == STEPS
    assert ledger.epsilon_spent() <= ledger.spec.target_epsilon
    # what the steps logged: privatised values only
    assert all(name.startswith(PRIVATISED) for name in built.stepper.logged)
    assert module.raw_logged == set()


@pytest.mark.parametrize("method", METHODS)
def test_raw_statistics_are_released_only_with_diagnostics(method):
    built = build(method, *run_overrides(method), "privacy.diagnostics=true")
    built.stepper.start()
    built.stepper.step({"clients": [1, 2]} if family(method) == "federated" else built.batch([1, 2]))
    raw = {name for name in built.stepper.logged if not name.startswith(PRIVATISED)}
    assert raw and raw == built.module.raw_logged  # logged, and listed for results.json's nonprivate_releases
