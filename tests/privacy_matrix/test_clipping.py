"""Claim 2 — clipping as applied, every private method.

The factor each example's (or client's) contribution is actually multiplied by, read where it is applied (the
factors passed to the clipped sum, a leave-one-out difference of the release, the encoder's input), equals
min(1, C/‖g_i‖) with ‖g_i‖ from a one-example-at-a-time oracle, for a non-default C that clips some examples
and not others and for contributions far above C. A client's update is clipped as one vector: the L2 norm over
all its tensors, so one large tensor shrinks the others too. No noise (σ = 0) here: claim 3 covers it.
"""

from __future__ import annotations

import math

import pytest
import torch

from tests.conftest import requires_data
from tests.privacy_matrix.matrix import CLIPPED, PHI, build, clip_bound, in_family, run_overrides

pytestmark = requires_data
NO_NOISE = {"noise_multiplier": 0.0}


@pytest.mark.parametrize("method", in_family("zeroth_order"))
def test_zeroth_order_each_scalar_is_clipped_to_its_rule(method):
    clip = 0.07 if CLIPPED[method] == "difference" else 3.0  # not the configs' values
    built = build(method, *run_overrides(method), "method.directions=2", f"method.clip={clip}", f"method.eps={PHI}",
                  spec_changes=NO_NOISE)
    # DP-ZO: |ℓ⁺-ℓ⁻| ≤ C, i.e. |r| ≤ C/2φ; DPZero: |r| ≤ C; DPGD-0th: ‖r z‖ ≤ C, i.e. |r| ≤ C/√d
    bound = clip_bound(method, clip, PHI, sum(p.numel() for p in built.params))
    scalars = bound * torch.tensor([[0.2, -0.9, 0.999, 1.5, -40.0, 1e4],  # r_i = (ℓ⁺_i - ℓ⁻_i)/2φ, direction 1
                                    [-3.0, 0.5, 2.0, -0.1, 1e3, -1.001]], dtype=torch.float64)  # direction 2
    scale = built.spec.expected_batch_size

    def release(keep: list[int]) -> torch.Tensor:
        """(Σ_i clip(r_i)) per direction, from the step's released projected gradients."""
        losses = iter([0.7 + sign * scalars[k, keep] * PHI for k in range(2) for sign in (1, -1)])
        built.optimizer.step(lambda: next(losses))
        return torch.tensor(built.optimizer.state["zo"]["projected_grads"], dtype=torch.float64) * scale

    everyone = list(range(scalars.shape[1]))
    full = release(everyone)
    for i in everyone:  # what example i adds to the release, divided by its scalar: the factor applied to it
        applied = (full - release([j for j in everyone if j != i])) / scalars[:, i]
        expected = torch.tensor([min(1.0, bound / abs(float(r))) for r in scalars[:, i]], dtype=torch.float64)
        torch.testing.assert_close(applied, expected, rtol=1e-9, atol=1e-12)


def _oracle_gradients(built, indices: list[int]) -> list[dict[str, torch.Tensor]]:
    """Each example's gradient alone, by backward() on its own loss: {parameter name: gradient}."""
    model = built.module.model
    named = {n: p for n, p in model.named_parameters() if p.requires_grad}
    out = []
    for i in indices:
        model.zero_grad(set_to_none=True)
        built.scorer.losses(model, built.batch([i]))[0].backward()
        out.append({n: p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p) for n, p in named.items()})
    model.zero_grad(set_to_none=True)
    return out


def _layers(model) -> dict[str, list[str]]:
    """ANADP's groups: the modules that own trainable parameters, with those parameters' full names."""
    out = {}
    for name, module in model.named_modules():
        own = [f"{name}.{n}" for n, p in module.named_parameters(recurse=False) if p.requires_grad]
        if own:
            out[name] = own
    return out


