"""Claim 3 — the released noise has the calibrated std, every private method, every parameter, every batch size
or number of clients.

The signal is zeroed (zero loss differences, empty batches, zero client updates, or the same batch released
without noise and subtracted), so what is released is the noise alone; its empirical std over many draws must be
the published multiplier (the results' noise_multiplier, which claim 6 ties to ε) times the clip bound, within 5
standard errors of a sample std (SE ≈ σ√((κ-1)/4n): κ = 3 Gaussian, 6 Laplace). The federated shares must add
up to σC whatever the number of clients.
"""

from __future__ import annotations

import math

import pytest
import torch

from dpft.methods.federated import RandomPrior
from tests.conftest import requires_data
from tests.privacy_matrix.matrix import (
    PARAMETER_NOISE,
    PHI,
    build,
    check_std,
    clip_bound,
    config_value,
    in_family,
    run_overrides,
)

pytestmark = requires_data

C = 0.3  # not the configs' clip


@pytest.mark.parametrize("method", [m for m in in_family("zeroth_order") if m not in PARAMETER_NOISE])
def test_zeroth_order_noise_has_the_calibrated_std_for_every_batch_size(method):
    built = build(method, *run_overrides(method), "method.directions=2", f"method.clip={C}", f"method.eps={PHI}")
    block = built.module.privacy_block()
    bound = clip_bound(method, C, PHI)
    laplace = block["mechanism"] == "laplace"
    std = block["noise_multiplier"] * bound * (math.sqrt(2) if laplace else 1.0)  # Laplace(b): std √2·b
    optimizer, estimator, used = built.optimizer, built.optimizer.estimator, []
    optimizer.estimator = lambda plus, minus, eps: used.append(eps) or estimator(plus, minus, eps)
    optimizer.step(lambda: torch.zeros(5, dtype=torch.float64))  # a real step: read the φ it clips with
    assert used == [PHI, PHI] and all(g != 0 for g in optimizer.state["zo"]["projected_grads"])
    scale = block["expected_batch_size"]  # the release is (clipped sum + noise) / expected batch size
    for size in (0, 1, 5):  # the noise is on the sum: it does not depend on how many examples were sampled
        zero = torch.zeros(size, dtype=torch.float64)
        draws = torch.tensor([estimator(zero, zero, PHI) for _ in range(3000)], dtype=torch.float64) * scale
        check_std(draws, std, f"{method}, {size} examples", kurtosis=6.0 if laplace else 3.0)


@pytest.mark.parametrize("method", sorted(PARAMETER_NOISE))
def test_parameter_noise_has_the_calibrated_std_on_every_parameter_and_batch_size(method):
    """DPGD-0th: with zero loss differences the clipped sum is 0, so a step moves θ by the noise alone: per
    coordinate of every parameter, η·σC/(B√K) (the K directions' releases, each noised with σC, averaged)."""
    lr, directions = 1.0, 2  # a step's noise far above the float32 rounding of perturb and restore
    built = build(method, *run_overrides(method), f"method.directions={directions}", f"method.clip={C}",
                  f"method.eps={PHI}", f"method.lr={lr}")
    block = built.module.privacy_block()
    assert block["noise_space"] == "parameters" and block["mechanism"] == "gaussian"
    std = block["noise_multiplier"] * C  # each release's noise, in units of the clip bound
    scale = block["expected_batch_size"] * math.sqrt(directions) / lr
    names = {id(p): n for n, p in built.module.model.named_parameters()}
    moves: dict[int, list[torch.Tensor]] = {id(p): [] for p in built.params}
    smallest = min(p.numel() for p in built.params)
    for step in range(max(3, math.ceil(3000 / smallest))):
        size = (0, 1, 5)[step % 3]  # the noise does not depend on how many examples were sampled
        before = [p.detach().clone() for p in built.params]
        built.optimizer.step(lambda size=size: torch.zeros(size, dtype=torch.float64))
        assert built.optimizer.state["zo"]["projected_grads"] == [0.0] * directions
        for p, b in zip(built.params, before):
            moves[id(p)].append((p.detach() - b).flatten().double() * scale)
    for p in built.params:  # biases and norms included
        check_std(torch.cat(moves[id(p)]), std, names[id(p)])


