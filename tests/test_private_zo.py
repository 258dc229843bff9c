"""The private zeroth-order family on one engine: equivalence to MeZO, noise, clipping, sampling, masks."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from dpft.data.sampling import PoissonBatchSampler
from dpft.methods.pruning import data_free_mask
from dpft.methods.zeroth_order import ParameterNoiseEstimator, PrivateEstimator, StageSchedule, ZerothOrderSGD


def _model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3))


def _batches(n: int = 6, size: int = 8):
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(size, 6, generator=g), torch.randint(0, 3, (size,), generator=g)) for _ in range(n)]


def _train(estimator=None, steps: int = 6, **kwargs) -> list[torch.Tensor]:
    model = _model()
    opt = ZerothOrderSGD(model.parameters(), lr=0.05, eps=1e-3, seed=4, estimator=estimator, **kwargs)
    for x, y in _batches(steps):
        opt.step(lambda x=x, y=y: nn.functional.cross_entropy(model(x), y, reduction="none"))
    return [p.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize("clip_target", ["difference", "normalized"])
def test_no_noise_and_infinite_clip_is_bit_identical_to_mezo(clip_target):
    mezo = _train()
    private = _train(PrivateEstimator(math.inf, clip_target, noise_multiplier=0.0, mechanism="gaussian",
                                      expected_batch_size=8, seed=0))
    assert all(torch.equal(a, b) for a, b in zip(mezo, private))


@pytest.mark.parametrize("direction", ["sphere", "gaussian"])
def test_dpgd_zero_noise_and_infinite_clip_equals_mezo_and_its_clip_is_on_the_gradient_norm(direction):
    """DPGD-0th without noise and with an infinite bound is MeZO; with a finite bound each example's r_i z is
    clipped to ‖r_i z‖ ≤ C, i.e. |r_i| ≤ C/‖z‖ (‖z‖ computed here from the direction the step applied)."""
    mezo = _train(direction=direction)
    dpgd = _train(ParameterNoiseEstimator(math.inf, noise_multiplier=0.0, expected_batch_size=8, seed=0),
                  direction=direction)
    assert all(torch.equal(a, b) for a, b in zip(mezo, dpgd))
    model = _model()
    estimator = ParameterNoiseEstimator(0.01, noise_multiplier=0.0, expected_batch_size=1, seed=0)
    opt = ZerothOrderSGD(model.parameters(), lr=0.05, eps=1e-3, seed=4, estimator=estimator, direction=direction)
    x, y = _batches(1)[0]
    opt.step(lambda: nn.functional.cross_entropy(model(x), y, reduction="none"))
    seed = opt.step_seed(0)
    norm = math.sqrt(sum(float(z.double().pow(2).sum()) for z in (opt._z(p, i, seed) for i, _, p in opt._params())))
    assert estimator.direction_norm == pytest.approx(norm, rel=1e-6)
    assert abs(opt.state["zo"]["projected_grads"][0]) <= 8 * 0.01 / norm * (1 + 1e-9)  # 8 examples, each ≤ C/‖z‖


def test_noise_changes_the_update():
    mezo = _train()
    noisy = _train(PrivateEstimator(math.inf, "normalized", noise_multiplier=1.0, mechanism="gaussian",
                                    expected_batch_size=8, seed=0))
    assert any(not torch.equal(a, b) for a, b in zip(mezo, noisy))


def _noise_draws(mechanism: str, multiplier: float, clip: float, target: str, eps: float, n: int) -> torch.Tensor:
    est = PrivateEstimator(clip, target, noise_multiplier=multiplier, mechanism=mechanism,
                           expected_batch_size=1.0, seed=123)
    zero = torch.zeros(3)
    return torch.tensor([est(zero, zero, eps) for _ in range(n)], dtype=torch.float64)


@pytest.mark.parametrize("target,bound", [("normalized", 2.0), ("difference", 0.05 / (2 * 1e-3))])
def test_gaussian_noise_std_matches_the_calibrated_value(target, bound):
    clip = 2.0 if target == "normalized" else 0.05
    draws = _noise_draws("gaussian", 1.5, clip, target, 1e-3, 20_000)
    expected = 1.5 * bound
    # the sample std of 20k normals is within 2.5% of σ with probability > 1 - 1e-6 (SE = σ/√(2n) = 0.5%)
    assert draws.std().item() == pytest.approx(expected, rel=0.025)
    assert abs(draws.mean().item()) < 5 * expected / math.sqrt(20_000)


def test_laplace_noise_scale_matches_the_calibrated_value():
    draws = _noise_draws("laplace", 0.8, 3.0, "normalized", 1e-3, 20_000)
    b = 0.8 * 3.0
    assert draws.abs().mean().item() == pytest.approx(b, rel=0.03)  # E|X| = b
    assert draws.std().item() == pytest.approx(math.sqrt(2) * b, rel=0.04)


@pytest.mark.parametrize("adversarial", [1e6, -1e9, math.inf, -math.inf, math.nan])
@pytest.mark.parametrize("clip_target", ["difference", "normalized"])
def test_one_example_moves_the_clean_sum_by_at_most_the_clip_bound(adversarial, clip_target):
    eps = 1e-3
    est = PrivateEstimator(0.05 if clip_target == "difference" else 10.0, clip_target, 0.0, "gaussian", 4, seed=0)
    plus = torch.tensor([0.70, 0.69, 0.71, 0.68], dtype=torch.float32)
    minus = torch.tensor([0.69, 0.70, 0.70, 0.69], dtype=torch.float32)
    base = est.clipped_sum(plus, minus, eps)
    plus_adv, minus_adv = plus.clone(), minus.clone()
    plus_adv[2] = adversarial
    changed = est.clipped_sum(plus_adv, minus_adv, eps)
    assert torch.isfinite(changed)
    # replacing one example = removing it and adding another: at most 2·bound; removing alone: ≤ bound
    assert abs(changed - base) <= 2 * est.bound(eps) + 1e-9
    removed = est.clipped_sum(torch.cat([plus[:2], plus[3:]]), torch.cat([minus[:2], minus[3:]]), eps)
    assert abs(changed - removed) <= est.bound(eps) + 1e-9
    assert est.nonfinite == (0 if math.isfinite(adversarial) else 1)


def test_nan_losses_never_reach_the_parameters_of_a_private_step():
    model = _model()
    est = PrivateEstimator(1.0, "normalized", 1.0, "gaussian", 8, seed=0)
    opt = ZerothOrderSGD(model.parameters(), lr=0.05, eps=1e-3, seed=0, estimator=est)
    x, y = _batches(1)[0]

    def closure():
        losses = nn.functional.cross_entropy(model(x), y, reduction="none")
        return torch.where(torch.arange(8) == 3, torch.tensor(float("nan")), losses)

    opt.step(closure)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert est.nonfinite == 1


def test_empty_batch_applies_a_pure_noise_update():
    model = _model()
    before = [p.detach().clone() for p in model.parameters()]
    est = PrivateEstimator(1.0, "normalized", 2.0, "gaussian", 8, seed=0)
    opt = ZerothOrderSGD(model.parameters(), lr=0.05, eps=1e-3, seed=0, estimator=est)
    opt.step(lambda: torch.zeros(0))
    assert opt.state["zo"]["projected_grads"][0] != 0.0
    assert any(not torch.equal(a, p) for a, p in zip(before, model.parameters()))


def test_k_directions_use_2k_forwards_and_average_their_updates():
    calls = []
    model = _model()
    opt = ZerothOrderSGD(model.parameters(), lr=0.05, eps=1e-3, seed=0, directions=3)
    x, y = _batches(1)[0]

    def closure():
        calls.append(1)
        return nn.functional.cross_entropy(model(x), y, reduction="none")

    opt.step(closure)
    assert len(calls) == 6 and len(opt.state["zo"]["projected_grads"]) == 3


# --- Poisson sampling -----------------------------------------------------------------------------
def test_poisson_sampler_inclusion_rate_and_empty_batches():
    sampler = PoissonBatchSampler(num_examples=1000, sample_rate=0.05, seed=0)
    sizes = [len(sampler.batch(i)) for i in range(400)]
    mean = sum(sizes) / len(sizes)
    # mean of 400 Binomial(1000, 0.05) draws: SE = √(47.5/400) ≈ 0.34
    assert abs(mean - 50) < 2.0
    assert len(set(sizes)) > 10  # sizes vary
    assert sampler.batch(7) == sampler.batch(7)  # batch t is a function of (seed, t)
    tiny = PoissonBatchSampler(num_examples=10, sample_rate=0.05, seed=0)
    batches = [tiny.batch(i) for i in range(200)]
    assert sum(1 for b in batches if not b) > 80  # P(empty) = 0.95^10 ≈ 0.60
    assert len(list(iter(tiny))) == len(tiny) == 20


# --- DP-ZOSO stages and DP-ZOPO masks --------------------------------------------------------------
def test_stage_schedule_doubles_stage_lengths_halves_lr_and_resets_the_anchor():
    schedule = StageSchedule(first_stage=2, lr_decay=0.5, eps_decay=0.5)
    assert [schedule.stage(t) for t in range(15)] == [0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 2, 2, 2, 2, 3]
    model = _model()
    opt = ZerothOrderSGD(model.parameters(), lr=0.1, eps=1e-2, seed=0, schedule=schedule, proximal=0.5)
    x, y = _batches(1)[0]
    anchors = []
    for _ in range(7):
        opt.step(lambda: nn.functional.cross_entropy(model(x), y, reduction="none"))
        anchors.append(opt.state[next(model.parameters())]["anchor"].clone())
    assert opt.param_groups[0]["lr"] == pytest.approx(0.025) and opt.param_groups[0]["eps"] == pytest.approx(2.5e-3)
    assert torch.equal(anchors[0], anchors[1]) and not torch.equal(anchors[1], anchors[2])  # reset at step 2
    assert torch.equal(anchors[2], anchors[5]) and not torch.equal(anchors[5], anchors[6])  # and at step 6


def _opt_tiny():
    from dpft.models.loading import load_model
    from tests.conftest import compose_config

    return load_model(compose_config(["model=opt-tiny"]).model)


def test_dpzopo_mask_is_data_free_and_only_masked_coordinates_move():
    model = _opt_tiny()
    params = [p for p in model.parameters() if p.requires_grad]
    masks = data_free_mask(params, model, fraction=0.01, queries=2, seed=0)
    again = data_free_mask(params, model, fraction=0.01, queries=2, seed=0)
    assert all(torch.equal(a, b) for a, b in zip(masks, again))  # deterministic, and the model is restored
    chosen = sum(m.numel() for m in masks)
    embeddings = sum(p.numel() for n, p in model.named_parameters() if "embed" in n)
    assert chosen == round(0.01 * (sum(p.numel() for p in params) - embeddings))

    before = [p.detach().clone() for p in params]
    opt = ZerothOrderSGD(params, lr=1.0, eps=1e-2, seed=0, masks=masks)
    ids = torch.randint(3, 1000, (4, 8))
    opt.step(lambda: model(input_ids=ids).logits.float().logsumexp(-1).mean(-1))
    for p, b, m in zip(params, before, masks):
        moved = (p != b).flatten()
        selected = torch.zeros_like(moved)
        selected[m] = True
        assert not moved[~selected].any()
        if m.numel():
            assert moved[m].any()  # the update really reached the parameter (not a copy)
