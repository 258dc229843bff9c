"""PerExampleGradients on tiny hand-built layers, against the definition.

The oracle is each example's gradient computed alone: its rows forwarded by themselves and its loss
differentiated with torch.autograd (no hooks capturing). Norms are compared per layer, the clipped sum
Σ_i c_i ∇ℓ_i per parameter; refusals (unsupported layers, tied weights, inputs not one per row, bad `owner`
or drop masks) are checked by their messages, hooks by counting module._forward_hooks.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from dpft.privacy.per_example import PerExampleGradients, UnsupportedLayerError

V, D, T = 7, 4, 3  # vocabulary, width, tokens per row


class Tiny(nn.Module):
    """Every supported layer and every input layout: ids → Embedding → LayerNorm → q, k, v (one input, a shared
    Gram) → attention; an MLP reading the tokens flattened to [rows·T, d] (as OPT's); a head. Rows are
    independent, so an example's rows forwarded alone give its gradient."""

    def __init__(self, padding_idx: int | None = None):
        super().__init__()
        self.emb = nn.Embedding(V, D, padding_idx=padding_idx)
        self.ln = nn.LayerNorm(D)
        self.q, self.k, self.v = nn.Linear(D, 3), nn.Linear(D, 3), nn.Linear(D, 3)
        self.fc = nn.Linear(D, 5)
        self.head = nn.Linear(8, 2)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.ln(self.emb(ids))
        q, k, v = self.q(h), self.k(h), self.v(h)
        att = torch.softmax(q @ k.transpose(1, 2), -1) @ v
        f = self.fc(h.reshape(-1, D)).reshape(len(ids), -1, 5).tanh()
        y = self.head(torch.cat([att, f], -1))
        return y.sin().sum((1, 2)) + y[:, -1].pow(2).sum(1)  # one loss per row


def _ids(rows: int, seed: int = 0) -> torch.Tensor:
    ids = torch.randint(0, V, (rows, T), generator=torch.Generator().manual_seed(seed))
    ids[:, 0] = 0  # the padding id (when the Embedding has one), and a token repeated across rows
    ids[0, 1:] = ids[0, 1]  # a token repeated within a row: its gradient rows add up
    return ids


def _model(seed: int = 0, **kw) -> nn.Module:
    torch.manual_seed(seed)
    return Tiny(**kw)


def _alone(model, params, loss_fn, x, owner, examples) -> list[list[torch.Tensor]]:
    """Definition: example i's rows forwarded alone, Σ of their losses differentiated (zero if it owns none)."""
    out = []
    for i in range(examples):
        rows = x[owner == i]
        if len(rows) == 0:
            out.append([torch.zeros_like(p) for p in params])
            continue
        gs = torch.autograd.grad(loss_fn(model, rows).sum(), params, allow_unused=True)
        out.append([torch.zeros_like(p) if g is None else g.detach() for g, p in zip(gs, params)])
    return out


def _layer_norms(model, params, grads, examples) -> dict[str, torch.Tensor]:
    """Squared norm of each layer's gradient per example, from the oracle's gradients."""
    index = {id(p): j for j, p in enumerate(params)}
    out = {}
    for name, module in model.named_modules():
        js = [index[id(p)] for p in module.parameters(recurse=False) if id(p) in index]
        if js:
            out[name] = torch.tensor([float(sum(grads[i][j].float().pow(2).sum() for j in js))
                                      for i in range(examples)])
    return out


def _captured(model, params, loss_fn, x, examples, owner=None) -> PerExampleGradients:
    per_example = PerExampleGradients(model, params)
    with per_example.capture(examples, owner):
        losses = loss_fn(model, x)
    per_example.backward(torch.where(losses.isfinite(), losses, 0.0).sum())
    return per_example


def _forward(model, x):
    return model(x)


def _check(per_example, model, params, grads, examples, factors, rtol=1e-5, atol=1e-6):
    """norms_by_layer and accumulate against the oracle's per-example gradients."""
    norms = per_example.norms_by_layer()
    expected = _layer_norms(model, params, grads, examples)
    for name, want in expected.items():
        got = norms.get(name, torch.zeros(examples))
        assert got.dtype == torch.float32
        torch.testing.assert_close(got, want, rtol=rtol, atol=atol, msg=lambda m, n=name: f"{n}: {m}")
    per_example.accumulate(factors)
    for j, p in enumerate(params):
        want = sum(float(c) * gs[j].float() for c, gs in zip(factors, grads))
        assert p.summed_grad.dtype == p.dtype and p.summed_grad.shape == p.shape
        torch.testing.assert_close(p.summed_grad.float(), want, rtol=rtol, atol=atol)


RULES = ["auto", "ghost", "materialised"]
OWNERS = [None, [2, 0, 1], [1, 0, 1, 2, 0], [0, 0, 1]]  # one row each, a permutation, several rows, one with none


@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("owner", OWNERS, ids=["rows", "permuted", "multi-row", "example-without-rows"])
def test_norms_and_clipped_sum_equal_each_example_alone(monkeypatch, rule, owner):
    """Per-layer squared norms and Σ c_i g_i equal those of each example's rows differentiated alone, whatever
    the rows → examples map and whichever norm rule (ghost Grams or the materialised gradient) is used."""
    if rule != "auto":
        monkeypatch.setattr(PerExampleGradients, "_ghost", staticmethod(lambda t, d_in, d_out: rule == "ghost"))
    examples = 3
    owner = torch.arange(examples) if owner is None else torch.tensor(owner)
    model = _model()
    params = list(model.parameters())
    x = _ids(len(owner))
    grads = _alone(model, params, _forward, x, owner, examples)
    per_example = _captured(model, params, _forward, x, examples, None if owner.equal(torch.arange(3)) else owner)
    _check(per_example, model, params, grads, examples, torch.tensor([0.3, 1.7, -0.5]))


@pytest.mark.parametrize("padding_idx", [None, 0])
def test_embedding_padding_row_gets_no_gradient(padding_idx):
    """With a padding_idx, F.embedding gives that row no gradient; norms and sums agree with autograd either way."""
    examples, owner = 3, torch.tensor([1, 0, 1, 2, 0])
    model = _model(padding_idx=padding_idx).requires_grad_(False)
    params = [model.emb.weight.requires_grad_(), model.head.weight.requires_grad_()]
    x = _ids(len(owner))
    grads = _alone(model, params, _forward, x, owner, examples)
    if padding_idx is not None:
        assert all(float(gs[0][padding_idx].abs().sum()) == 0 for gs in grads)
        assert (x == padding_idx).any()
    per_example = _captured(model, params, _forward, x, examples, owner)
    _check(per_example, model, params, grads, examples, torch.tensor([1.0, 0.5, 2.0]))
    if padding_idx is not None:
        assert float(model.emb.weight.summed_grad[padding_idx].abs().sum()) == 0


def test_a_batch_of_one_example_with_tokens_flattened_into_rows():
    """B = 1: the MLP's [1·T, d] input is one example's tokens (accepted, and equal to autograd)."""
    model = _model()
    params = list(model.parameters())
    x = _ids(1)
    grads = _alone(model, params, _forward, x, torch.zeros(1, dtype=torch.long), 1)
    _check(_captured(model, params, _forward, x, 1), model, params, grads, 1, torch.tensor([0.7]))


def test_one_id_per_row_embedding():
    """An Embedding reading ids [B] (1-D, one token per row) is per row: norms and sum equal autograd."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(V, D), nn.Linear(D, 2))
    params = list(model.parameters())
    x = torch.tensor([3, 1, 3, 5])

    def loss_fn(m, ids):
        return m(ids).sin().sum(1)

    grads = _alone(model, params, loss_fn, x, torch.arange(4), 4)
    _check(_captured(model, params, loss_fn, x, 4), model, params, grads, 4, torch.tensor([1.0, 0.2, 0.4, 3.0]))


def _float_model(ln_bias: str = "trainable") -> nn.Module:
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(D, D), nn.LayerNorm(D, bias=ln_bias != "none"), nn.Linear(D, 2, bias=False))
    if ln_bias == "frozen":
        model[1].bias.requires_grad_(False)
    return model


def _float_loss(m, x):
    return m(x).tanh().pow(2).sum((1, 2))


@pytest.mark.parametrize("ln_bias", ["trainable", "frozen", "none"])
def test_frozen_or_absent_biases_add_nothing(ln_bias):
    """A LayerNorm bias that is frozen or absent, a Linear without bias and a Linear with a frozen weight but a
    trainable bias: only the trainable parameters count, as autograd's gradients of them."""
    model = _float_model(ln_bias)
    model[0].weight.requires_grad_(False)
    params = [p for p in model.parameters() if p.requires_grad]
    owner = torch.tensor([1, 0, 1, 2, 0])
    x = torch.randn(len(owner), T, D, generator=torch.Generator().manual_seed(2))
    grads = _alone(model, params, _float_loss, x, owner, 3)
    per_example = _captured(model, params, _float_loss, x, 3, owner)
    _check(per_example, model, params, grads, 3, torch.tensor([0.5, 1.0, 1.5]))
    assert not hasattr(model[0].weight, "summed_grad")


def test_dropped_examples_contribute_nothing_from_any_of_their_rows():
    """drop(): an example whose rows are NaN has norm 0 and no part in Σ c_i g_i; the others equal autograd."""
    model = _float_model()
    params = list(model.parameters())
    owner = torch.tensor([1, 0, 1, 2, 0])
    x = torch.randn(len(owner), T, D, generator=torch.Generator().manual_seed(3))
    grads = _alone(model, params, _float_loss, x, owner, 3)
    x[owner == 1] = math.nan
    per_example = _captured(model, params, _float_loss, x, 3, owner)
    per_example.drop(torch.tensor([False, True, False]))
    grads[1] = [torch.zeros_like(p) for p in params]
    _check(per_example, model, params, grads, 3, torch.tensor([0.5, 9.0, 1.5]))
    with pytest.raises(ValueError, match=r"drop takes one flag per example \(3\), got shape \(2,\)"):
        per_example.drop(torch.tensor([False, True]))


class TwoHeads(nn.Module):
    def __init__(self):
        super().__init__()
        self.unused, self.used, self.never = nn.Linear(D, 2), nn.Linear(D, 2), nn.Linear(D, 2)

    def forward(self, x):
        self.unused(x)  # called, but does not influence the loss
        return self.used(x).pow(2).sum((1, 2))


def test_a_layer_that_does_not_influence_the_loss_has_zero_gradient_and_the_next_still_counts():
    """A layer called but not in the loss (and one never called) gets a zero sum; a later layer is unaffected."""
    torch.manual_seed(0)
    model = TwoHeads()
    params = list(model.parameters())
    x = torch.randn(3, T, D)
    grads = _alone(model, params, _forward, x, torch.arange(3), 3)
    per_example = _captured(model, params, _forward, x, 3)
    assert set(per_example.norms_by_layer()) == {"used"}
    _check(per_example, model, params, grads, 3, torch.tensor([1.0, 2.0, 3.0]))
    for p in [*model.unused.parameters(), *model.never.parameters()]:
        assert float(p.summed_grad.abs().sum()) == 0


def test_sums_are_contiguous_whatever_the_parameters_strides():
    """summed_grad is contiguous (the noise is added to it in place, flat) even for a transposed parameter, both
    for a layer in the loss and for one that does not influence it (its zero sum)."""
    torch.manual_seed(0)
    model = TwoHeads()
    for layer in (model.unused, model.used, model.never):
        layer.weight = nn.Parameter(torch.randn(D, 2).t())
        assert not layer.weight.is_contiguous()
    params = list(model.parameters())
    x = torch.randn(3, T, D)
    grads = _alone(model, params, _forward, x, torch.arange(3), 3)
    _check(_captured(model, params, _forward, x, 3), model, params, grads, 3, torch.tensor([1.0, 2.0, 3.0]))
    assert all(p.summed_grad.is_contiguous() for p in params)


def test_double_precision_factors_give_the_same_sums():
    """Clip factors in float64 (e.g. computed from the norms in double) are cast to the computation's float32:
    the sums, Linear, LayerNorm and Embedding alike, equal autograd's and keep the parameter's dtype."""
    examples, owner = 3, torch.tensor([1, 0, 1, 2, 0])
    model = _model()
    params = list(model.parameters())
    x = _ids(len(owner))
    grads = _alone(model, params, _forward, x, owner, examples)
    per_example = _captured(model, params, _forward, x, examples, owner)
    _check(per_example, model, params, grads, examples, torch.tensor([0.3, 1.7, -0.5], dtype=torch.float64))


def test_half_precision_inputs_are_computed_in_float32():
    """A bfloat16 model: norms come out in float32 and agree with autograd's bfloat16 gradients; sums keep the
    parameter's dtype."""
    model = _float_model().to(torch.bfloat16)
    params = list(model.parameters())
    x = torch.randn(3, T, D, generator=torch.Generator().manual_seed(4)).to(torch.bfloat16)
    grads = _alone(model, params, _float_loss, x, torch.arange(3), 3)
    per_example = _captured(model, params, _float_loss, x, 3)
    _check(per_example, model, params, grads, 3, torch.tensor([1.0, 0.5, 0.25]), rtol=3e-2, atol=1e-2)


def test_hooks_are_removed_and_capture_stops_at_exit():
    """One forward hook per supported trainable layer, none after remove(); outside `with` a forward (grad
    enabled) records nothing; release() and a new capture() drop what was held."""
    model = _float_model()
    model[0].requires_grad_(False)  # a frozen layer gets no hook
    params = [p for p in model.parameters() if p.requires_grad]
    before = [len(m._forward_hooks) for m in model]
    per_example = PerExampleGradients(model, params)
    assert [len(m._forward_hooks) - b for m, b in zip(model, before)] == [0, 1, 1]
    assert all(len(m._backward_hooks) == 0 for m in model)
    x = torch.randn(2, T, D)
    grads = _alone(model, params, _float_loss, x, torch.arange(2), 2)
    with per_example.capture(2):
        losses = _float_loss(model, x)
    _float_loss(model, torch.randn(5, T, D))  # after exit: not captured (else "called twice" / wrong rows)
    per_example.backward(losses.sum())
    _check(per_example, model, params, grads, 2, torch.tensor([1.0, 1.0]))
    per_example.release()
    assert per_example.norms_by_layer() == {}
    with pytest.raises(RuntimeError, match="nothing captured"):
        per_example.backward(losses.sum())
    per_example.remove()
    assert [len(m._forward_hooks) for m in model] == before
    with per_example.capture(2):
        losses = _float_loss(model, x)
    with pytest.raises(RuntimeError, match="nothing captured"):
        per_example.backward(losses.sum())


def test_a_forward_without_capture_is_refused():
    """Under `with` but without capture() (no batch declared, 0 rows) a forward is refused, not recorded."""
    model = nn.Sequential(nn.Linear(D, 2))
    per_example = PerExampleGradients(model, model.parameters())
    with per_example, pytest.raises(UnsupportedLayerError, match=r"not one per forward row \(0 rows\)"):
        model(torch.randn(1, D))


def test_a_layer_called_twice_is_refused():
    """A layer applied twice in one forward has no single input per row: refused, naming its type."""
    model = nn.Sequential(nn.Linear(D, D))
    per_example = PerExampleGradients(model, model.parameters())
    with per_example.capture(2), pytest.raises(UnsupportedLayerError, match="^layer Linear is called twice in one "
                                                                             "forward pass; per-example gradients"):
        model(model(torch.randn(2, D)))


def test_an_input_that_is_not_one_per_row_is_refused_by_name():
    """[2B, T, d] into a Linear (a multiple of the rows, but not flattened tokens) and BERT's one row of
    position ids for the whole batch are refused, naming the layer; the embedding hint only for an Embedding."""
    model = nn.Sequential(nn.Linear(D, 2))
    per_example = PerExampleGradients(model, model.parameters())
    with per_example.capture(2), pytest.raises(UnsupportedLayerError) as err:
        model(torch.randn(2, T, D).repeat(2, 1, 1))
    assert str(err.value) == (
        "per-example gradients: layer '0' (Linear) reads an input of shape (4, 3, 4), not one per forward row "
        "(2 rows), so its gradient cannot be split by example; freeze it or use a supported mode: "
        "full (all non-embedding weights), lora (method.peft.mode=lora), head (method.trainable=head)")

    class Positions(nn.Module):
        def __init__(self):
            super().__init__()
            self.pos = nn.Embedding(T, D)

        def forward(self, ids):
            return self.pos(torch.arange(ids.shape[1]).unsqueeze(0))

    model = Positions()
    per_example = PerExampleGradients(model, model.parameters())
    with per_example.capture(2), pytest.raises(UnsupportedLayerError) as err:
        model(torch.zeros(2, T, dtype=torch.long))
    message = str(err.value)
    assert message.startswith("per-example gradients: layer 'pos' (Embedding) reads an input of shape (1, 3)")
    assert "by example (one row of position ids for the whole batch, as in BERT); " in message
    assert "freeze it (method.trainable=no_embeddings) or use a supported mode" in message


class Scale(nn.Module):
    def __init__(self):
        super().__init__()
        self.s = nn.Parameter(torch.ones(1))


class LinearWithScale(nn.Linear):
    """A supported layer with an unsupported child that holds a trainable parameter."""

    def __init__(self):
        super().__init__(D, 2)
        self.scale = Scale()

    def forward(self, x):
        return super().forward(x) * self.scale.s


def test_unsupported_layers_tied_weights_and_foreign_parameters_are_refused_by_name():
    """A trainable parameter on an unsupported child of a supported layer, a weight tied between two layers and a
    parameter of no layer are refused at construction, by name (messages checked by hand)."""
    model = nn.Sequential(LinearWithScale())
    with pytest.raises(UnsupportedLayerError, match=r"layer '0.scale' \(Scale\) has trainable parameters but is not "
                                                    r"supported \(supported: Linear, LayerNorm, RMSNorm, Embedding\)"):
        PerExampleGradients(model, model.parameters())
    PerExampleGradients(model, [model[0].weight, model[0].bias])  # frozen: fine

    tied = nn.Sequential(nn.Linear(D, D), nn.Linear(D, D))
    tied[1].weight = tied[0].weight
    with pytest.raises(UnsupportedLayerError, match=r"a parameter is shared by '0' and '1' \(tied weights\)"):
        PerExampleGradients(tied, tied.parameters())

    model = nn.Sequential(nn.Linear(D, 2))
    with pytest.raises(UnsupportedLayerError, match="^1 trainable parameters belong to no layer$"):
        PerExampleGradients(model, [*model.parameters(), nn.Parameter(torch.zeros(2))])


@pytest.mark.parametrize("owner", [[0, 2], [-1, 0]])
def test_an_owner_outside_the_examples_is_refused(owner):
    """capture() refuses a rows → examples map with an id outside [0, B) or not 1-D, with a ValueError."""
    per_example = PerExampleGradients(nn.Linear(D, 2), [])
    with pytest.raises(ValueError, match=r"owner must map each forward row to an example in \[0, 2\), got shape "
                                         r"\(2,\)"):
        per_example.capture(2, torch.tensor(owner))
    with pytest.raises(ValueError, match=r"got shape \(1, 2\)"):
        per_example.capture(2, torch.tensor([[0, 1]]))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("owner_device", ["cpu", "cuda"])
def test_owner_on_either_device_with_the_model_on_cuda(owner_device):
    """`owner` may stay on the CPU or come with the batch to the GPU: the numbers equal the CPU's."""
    owners = [torch.tensor([1, 0, 2]), torch.tensor([1, 0, 1, 2, 0])]  # len B (the identity check) and not
    for owner in owners:
        model = _model()
        params = list(model.parameters())
        x = _ids(len(owner))
        grads = _alone(model, params, _forward, x, owner, 3)
        model.cuda()
        per_example = _captured(model, params, _forward, x.cuda(), 3, owner.to(owner_device))
        norms = per_example.norms_by_layer()
        for name, want in _layer_norms(model, params, grads, 3).items():
            torch.testing.assert_close(norms[name].cpu(), want, rtol=1e-4, atol=1e-6)
        per_example.accumulate(torch.tensor([0.5, 1.0, 2.0], device="cuda"))
        for j, p in enumerate(params):
            want = sum(c * gs[j] for c, gs in zip([0.5, 1.0, 2.0], grads))
            torch.testing.assert_close(p.summed_grad.cpu(), want, rtol=1e-4, atol=1e-6)


def test_only_the_parameters_given_are_counted_and_summed_whatever_requires_grad_says():
    """A trainable bias left out of `params` adds nothing to the norms and gets no sum (the norm then is the weight's
    alone, from autograd); the weight given is summed."""
    torch.manual_seed(0)
    layer = nn.Linear(3, 2)
    x = torch.randn(4, 1, 3)
    per_example = PerExampleGradients(layer, [layer.weight])
    with per_example.capture(4):
        losses = layer(x).pow(2).sum((1, 2))
    per_example.backward(losses.sum())
    norms = per_example.norms_by_layer()[""].sqrt()
    alone = torch.stack([torch.autograd.grad(layer(x[i:i + 1]).pow(2).sum(), layer.weight)[0].norm() for i in range(4)])
    torch.testing.assert_close(norms, alone)
    per_example.accumulate(torch.ones(4))
    assert hasattr(layer.weight, "summed_grad") and not hasattr(layer.bias, "summed_grad")
    per_example.remove()


def test_the_norm_rule_is_chosen_by_memory_for_each_linear_layer(monkeypatch):
    """Ghost norms hold B·T² per layer, materialised ones B·d_out·d_in: the smaller is used, asked with the layer's
    own token count and widths (same values either way; this pins the memory)."""
    assert PerExampleGradients._ghost(3, 4, 3) and not PerExampleGradients._ghost(4, 4, 4)
    asked = []
    monkeypatch.setattr(PerExampleGradients, "_ghost", staticmethod(lambda t, d_in, d_out: asked.append(
        (t, d_in, d_out)) or False))
    layer = nn.Linear(5, 3)
    per_example = PerExampleGradients(layer, list(layer.parameters()))
    with per_example.capture(2):
        losses = layer(torch.randn(2, 7, 5)).pow(2).sum((1, 2))
    per_example.backward(losses.sum())
    per_example.norms_by_layer()
    per_example.remove()
    assert asked == [(7, 5, 3)]  # T = 7 tokens, d_in = 5, d_out = 3


class ScaledRMSNorm(nn.Module):
    """A model's own RMSNorm in Gemma's form: x/rms(x)·(1 + w), its ε under `eps`."""

    def __init__(self, d: int, eps: float):
        super().__init__()
        self.weight, self.eps = nn.Parameter(torch.randn(d) * 0.1), eps

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * (1 + self.weight)


class LlamaStyleRMSNorm(ScaledRMSNorm):
    """Llama's form: w·x/rms(x), its ε under `variance_epsilon`."""

    def __init__(self, d: int, eps: float):
        super().__init__(d, eps)
        del self.eps
        self.variance_epsilon = eps

    def forward(self, x):
        return self.weight * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)


