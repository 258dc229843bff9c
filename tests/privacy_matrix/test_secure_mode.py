"""Claim 7 — secure mode, every private method.

Two plain runs at one seed end with bit-identical weights; two secure runs at that seed end with different
weights, each from a secret sample of its own. In secure mode the noise comes from the OS CSPRNG and no noise
generator state is checkpointed: the secure run resumed from its own checkpoint (same secret sample, same
weights, same directions and dropout states) ends with other weights than the run itself, which only noise that
is never replayed can explain; a seeded generator, saved or rebuilt from the seed, would replay the draws.
"""

from __future__ import annotations

import pytest

from tests.conftest import requires_data
from tests.privacy_matrix.matrix import METHODS

pytestmark = requires_data


@pytest.mark.parametrize("method", METHODS)
def test_secure_noise_is_never_replayed_and_plain_runs_are_reproducible(method, matrix_runs):
    runs = matrix_runs(method)
    digest = {name: getattr(runs, name).results["trainable_parameters_sha256"]
              for name in ("plain", "plain_again", "secure", "secure_again", "resumed")}
    assert digest["plain"] == digest["plain_again"]
    assert digest["secure"] != digest["secure_again"] and runs.secret != runs.secret_again
    assert digest["secure"] != digest["resumed"]
    assert runs.secure.results["privacy"]["secure_mode"] and not runs.plain.results["privacy"]["secure_mode"]
    # noise bytes from the OS: at least 8 per scalar drawn in each secure session, none in plain runs
    assert runs.secure.csprng_bytes >= 8 * runs.secure.released and runs.resumed.csprng_bytes >= 8
    assert runs.plain.csprng_bytes == runs.plain_again.csprng_bytes == 0
    # the checkpoints: the plain run's noise generators are saved (what makes it reproducible), no secure one is
    assert runs.plain_noise_states and all("generator" in s and not s["secure"] for s in runs.plain_noise_states)
    assert len(runs.secure_noise_states) == len(runs.plain_noise_states)
    assert all(s["secure"] and set(s) == {"mechanism", "secure"} for s in runs.secure_noise_states)