def _first_order(method: str, *extra: str):
    anadp = ["method.anadp.warmup_steps=1000000"] if config_value(method, "adaptive_noise") else []
    built = build(method, *run_overrides(method), f"method.clip={C}", *anadp, *extra)
    built.module.model.eval()  # no dropout: the noised and the noiseless release see the same function
    return built


@pytest.mark.parametrize("method", in_family("first_order"))
def test_first_order_noise_has_the_calibrated_std_on_every_parameter_and_batch_size(method):
    built = _first_order(method)
    module, dp = built.module, built.module.dp
    block = module.privacy_block()
    std, scale = block["noise_multiplier"] * C, block["expected_batch_size"]  # ANADP in warm-up: σ_k·C_k = σC
    names = {id(p): n for n, p in module.model.named_parameters()}
    draws: dict[int, list[torch.Tensor]] = {id(p): [] for p in built.params}
    smallest = min(p.numel() for p in built.params)
    for _ in range(math.ceil(2500 / smallest)):  # empty batches: the release is the noise alone
        dp.pre_step(empty=True)
        for p in built.params:
            draws[id(p)].append(p.grad.flatten() * scale)
    for p in built.params:  # biases and norms included
        check_std(torch.cat(draws[id(p)]), std, names[id(p)])

    def release(indices: list[int], noise: bool) -> torch.Tensor:
        batch = built.batch(indices)
        with module.per_example.capture(len(indices)):
            losses = module.per_example_losses(batch)
        module.per_example.backward(losses.sum())
        if noise:
            dp.pre_step(empty=False)
        else:
            dp.noise_std = lambda p: 0.0
            dp.pre_step(empty=False)
            del dp.noise_std
        return torch.cat([p.grad.flatten() for p in built.params])

    for indices in ([4], [0, 5, 9]):  # the same batch with and without noise: the difference is the noise
        noise = (release(indices, True) - release(indices, False)) * scale
        check_std(noise, std, f"{method}, {len(indices)} examples")


def test_anadp_noise_follows_its_allocation_after_warm_up():
    """After warm-up ANADP's σ_k move with importance; each group's noise has std σ_k·C/√K as allocated, and the
    allocation keeps Σ_k σ_k⁻² = σ⁻² (the privacy of one Gaussian with multiplier σ)."""
    built = _first_order("anadp", "method.anadp.warmup_steps=0", "method.anadp.mix=0.9")
    dp = built.module.dp
    sigma = built.module.privacy_block()["noise_multiplier"]
    groups = len(dp.groups)  # one per layer owning trainable weights
    standardised, spread = [], 1.0
    for _ in range(40):
        sigmas = dict(dp.sigmas)  # the allocation this step's noise is drawn with
        assert sum(s ** -2 for s in sigmas.values()) == pytest.approx(sigma ** -2, rel=1e-9)
        spread = max(spread, max(sigmas.values()) / min(sigmas.values()))
        dp.pre_step(empty=True)
        for p in built.params:
            standardised.append(p.grad.flatten() * dp.expected_batch_size /
                                (sigmas[dp.group_of[id(p)]] * C / math.sqrt(groups)))
    assert spread > 1.05  # the allocation really moved
    check_std(torch.cat(standardised), 1.0, "anadp, standardised by the allocated σ_k·C_k")