@pytest.mark.parametrize("norm", [lambda d: nn.RMSNorm(d), lambda d: nn.RMSNorm(d, eps=0.3),
                                  lambda d: ScaledRMSNorm(d, 0.2), lambda d: LlamaStyleRMSNorm(d, 0.5)],
                         ids=["torch-default-eps", "torch-eps", "gemma-style", "llama-style"])
@pytest.mark.parametrize("owner", [None, [1, 0, 1, 2, 0]], ids=["rows", "multi-row"])
def test_rms_norms_of_every_form_equal_each_example_alone(norm, owner):
    """RMSNorm layers (torch's, with its ε or the dtype's default, and the models' own with ε under either name):
    norms and clipped sums against each example alone, ε large enough that getting it wrong shows."""
    torch.manual_seed(0)
    model = Tiny()
    model.ln = norm(D)
    params = list(model.parameters())
    examples = 3
    owner = torch.arange(examples) if owner is None else torch.tensor(owner)
    x = _ids(len(owner))
    grads = _alone(model, params, _forward, x, owner, examples)
    per_example = _captured(model, params, _forward, x, examples, None if owner.equal(torch.arange(3)) else owner)
    _check(per_example, model, params, grads, examples, torch.tensor([0.3, 1.7, -0.5]))


def test_a_norm_with_a_bias_or_without_an_epsilon_is_not_taken_for_an_rms_norm():
    class BiasedRMSNorm(ScaledRMSNorm):
        def __init__(self, d):
            super().__init__(d, 0.1)
            self.bias = nn.Parameter(torch.zeros(d))

    class NoEpsRMSNorm(nn.Module):
        def __init__(self, d):
            super().__init__()
            self.weight = nn.Parameter(torch.ones(d))

    for layer in (BiasedRMSNorm(D), NoEpsRMSNorm(D)):
        with pytest.raises(UnsupportedLayerError, match=rf"\({type(layer).__name__}\) has trainable parameters"):
            PerExampleGradients(nn.Sequential(layer), list(layer.parameters()))
