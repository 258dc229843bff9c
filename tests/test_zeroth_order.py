"""The MeZO engine: exact bookkeeping of perturbations, reproducibility, and a direction that descends."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from dpft import seeding
from dpft.methods.zeroth_order import StageSchedule, ZerothOrderSGD


def _model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3))


def _closure(model: nn.Module, x: torch.Tensor, y: torch.Tensor):
    def closure() -> torch.Tensor:
        return nn.functional.cross_entropy(model(x), y, reduction="none")

    return closure


def _batch(seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(8, 6, generator=g), torch.randint(0, 3, (8,), generator=g)


def test_two_perturbations_restore_the_parameters():
    model = _model()
    before = [p.detach().clone() for p in model.parameters()]
    seen = []
    opt = ZerothOrderSGD(model.parameters(), lr=0.0, eps=1e-3, seed=5)
    x, y = _batch()
    closure = _closure(model, x, y)

    def spy() -> torch.Tensor:
        seen.append([p.detach().clone() for p in model.parameters()])
        return closure()

    opt.step(spy)
    # the two forwards saw θ + φz and θ - φz: symmetric around θ
    for plus, minus, theta in zip(seen[0], seen[1], before):
        torch.testing.assert_close((plus + minus) / 2, theta, rtol=0, atol=1e-7)
        assert (plus - theta).abs().max() > 1e-5  # a real perturbation happened
    # lr = 0: θ is back, up to float rounding of x + φz - 2φz + φz (at most a few ulps of |θ|)
    for p, theta in zip(model.parameters(), before):
        ulp = torch.finfo(p.dtype).eps * theta.abs().clamp(min=1e-3)
        assert ((p - theta).abs() <= 4 * ulp).all()


def test_no_drift_after_many_zero_lr_steps():
    model = _model()
    before = [p.detach().clone() for p in model.parameters()]
    opt = ZerothOrderSGD(model.parameters(), lr=0.0, eps=1e-3, seed=0)
    x, y = _batch()
    for _ in range(200):
        opt.step(_closure(model, x, y))
    drift = max((p - b).abs().max().item() for p, b in zip(model.parameters(), before))
    assert drift < 1e-6


def test_same_seed_same_parameters():
    def train(seed: int) -> list[torch.Tensor]:
        model = _model()
        opt = ZerothOrderSGD(model.parameters(), lr=1e-2, eps=1e-3, seed=seed)
        for step in range(10):
            opt.step(_closure(model, *_batch(step)))
        return [p.detach().clone() for p in model.parameters()]

    a, b, c = train(7), train(7), train(8)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert any(not torch.equal(x, z) for x, z in zip(a, c))


def test_update_equals_the_written_rule():
    """θ_new = θ - η g z with g = (mean ℓ⁺ - mean ℓ⁻)/2φ, z regenerated from the step seed."""
    model = _model()
    theta = [p.detach().clone() for p in model.parameters()]
    lr, eps = 1e-2, 1e-3
    opt = ZerothOrderSGD(model.parameters(), lr=lr, eps=eps, seed=3)
    x, y = _batch()
    opt.step(_closure(model, x, y))
    g = opt.state["zo"]["projected_grads"][0]
    seed = opt.step_seed(0)
    zs = [opt._z(p, i, seed) for i, p in enumerate(model.parameters())]
    # recompute g independently
    ref = _model()
    with torch.no_grad():
        for p, t, z in zip(ref.parameters(), theta, zs):
            p.copy_(t + eps * z)
        lp = _closure(ref, x, y)().mean()
        for p, t, z in zip(ref.parameters(), theta, zs):
            p.copy_(t - eps * z)
        lm = _closure(ref, x, y)().mean()
    assert abs(g - float((lp - lm) / (2 * eps))) < 1e-3 * max(1.0, abs(g))
    for p, t, z in zip(model.parameters(), theta, zs):
        torch.testing.assert_close(p, t - lr * g * z, rtol=0, atol=1e-6)


def test_average_direction_points_along_the_true_gradient():
    """On f(θ) = ½‖Aθ - b‖², E[g z] = ∇f (SPSA is unbiased for quadratics): cosine clearly > 0."""
    torch.manual_seed(0)
    dim = 20
    a, b = torch.randn(30, dim), torch.randn(30)
    theta = nn.Parameter(torch.randn(dim))
    start = theta.detach().clone()
    true_grad = a.T @ (a @ start - b)
    opt = ZerothOrderSGD([theta], lr=0.0, eps=1e-3, seed=0)
    total = torch.zeros(dim)
    for _ in range(2000):
        opt.step(lambda: 0.5 * ((a @ theta - b) ** 2).sum().reshape(1))
        seed = opt.step_seed(opt.state["zo"]["step"] - 1)
        total += opt.state["zo"]["projected_grads"][0] * opt._z(theta, 0, seed)
    cosine = torch.nn.functional.cosine_similarity(total, true_grad, dim=0)
    assert cosine > 0.7, cosine


def test_state_dict_round_trip_continues_identically():
    x, y = _batch()
    model = _model()
    opt = ZerothOrderSGD(model.parameters(), lr=1e-2, eps=1e-3, seed=9)
    for _ in range(3):
        opt.step(_closure(model, x, y))
    saved_params = [p.detach().clone() for p in model.parameters()]
    saved = copy.deepcopy(opt.state_dict())
    opt.step(_closure(model, x, y))
    expected = [p.detach().clone() for p in model.parameters()]

    resumed = _model()
    with torch.no_grad():
        for p, s in zip(resumed.parameters(), saved_params):
            p.copy_(s)
    opt2 = ZerothOrderSGD(resumed.parameters(), lr=1e-2, eps=1e-3, seed=9)
    opt2.load_state_dict(saved)
    assert opt2.state["zo"]["step"] == 3
    opt2.step(_closure(resumed, x, y))
    assert all(torch.equal(p, e) for p, e in zip(resumed.parameters(), expected))


def test_a_checkpoint_resumes_only_with_the_generator_that_drew_its_directions():
    model = _model()
    opt = ZerothOrderSGD(model.parameters(), lr=1e-2, eps=1e-3, seed=9, z_generator="philox")
    opt.step(_closure(model, *_batch()))
    saved = copy.deepcopy(opt.state_dict())
    with pytest.raises(ValueError, match="z_generator='philox'.*method.z_generator=philox"):
        ZerothOrderSGD(_model().parameters(), lr=1e-2, eps=1e-3, seed=9, z_generator="torch").load_state_dict(saved)
    del saved["state"]["zo"]["z_generator"]  # a checkpoint from before the option: torch's generator
    with pytest.raises(ValueError, match="z_generator='torch'"):
        ZerothOrderSGD(_model().parameters(), lr=1e-2, eps=1e-3, seed=9).load_state_dict(saved)


def test_the_generators_draw_different_standard_normal_directions_from_one_seed():
    p = nn.Parameter(torch.zeros(1000))
    zs = [ZerothOrderSGD([p], lr=0.1, seed=3, z_generator=g)._z(p, 0, 11) for g in ("philox", "torch")]
    for z in zs:
        assert abs(z.mean()) < 0.15 and abs(z.std() - 1) < 0.1
    assert abs(torch.corrcoef(torch.stack(zs))[0, 1]) < 0.15


def test_a_bfloat16_parameter_gets_the_float32_direction_rounded():
    """Philox draws float32; a half-precision parameter adds it rounded to its dtype (through a chunk buffer)."""
    half, single = nn.Parameter(torch.zeros(300, dtype=torch.bfloat16)), nn.Parameter(torch.zeros(300))
    opt = ZerothOrderSGD([half], lr=0.0, eps=1e-3, seed=1)
    z = opt._z(half, 0, 5)
    assert z.dtype == torch.bfloat16
    assert torch.equal(z, ZerothOrderSGD([single], lr=0.0, seed=1)._z(single, 0, 5).to(torch.bfloat16))
    opt.perturb(5, 0.5)
    assert torch.equal(half.detach(), 0.5 * z)


def test_philox_directions_do_not_depend_on_the_chunk_size(monkeypatch):
    """Entry e of a Philox direction is a function of (key, e): chunks change where a thread starts, not z."""
    model = _model()
    params = list(model.parameters())
    opt = ZerothOrderSGD(params, lr=1e-2, eps=1e-3, seed=4)
    whole = [opt._z(p, i, 17) for i, p in enumerate(params)]
    monkeypatch.setattr(seeding, "CHUNK", 7)
    assert all(torch.equal(opt._z(p, i, 17), z) for (i, p), z in zip(enumerate(params), whole))


def test_step_never_touches_the_global_rng():
    model = _model()
    opt = ZerothOrderSGD(model.parameters(), lr=1e-2, eps=1e-3, seed=1)
    state = torch.get_rng_state()
    opt.step(_closure(model, *_batch()))
    assert torch.equal(torch.get_rng_state(), state)


@pytest.mark.parametrize("z_generator", ["philox", "torch"])
def test_per_parameter_seeding_is_independent_of_parameter_order(z_generator):
    x, y = _batch()
    names = [n for n, _ in _model().named_parameters()]

    def train(order: list[int]) -> dict[str, torch.Tensor]:
        model = _model()
        params = dict(model.named_parameters())
        chosen = [names[i] for i in order]
        opt = ZerothOrderSGD([params[n] for n in chosen], lr=1e-2, eps=1e-3, seed=2, param_names=chosen,
                             z_generator=z_generator)
        for _ in range(3):
            opt.step(_closure(model, x, y))
        return {n: p.detach().clone() for n, p in model.named_parameters()}

    straight, permuted = train([0, 1, 2, 3]), train([3, 1, 0, 2])
    assert all(torch.equal(straight[n], permuted[n]) for n in names)


@pytest.mark.parametrize("chunk,parallel_min", [(4, 0), (1 << 20, 1 << 22)], ids=["many_chunks_threads",
                                                                               "one_chunk_serial"])
@pytest.mark.parametrize("directions", [1, 2])
@pytest.mark.parametrize("z_generator", ["philox", "torch"])
def test_chunked_update_with_mask_decay_and_anchor_equals_the_written_rule(monkeypatch, request, chunk, parallel_min,
                                                                          directions, z_generator):
    """z is drawn and applied a chunk at a time (split over threads, or in the caller's thread for a model this
    small); with chunks of 4 entries and K directions the step still is θ ← θ(1 - η(λ+ρ)) + ηρ θ_ref - η/K Σ_k g_k z_k
    on the masked coordinates, the others untouched, with z_k the parameter's whole direction (`_z`), whose
    entries are standard normal."""
    monkeypatch.setattr(seeding, "CHUNK", chunk)
    monkeypatch.setattr(seeding, "PARALLEL_MIN", parallel_min)
    monkeypatch.setattr(seeding, "_pools", {})
    threads = torch.get_num_threads()
    torch.set_num_threads(2)  # the threaded path needs more than one intra-op thread (tests may run on one)
    request.addfinalizer(lambda: torch.set_num_threads(threads))
    model = _model()
    params = list(model.parameters())
    masks = [torch.tensor([0, 3, 4, 7, 9, 10, 11, 13, 14, 21, 29]), None, None, torch.tensor([1, 2])]
    lr, eps, decay, rho = 1e-2, 1e-3, 0.1, 0.5
    opt = ZerothOrderSGD(params, lr=lr, eps=eps, weight_decay=decay, seed=5, masks=masks, proximal=rho,
                         schedule=StageSchedule(first_stage=100), directions=directions, z_generator=z_generator)
    x, y = _batch()
    anchor = [p.detach().clone().view(-1) for p in params]
    opt.step(_closure(model, x, y))  # the first step sets θ_ref = θ_0; the second is checked
    before = [p.detach().clone().view(-1) for p in params]
    opt.step(_closure(model, x, y))
    assert bool(seeding._pools) == (parallel_min == 0)
    grads, seeds = opt.state["zo"]["projected_grads"], [opt.step_seed(1, k) for k in range(directions)]
    for i, p in enumerate(params):
        step = sum(g * opt._z(p, i, seed).view(-1) for g, seed in zip(grads, seeds)) / directions
        coords = masks[i] if masks[i] is not None else torch.arange(p.numel())
        expected = before[i].clone()
        expected[coords] = (before[i][coords] * (1 - lr * (decay + rho)) + lr * rho * anchor[i][coords]
                            - lr * step)
        torch.testing.assert_close(p.detach().view(-1), expected, rtol=0, atol=1e-6)
    draws = torch.cat([opt._z(params[1], 1, s).view(-1) for s in range(400)])  # 400 × 5 entries
    assert abs(draws.mean().item()) < 0.1 and abs(draws.std().item() - 1.0) < 0.05


def test_sphere_directions_have_norm_sqrt_d_and_the_update_follows_the_written_rule():
    """direction=sphere (DPZero): z_k scaled to ‖z_k‖ = √d over all parameters; θ ← θ − η g z_k exactly, and the
    perturbations around the step cancel as with Gaussian directions."""
    x, y = _batch()
    model = _model()
    params = list(model.parameters())
    theta = [p.detach().clone() for p in params]
    lr = 0.1
    opt = ZerothOrderSGD(params, lr=lr, eps=1e-3, seed=4, direction="sphere")
    gaussian = ZerothOrderSGD([p.detach().clone() for p in params], lr=lr, eps=1e-3, seed=4)
    opt.step(lambda: nn.functional.cross_entropy(model(x), y, reduction="none"))
    seed = opt.step_seed(0)
    zs = [opt._z(p, i, seed) for i, p in enumerate(params)]
    d = sum(p.numel() for p in params)
    assert float(torch.sqrt(sum(z.double().pow(2).sum() for z in zs))) == pytest.approx(d ** 0.5, rel=1e-6)
    raw = [gaussian._z(p, i, seed) for i, p in enumerate(gaussian.param_groups[0]["params"])]
    scale = opt.direction_scale(seed)
    assert scale != pytest.approx(1.0, abs=1e-3)  # a real rescaling, the same for every parameter
    assert all(torch.allclose(z, scale * r) for z, r in zip(zs, raw))
    g = opt.state["zo"]["projected_grads"][0]
    for p, t, z in zip(params, theta, zs):
        torch.testing.assert_close(p, t - lr * g * z, rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="method.direction='ball' is not one of"):
        ZerothOrderSGD(params, lr=lr, direction="ball")
