"""Claim 1 — sampling realised = sampling accounted, for every private method.

The batches (examples, or clients) each step of a real run trains on equal the Poisson draws recomputed here
from the published rule at the rate q = B / n the run's accountant uses: plain runs at the experiment seed,
secure runs at the secret seed their checkpoint keeps, a resumed secure run continuing the same draws, and
DR-Encoder's stage-1 rounds from their own stream. The seed is one whose draws end with an empty batch, so
batch sizes vary and an empty batch is part of what must match.
"""

from __future__ import annotations

import pytest
import torch

from dpft.methods.federated import _PRIOR_SAMPLING
from dpft.seeding import derive_seed
from tests.conftest import requires_data
from tests.privacy_matrix.matrix import METHODS, RESUME_AT, SAMPLER_DRAWS, poisson_draw, units

pytestmark = requires_data


def _stage_one_draw(seed: int, round_: int, n: int, q: float) -> list[int]:
    """DR-Encoder's stage-1 rule: round r's clients from a generator seeded with derive_seed(derive_seed(seed,
    stream), r), member iff U_i < q."""
    generator = torch.Generator().manual_seed(derive_seed(derive_seed(seed, _PRIOR_SAMPLING), round_))
    return [i for i, u in enumerate(torch.rand(n, generator=generator).tolist()) if u < q]


@pytest.mark.parametrize("method", METHODS)
def test_every_step_trains_on_the_published_poisson_draw_at_the_accounted_rate(method, matrix_runs):
    runs = matrix_runs(method)
    cfg = runs.cfg
    n = units(cfg)
    q = cfg.method.batch_size / n
    steps = range(int(cfg.trainer.max_steps))
    accounted = runs.plain.results["privacy"]
    assert accounted["sample_rate"] == q and accounted["dataset_size"] == n

    assert runs.plain.batches == {t: poisson_draw(runs.seed, t, n, q) for t in steps}
    # the run's sampler over many more steps: a realised rate of B/(n+1) differs in about a fifth of them
    assert runs.plain.sampler_draws == [poisson_draw(runs.seed, t, n, q) for t in range(SAMPLER_DRAWS)]
    assert runs.plain_again.batches == runs.plain.batches
    sizes = [len(runs.plain.batches[t]) for t in steps]
    assert sizes[-1] == 0 < sizes[0]  # sizes vary; the empty batch is released too (claim 5)

    secret = runs.secret
    assert secret != runs.seed
    assert runs.secure.batches == {t: poisson_draw(secret, t, n, q) for t in steps}
    assert runs.secure_again.batches == {t: poisson_draw(runs.secret_again, t, n, q) for t in steps}
    # resumed from the checkpoint after step RESUME_AT: the same draws from there on, none replayed or skipped
    assert runs.resumed.batches == {t: poisson_draw(secret, t, n, q) for t in steps if t >= RESUME_AT}

    rounds = int(cfg.method.get("prior_rounds", 0) or 0)
    assert runs.plain.stage_one == [_stage_one_draw(runs.seed, r, n, q) for r in range(rounds)]
    assert runs.secure.stage_one == [_stage_one_draw(secret, r, n, q) for r in range(rounds)]