@pytest.mark.parametrize("method", in_family("first_order"))
def test_first_order_factor_applied_to_each_example_is_min_one_c_over_its_norm(method):
    clip = 0.3
    built = build(method, *run_overrides(method), f"method.clip={clip}", spec_changes=NO_NOISE)
    module, dp = built.module, built.module.dp
    module.model.eval()  # no dropout: the batch and the one-example oracle see the same function
    indices = [0, 3, 6, 9, 12, 15]
    naive = _oracle_gradients(built, indices)
    norms = torch.tensor([math.sqrt(sum(float(g.double().pow(2).sum()) for g in gs.values())) for gs in naive])
    # weight each example's loss so its gradient norm sits where we want it: below C, around it, and far above
    weights = clip * torch.tensor([0.2, 0.7, 0.95, 1.3, 4.0, 1e3], dtype=torch.float64) / norms
    applied = []
    accumulate = module.per_example.accumulate
    module.per_example.accumulate = lambda factors: applied.append(factors) or accumulate(factors)
    with module.per_example.capture(len(indices)):
        losses = module.per_example_losses(built.batch(indices))
    module.per_example.backward((losses * weights.to(losses.dtype)).sum())
    dp.pre_step(empty=False)
    (factors,) = applied

    if isinstance(factors, dict):  # ANADP: per group k (layer) with C_k = C/√K
        groups = _layers(module.model)
        group_clip = clip / math.sqrt(len(groups))
        assert set(factors) == set(groups)
        expected = {}
        for layer, names in groups.items():
            layer_norms = weights * torch.tensor([math.sqrt(sum(float(gs[n].double().pow(2).sum()) for n in names))
                                                  for gs in naive])
            expected[layer] = torch.clamp(group_clip / layer_norms, max=1.0)
            torch.testing.assert_close(factors[layer].double(), expected[layer], rtol=1e-4, atol=0)
        every = torch.cat(list(expected.values()))
        coefficient = {n: expected[layer] for layer, names in groups.items() for n in names}
    else:
        every = expected = torch.clamp(clip / (weights * norms), max=1.0)
        torch.testing.assert_close(factors.double(), expected, rtol=1e-4, atol=0)
        coefficient = {n: expected for n in naive[0]}
    assert (every == 1).any() and (every < 1).any() and every.min() < 1e-2  # some clip, some not, one far above C
    # and the clipped sum released is Σ_i c_i w_i g_i (σ = 0, times the expected batch size)
    named = dict(module.model.named_parameters())
    expected_sums = {name: sum(float(c[i] * weights[i]) * naive[i][name].double() for i in range(len(indices)))
                     for name, c in coefficient.items()}
    largest = max(float(t.abs().max()) for t in expected_sums.values())
    for name, expected_sum in expected_sums.items():  # float32 sums in another order: tolerance on the largest
        torch.testing.assert_close(named[name].grad.double() * dp.expected_batch_size, expected_sum, rtol=1e-4,
                                   atol=1e-6 * largest)


@pytest.mark.parametrize("method", in_family("federated"))
def test_a_client_update_is_clipped_as_one_vector_over_all_its_tensors(method):
    clip = 0.25
    built = build(method, *run_overrides(method), f"method.clip={clip}", spec_changes=NO_NOISE)
    module = built.module
    generator = torch.Generator().manual_seed(0)
    shapes = [p.shape for p in built.params]

    def update(norms: list[float]) -> list[torch.Tensor]:
        tensors = [torch.randn(s, generator=generator) for s in shapes]
        return [t * (n * clip / float(t.norm())) for t, n in zip(tensors, norms)]

    k = len(shapes)
    clients = [update([0.1] * k),  # ‖Δ‖ = 0.1·√k·C < C: kept as is
               update([0.5] * k),  # every tensor below C, the whole above: clipped (per tensor it would not be)
               update([5.0] + [0.2] * (k - 1)),  # one tensor far above: all tensors shrink by the same factor
               update([1e4] * k)]  # far above C
    inputs = []
    if module.autoencoder is not None:  # DR-Encoder clips before encoding: read the encoder's input
        encode = module.autoencoder.encode
        module.autoencoder.encode = lambda tensors: inputs.append([t.clone() for t in tensors]) or encode(tensors)
    factors = []
    for delta in clients:
        inputs.clear()
        released = module.aggregate([delta])
        applied = inputs[0] if inputs else [t * module.privacy.expected_batch_size for t in released]
        norm = math.sqrt(sum(float(t.double().pow(2).sum()) for t in delta))
        factor = min(1.0, clip / norm)  # one factor for the whole update
        for a, d in zip(applied, delta):
            torch.testing.assert_close(a.double(), d.double() * factor, rtol=1e-5, atol=1e-9)
        factors.append(factor)
    assert factors[0] == 1.0 and all(f < 1 for f in factors[1:]) and factors[3] < 1e-3


def test_a_client_update_near_the_clip_floor_is_still_bounded():
    """c·‖Δ‖ ≤ C exactly for updates of norm 2e-12 around C = 1e-12 (the division's guard must not push it over)."""
    from dpft.methods.federated import clip_update, flat_norm

    for norm, clip in ((2e-12, 1e-12), (5e-13, 1e-12), (3.0, 1e-12), (3.0, 2.0)):
        update = [torch.full((2, 2), norm / 4, dtype=torch.float64), torch.full((4,), norm / 4, dtype=torch.float64)]
        clipped = clip_update(update, clip)
        assert float(flat_norm(clipped)) <= clip * (1 + 1e-12) and float(flat_norm(clipped)) <= norm * (1 + 1e-12)
        if norm < clip:
            assert float(flat_norm(clipped)) == pytest.approx(norm, rel=1e-9)