@pytest.mark.parametrize("method", in_family("federated"))
def test_federated_noise_sums_to_sigma_c_whatever_the_number_of_clients(method):
    built = build(method, *run_overrides(method), f"method.clip={C}")
    module = built.module
    block = module.privacy_block()
    std, m = block["noise_multiplier"] * C, block["expected_batch_size"]
    shapes = [p.shape for p in built.params]
    encoded = module.autoencoder is not None
    if encoded:  # the noise is added by the clients before encoding: read it at the encoder's input
        inputs: list[list[torch.Tensor]] = []
        encode = module.autoencoder.encode
        module.autoencoder.encode = lambda update: inputs.append([u.clone() for u in update]) or encode(update)
    for clients in (0, 1, 3, 8):
        per_tensor: list[list[torch.Tensor]] = [[] for _ in shapes]
        shares: list[torch.Tensor] = []
        for _ in range(16):  # 16 × 128 entries per LoRA tensor
            zero = [[torch.zeros(s) for s in shapes] for _ in range(clients)]
            if encoded:
                inputs.clear()
                module.aggregate(zero)
                assert len(inputs) == max(clients, 1)  # one upload per client, the server's draw when none
                total = [sum(parts) for parts in zip(*inputs)]
                shares += [torch.cat([t.flatten() for t in upload]) for upload in inputs]
            else:
                total = [t * m for t in module.aggregate(zero)]
            for j, t in enumerate(total):
                per_tensor[j].append(t.flatten())
        for j, values in enumerate(per_tensor):  # every tensor, for every number of clients
            check_std(torch.cat(values), std, f"{method}, {clients} clients, tensor {j}")
        if encoded and clients:  # independent shares of std σC/√|B| (one draw replicated would sum to √|B|σC)
            check_std(torch.cat(shares), std / math.sqrt(clients), f"{method}, one client's share of {clients}")


def test_dr_encoder_stage_one_statistics_carry_sigma_c_noise(monkeypatch):
    built = build("dr_encoder", *run_overrides("dr_encoder"), f"method.clip={C}")
    module = built.module
    block = module.privacy_block()
    zero = [torch.zeros_like(p) for p in built.params]
    module.local_update = lambda client, seed: ([z.clone() for z in zero], 0.0)  # statistics of a zero update: 0
    reported = []
    from_statistics = RandomPrior.from_statistics.__func__
    monkeypatch.setattr(RandomPrior, "from_statistics", classmethod(
        lambda cls, average, *args: reported.append(average.clone()) or from_statistics(cls, average, *args)))
    rounds = int(built.cfg.method.prior_rounds)
    for _ in range(200):
        module.ledger.steps = 0
        module.build_prior()
    # the average over the rounds of (Σ statistics + N(0, σ²C²)) / m: std σC / (m √rounds)
    check_std(torch.cat(reported), block["noise_multiplier"] * C / (block["expected_batch_size"] * math.sqrt(rounds)),
              "dr_encoder stage-1 statistics")


def test_dr_encoder_local_noise_gives_every_client_the_full_sigma_c():
    """method.noise_placement=local (the paper's): each client's upload carries N(0, σ²C²) on its own, in stage 2
    for every number of clients, and in stage 1 on each client's statistics (the round's sum: |B|σ²C²)."""
    built = build("dr_encoder", *run_overrides("dr_encoder"), f"method.clip={C}", "method.noise_placement=local")
    module = built.module
    block = module.privacy_block()
    assert block["local"] and block["noise_placement"] == "each client, the full σC, before encoding"
    std = block["noise_multiplier"] * C
    shapes = [p.shape for p in built.params]
    inputs: list[list[torch.Tensor]] = []
    encode = module.autoencoder.encode
    module.autoencoder.encode = lambda update: inputs.append([u.clone() for u in update]) or encode(update)
    for clients in (1, 3, 8):
        shares = []
        for _ in range(16):
            inputs.clear()
            module.aggregate([[torch.zeros(s) for s in shapes] for _ in range(clients)])
            assert len(inputs) == clients
            shares += [torch.cat([t.flatten() for t in upload]) for upload in inputs]
        check_std(torch.cat(shares), std, f"dr_encoder local, one client's upload of {clients}")

    zero = [torch.zeros_like(p) for p in built.params]
    updates, draws = [], []
    module.local_update = lambda client, seed: updates.append(client) or ([z.clone() for z in zero], 0.0)
    sample = module.noise.sample
    module.noise.sample = lambda scale, shape: draws.append(scale) or sample(scale, shape)
    for _ in range(20):
        module.ledger.steps = 0
        module.build_prior()
    assert updates and draws == [std] * len(updates)  # one full draw per sampled client, none by the server
