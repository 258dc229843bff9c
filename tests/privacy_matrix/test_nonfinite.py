"""Claim 4 — non-finite examples, every private method.

An example (a client, for the federated methods) whose loss is NaN, +inf or -inf, or whose loss is finite but
whose gradient is not, is dropped, counted, and the release is finite and equals the release of the same step
(same noise draws) without it. Examples are single-row here (one forward row per example), so dropping an
example drops every row it owns.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch

from tests.conftest import requires_data
from tests.privacy_matrix.matrix import PHI, build, in_family, run_overrides

pytestmark = requires_data
VALUES = [math.nan, math.inf, -math.inf]


class NonFiniteGradient(torch.autograd.Function):
    """The identity forward (a finite loss) whose backward multiplies by a non-finite value: a gradient that
    overflows while the loss does not."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, value: float) -> torch.Tensor:
        ctx.value = value
        return x.clone()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad * ctx.value, None


def _snapshot(built) -> dict:
    state = {"params": [p.detach().clone() for p in built.params],
             "optimizer": copy.deepcopy(built.optimizer.state_dict()), "ledger": built.module.ledger.steps}
    module = built.module
    if hasattr(module, "dp") and module.dp is not None:
        state["dp"] = copy.deepcopy(module.dp.state_dict())
    if hasattr(module, "noise"):
        state["noise"] = copy.deepcopy(module.noise.state_dict())
    return state


def _restore(built, state: dict) -> None:
    with torch.no_grad():
        for p, saved in zip(built.params, state["params"]):
            p.copy_(saved)
    built.optimizer.load_state_dict(copy.deepcopy(state["optimizer"]))  # ZO: its step, noise and estimator too
    built.module.ledger.steps = state["ledger"]
    if "dp" in state:
        built.module.dp.load_state_dict(copy.deepcopy(state["dp"]))
    if "noise" in state:
        built.module.noise.load_state_dict(copy.deepcopy(state["noise"]))
    if built.module._trainer is not None:
        built.module._trainer.global_step = 0


@pytest.mark.parametrize("method", in_family("zeroth_order"))
def test_zeroth_order_drops_and_counts_nonfinite_losses(method):
    built = build(method, *run_overrides(method), "method.directions=2", f"method.eps={PHI}")
    optimizer = built.optimizer
    estimator = optimizer.estimator
    scalars = torch.tensor([[0.3, -2.0, 40.0, 0.01, -5.0, 7.0, 0.8], [1.0, 0.2, -60.0, 3.0, 0.5, -0.7, -0.1]],
                           dtype=torch.float64)
    # in both directions: the scalars r = +inf, -inf, +inf, NaN (were ±inf clipped to ±bound rather than dropped,
    # the release would move by one bound)
    bad = {1: ("plus", math.inf), 3: ("plus", -math.inf), 4: ("minus", -math.inf), 6: ("minus", math.nan)}

    def release(keep: list[int], corrupt: bool) -> tuple[list[float], list[torch.Tensor]]:
        def losses():
            for k in range(2):
                for sign, side in ((1, "plus"), (-1, "minus")):
                    out = 0.7 + sign * scalars[k, keep] * PHI
                    for i, (which, value) in bad.items():
                        if corrupt and which == side:
                            out[keep.index(i)] = value
                    yield out

        stream = losses()
        optimizer.step(lambda: next(stream))
        return list(optimizer.state["zo"]["projected_grads"]), [p.detach().clone() for p in built.params]

    state = _snapshot(built)
    with_bad, weights = release(list(range(7)), corrupt=True)
    assert estimator.nonfinite == len(bad) * 2  # each bad example's scalar, in each of the two directions
    _restore(built, state)
    without, clean_weights = release([0, 2, 5], corrupt=False)
    assert all(math.isfinite(g) for g in with_bad) and all(torch.isfinite(w).all() for w in weights)
    assert with_bad == pytest.approx(without, rel=1e-12, abs=1e-12)
    assert all(torch.equal(a, b) for a, b in zip(weights, clean_weights))


@pytest.mark.parametrize("method", in_family("first_order"))
def test_first_order_drops_and_counts_nonfinite_losses_and_gradients(method):
    built = build(method, *run_overrides(method), "method.clip=0.3")
    module = built.module
    module.model.eval()  # no dropout: both steps see the same function
    values = dict(zip([1, 4, 7], VALUES))  # non-finite losses
    gradients = dict(zip([2, 5, 8], VALUES))  # finite losses whose gradients are not finite
    uid = {ex.uid: i for i, ex in enumerate(built.examples)}
    per_example_losses = module.per_example_losses

    def losses(batch):
        out = []
        for ex, loss in zip(batch["examples"], per_example_losses(batch)):
            i = uid[ex.uid]
            if i in values:
                loss = loss + (values[i] - loss.detach())  # a non-finite loss, its graph intact
            elif i in gradients:
                loss = NonFiniteGradient.apply(loss, gradients[i])
            out.append(loss)
        return torch.stack(out)

    module.per_example_losses = losses
    state = _snapshot(built)
    built.stepper.step(built.batch(list(range(10))))
    with_bad = [p.grad.clone() for p in built.params]
    assert all(torch.isfinite(g).all() for g in with_bad)
    assert module.dp.dropped == 6 and module.raw_statistics()["dropped_nonfinite_examples"] == 6
    _restore(built, state)
    built.stepper.step(built.batch([0, 3, 6, 9]))
    largest = max(float(g.abs().max()) for g in with_bad)
    for a, b in zip(with_bad, built.params):  # same noise; the batches pad differently: float32 tolerance
        torch.testing.assert_close(a, b.grad, rtol=1e-5, atol=1e-6 * largest)


@pytest.mark.parametrize("method", in_family("federated"))
def test_federated_drops_and_counts_a_client_whose_training_is_not_finite(method):
    # DR-Encoder's clients add noise shares of σC/√|B| (|B| counting the dropped client): compare without noise
    noise = {"noise_multiplier": 0.0} if method == "dr_encoder" else None
    built = build(method, *run_overrides(method), "method.clip=0.25", spec_changes=noise)
    module = built.module
    built.stepper.start()
    module.model.eval()  # dropout would draw from the global RNG for the dropped clients' steps too
    diverging = dict(zip([1, 3, 6], VALUES))  # these clients' local losses are NaN, +inf, -inf
    current = {}
    local_update, per_example_losses = module.local_update, module.per_example_losses

    def update(client, round_seed):
        current["client"] = client
        return local_update(client, round_seed)

    def losses(batch):
        out = per_example_losses(batch)
        return out * diverging[current["client"]] if current["client"] in diverging else out

    module.local_update, module.per_example_losses = update, losses
    state = _snapshot(built)
    built.stepper.step({"clients": [0, 1, 3, 5, 6]})
    with_bad = [p.grad.clone() for p in built.params]
    assert module.nonfinite_clients == 3
    _restore(built, state)
    built.stepper.step({"clients": [0, 5]})
    assert all(torch.isfinite(g).all() for g in with_bad)
    for a, b in zip(with_bad, built.params):
        torch.testing.assert_close(a, b.grad, rtol=1e-6, atol=0)
