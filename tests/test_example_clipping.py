"""One example, one clip: DP first-order methods bound each example's contribution by C, whatever its rows.

A causal LM scores a classification task whose label words are not all one token with one forward row per
(example, candidate). The oracle is the definition: example i's gradient computed alone (its rows forwarded
together, ℓ_i differentiated), clipped to min(1, C/‖∇ℓ_i‖)·∇ℓ_i, and summed; Opacus's per-sample gradients,
summed by hand per example, are a second one where it is installed.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from dpft.data import mezo
from dpft.methods.dp_first_order import AdaptiveNoiseDPOptimizer, DPFirstOrder, DPOptimizer
from dpft.models.loading import load_model
from dpft.privacy.noise import NoiseSource
from dpft.privacy.per_example import PerExampleGradients, UnsupportedLayerError
from dpft.train import run
from dpft.validation import ConfigError, validate_config
from tests.conftest import compose_config, requires_data
from tests.test_dp_first_order import _naive, _setup

# ' abysmal' is three OPT tokens, ' not great' two: one row per candidate, of different lengths
MULTI_TOKEN_WORDS = ("abysmal", "not great")


@pytest.fixture
def multi_token_sst2(monkeypatch):
    monkeypatch.setattr(mezo.SST2, "label_words", MULTI_TOKEN_WORDS)


def _norms(grads: list[list[torch.Tensor]]) -> torch.Tensor:
    return torch.stack([torch.sqrt(sum(g.pow(2).sum() for g in gs)) for gs in grads])


def _clipped_sum(grads: list[list[torch.Tensor]], clip: float) -> list[torch.Tensor]:
    """Σ_i min(1, C/‖g_i‖) g_i: the definition."""
    factors = [min(1.0, clip / float(n)) if n > 0 else 1.0 for n in _norms(grads)]
    return [sum(c * gs[j] for c, gs in zip(factors, grads)) for j in range(len(grads[0]))]


def _capture(model, scorer, params, examples, per_example=None) -> PerExampleGradients:
    """One batch captured as training does: rows mapped to their examples by `owner`."""
    per_example = per_example or PerExampleGradients(model, params)
    batch = scorer.collate(examples, train=True)
    with per_example.capture(len(examples), batch.get("owner")):
        losses = scorer.losses(model, batch)
    per_example.backward(losses.sum())
    return per_example


def _dp(per_example, params, clip: float, cls=DPOptimizer) -> DPOptimizer:
    return cls(per_example, params, noise_multiplier=0.0, max_grad_norm=clip, expected_batch_size=1.0,
               noise=NoiseSource("gaussian", 0))


def _median_clip(norms: torch.Tensor) -> float:
    clip = float(norms.median())
    assert (norms > clip * 1.01).any() and (norms < clip * 0.99).any()  # clips some examples and not others
    return clip


def _multi_task_setup(task_name: str, peft: str):
    torch.manual_seed(0)  # LoRA's initialisation
    model, scorer, params, examples = _setup("opt-tiny", task_name, peft)
    batch = scorer.collate(examples, train=True)
    assert len(examples) >= 4 and batch["attention_mask"].sum(1).unique().numel() > 1  # padded, varied rows
    if task_name == "sst2":  # really several rows per example, of label words of several tokens
        assert all(len(scorer._encode(" " + w)) > 1 for w in MULTI_TOKEN_WORDS)
        assert len(batch["input_ids"]) == 2 * len(examples)
    return model, scorer, params, examples


CASES = [("sst2", "none"), ("sst2", "lora"), ("copa", "none"), ("copa", "lora")]


@requires_data
@pytest.mark.parametrize("task_name,peft", CASES, ids=["multi_token-full", "multi_token-lora", "copa-full",
                                                       "copa-lora"])
def test_clipped_sum_is_the_sum_of_each_example_clipped_alone(multi_token_sst2, task_name, peft):
    model, scorer, params, examples = _multi_task_setup(task_name, peft)
    alone = _naive(model, scorer, params, examples)  # each example by itself: its rows forwarded together
    clip = _median_clip(_norms(alone))
    per_example = _capture(model, scorer, params, examples)
    dp = _dp(per_example, params, clip)
    dp.clip_and_accumulate()
    torch.testing.assert_close(dp.last_norms, _norms(alone), rtol=1e-4, atol=1e-7)  # one norm per example
    for p, expected in zip(params, _clipped_sum(alone, clip)):
        torch.testing.assert_close(p.summed_grad, expected, rtol=1e-4, atol=1e-7)
    # ANADP clips each layer k of each example to C/√K: per-layer norms are per example too
    index = {id(p): j for j, p in enumerate(params)}
    layer_norms = per_example.norms_by_layer()
    anadp = _dp(per_example, params, clip, AdaptiveNoiseDPOptimizer)
    anadp.clip_and_accumulate()
    for name, module in per_example.layers:
        own = [index[id(p)] for p in module.parameters(recurse=False) if id(p) in index]
        layer_alone = [[gs[j] for j in own] for gs in alone]
        torch.testing.assert_close(layer_norms[name].sqrt(), _norms(layer_alone), rtol=1e-4, atol=1e-7)
        for j, expected in zip(own, _clipped_sum(layer_alone, anadp.group_clip)):
            torch.testing.assert_close(params[j].summed_grad, expected, rtol=1e-4, atol=1e-7)


@requires_data
@pytest.mark.parametrize("peft", ["none", "lora"], ids=["full", "lora"])
def test_adding_or_removing_one_example_moves_the_clipped_sum_by_at_most_c(multi_token_sst2, peft):
    """The sensitivity itself, one example at a time (a bound of B·C on the whole sum would not see an example
    whose rows are each clipped to C but add up to more)."""
    model, scorer, params, examples = _multi_task_setup("sst2", peft)
    clip = _median_clip(_norms(_naive(model, scorer, params, examples)))
    per_example = PerExampleGradients(model, params)

    def clipped_sum(batch_examples) -> list[torch.Tensor]:
        dp = _dp(_capture(model, scorer, params, batch_examples, per_example), params, clip)
        dp.clip_and_accumulate()
        return [p.summed_grad.clone() for p in params]

    whole = clipped_sum(examples)
    for j in range(len(examples)):
        without = clipped_sum(examples[:j] + examples[j + 1:])
        change = torch.sqrt(sum((a - b).pow(2).sum() for a, b in zip(whole, without)))
        assert change <= clip * (1 + 1e-4), (j, float(change), clip)


@requires_data
def test_zeroth_order_methods_clip_losses_that_are_per_example(multi_token_sst2):
    """DP-ZO, DPZero, ... clip one scalar per entry of `per_example_losses`: one per example, each the example's
    loss alone, however many rows it has."""
    model, scorer, _, examples = _multi_task_setup("sst2", "none")
    with torch.no_grad():
        losses = scorer.losses(model, scorer.collate(examples, train=True))
        alone = torch.cat([scorer.losses(model, scorer.collate([ex], train=True)) for ex in examples])
    torch.testing.assert_close(losses, alone, rtol=1e-5, atol=1e-6)


class _RowScorer(nn.Module):
    """One score per row from supported layers; the MLP reads the tokens flattened into the rows, as OPT's."""

    def __init__(self):
        super().__init__()
        self.embed, self.norm = nn.Embedding(30, 6, padding_idx=0), nn.LayerNorm(6)
        self.fc1, self.fc2, self.head = nn.Linear(6, 12), nn.Linear(12, 6), nn.Linear(6, 1)

    def forward(self, ids: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        h = self.norm(self.embed(ids)) * scale[:, None, None]
        rows, length, width = h.shape
        h = h + self.fc2(torch.tanh(self.fc1(h.reshape(-1, width)))).view(rows, length, width)
        real = (ids != 0).unsqueeze(-1)
        return self.head((h * real).sum(1) / real.sum(1)).squeeze(-1)


def _example_losses(scores: torch.Tensor, owner: torch.Tensor, gold: list[int]) -> torch.Tensor:
    """Cross-entropy over each example's rows (gold: the row index of each example's answer)."""
    return torch.stack([torch.logsumexp(scores[owner == i], 0) - scores[g] for i, g in enumerate(gold)])


@pytest.mark.parametrize("ghost", [True, False], ids=["ghost", "materialised"])
def test_rows_in_any_order_and_number_and_the_drop_mask_are_per_example(monkeypatch, ghost):
    """Examples owning 2-3 rows each, interleaved; one example's loss is NaN (one of its rows is): all of its
    rows are dropped, and the others' norms and clipped sum are the definition's."""
    monkeypatch.setattr(PerExampleGradients, "_ghost", staticmethod(lambda t, d_in, d_out: ghost))
    torch.manual_seed(0)
    model = _RowScorer()
    params = list(model.parameters())
    owner = torch.tensor([2, 0, 0, 1, 2, 2, 3, 1, 3])
    gold = [2, 7, 5, 6]  # a row of each example
    lengths = [3, 5, 2, 4, 5, 1, 3, 2, 4]
    ids = torch.zeros(len(owner), max(lengths), dtype=torch.long)
    for r, n in enumerate(lengths):
        ids[r, :n] = torch.randint(1, 30, (n,))
    scale = torch.ones(len(owner))
    scale[7] = math.nan  # example 1's second row: dropping only an example's first row would leave it

    alone = []
    for i, g in enumerate(gold):
        rows = (owner == i).nonzero().flatten()
        width = max(lengths[r] for r in rows)  # padded for its own rows only
        scores = model(ids[rows, :width], scale[rows])
        loss = torch.logsumexp(scores, 0) - scores[int((rows == g).nonzero())]
        alone.append([gr if i != 1 else torch.zeros_like(gr) for gr in torch.autograd.grad(loss, params)])
    norms = _norms(alone)
    clip = float(norms[[0, 2, 3]].median())

    per_example = PerExampleGradients(model, params)
    with per_example.capture(len(gold), owner):
        losses = _example_losses(model(ids, scale), owner, gold)
    bad = ~torch.isfinite(losses.detach())
    assert bad.tolist() == [False, True, False, False]
    per_example.drop(bad)
    per_example.backward(torch.where(bad, 0.0, losses).sum())
    dp = _dp(per_example, params, clip)
    dp.clip_and_accumulate()
    torch.testing.assert_close(dp.last_norms, norms, rtol=1e-4, atol=1e-6)
    assert (norms[[0, 2, 3]] > clip * 1.01).any() and (norms[[0, 2, 3]] < clip * 0.99).any()
    for p, expected in zip(params, _clipped_sum(alone, clip)):
        torch.testing.assert_close(p.summed_grad, expected, rtol=1e-4, atol=1e-6)


def _dropout_off(model: nn.Module) -> None:
    """Training mode (Opacus records activations only then) with every dropout at 0 (OPT's are floats)."""
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
        for attr in ("dropout", "activation_dropout", "attention_dropout", "layerdrop"):
            if isinstance(getattr(module, attr, None), float):
                setattr(module, attr, 0.0)
    model.train()


@requires_data
@pytest.mark.parametrize("peft", ["none", "lora"], ids=["full", "lora"])
def test_opacus_per_sample_gradients_summed_by_example_agree(multi_token_sst2, peft):
    """Opacus gives one gradient per row, and on OPT one per token for fc1, fc2 and each block's final
    LayerNorm (OPT flattens the tokens before them): summed here by hand into one per example."""
    pytest.importorskip("opacus")
    from opacus import GradSampleModule

    model, scorer, params, examples = _multi_task_setup("sst2", peft)
    _dropout_off(model)
    batch = scorer.collate(examples, train=True)
    rows, owner = len(batch["input_ids"]), batch["owner"]
    opacus = GradSampleModule(model, loss_reduction="sum")
    scorer.losses(model, batch).sum().backward()
    per_token = 0
    by_example = [[] for _ in examples]
    for p in params:
        sample = p.grad_sample
        if sample.shape[0] != rows:
            sample = sample.reshape(rows, -1, *p.shape).sum(1)
            per_token += 1
        summed = torch.zeros(len(examples), *p.shape).index_add_(0, owner, sample)
        for i in range(len(examples)):
            by_example[i].append(summed[i])
        del p.grad_sample
        p.grad = None
    opacus.remove_hooks()
    assert (per_token > 0) == (peft == "none")  # LoRA factors sit on attention only
    clip = _median_clip(_norms(by_example))
    dp = _dp(_capture(model, scorer, params, examples), params, clip)
    dp.clip_and_accumulate()
    torch.testing.assert_close(dp.last_norms, _norms(by_example), rtol=1e-4, atol=1e-7)
    for p, expected in zip(params, _clipped_sum(by_example, clip)):
        torch.testing.assert_close(p.summed_grad, expected, rtol=1e-4, atol=1e-7)


@requires_data
@pytest.mark.parametrize("method", ["dpsgd", "dpsgd_lora"])
def test_training_with_multi_token_label_words_clips_one_norm_per_example(make_cfg, monkeypatch, multi_token_sst2,
                                                                          method):
    batches: list[tuple[int, int]] = []  # (examples, forward rows) of each non-empty step
    norms: list[int] = []  # norms the step clipped
    per_example_losses, clip_and_accumulate = DPFirstOrder.per_example_losses, DPOptimizer.clip_and_accumulate

    def losses_spy(self, batch):
        batches.append((len(batch["examples"]), len(batch["input_ids"])))
        return per_example_losses(self, batch)

    def clip_spy(self) -> None:
        clip_and_accumulate(self)
        norms.append(len(self.last_norms))

    monkeypatch.setattr(DPFirstOrder, "per_example_losses", losses_spy)
    monkeypatch.setattr(DPOptimizer, "clip_and_accumulate", clip_spy)
    cfg = make_cfg("model=opt-tiny", "task=sst2", f"method={method}", "privacy=eps2", "validate=false",
                   "trainer.limit_test_batches=1")
    results = run(cfg)
    assert results["privacy"]["steps"] == 3 and batches
    assert all(rows == 2 * n for n, rows in batches)  # two rows per example
    assert norms == [n for n, _ in batches]


BERT_ALL = ["model=minilm-l6", "task=sst2-k16", "method=dpsgd", "privacy=eps2", "method.trainable=all"]


def test_bert_with_every_parameter_trainable_is_refused_before_data_loads(tmp_path, monkeypatch):
    import dpft.train

    def nothing(*args, **kwargs):
        raise AssertionError("loaded before the per-example layers were checked")

    monkeypatch.setattr(dpft.train, "build_task_from_config", nothing)
    monkeypatch.setattr(dpft.train, "load_model", nothing)
    with pytest.raises(ConfigError) as err:
        run(compose_config(BERT_ALL, tmp_path / "run"))
    message = str(err.value)
    assert "\n" not in message and "method.trainable=all" in message
    assert "'encoder.embeddings.position_embeddings'" in message and "method.trainable=no_embeddings" in message
    for fine in (["method.trainable=no_embeddings"], ["method=dpsgd_lora"], ["method.trainable=head"]):
        assert validate_config(compose_config([*BERT_ALL, *fine], tmp_path))


def test_a_layer_input_shared_by_the_batch_is_refused_at_its_first_forward(monkeypatch):
    """The guarantee behind the check before data: a BERT whose position embedding trains cannot step."""
    cfg = compose_config(BERT_ALL)
    model = load_model(cfg.model, num_labels=2)
    per_example = PerExampleGradients(model, list(model.parameters()))
    ids = torch.randint(1000, 2000, (3, 5))
    with pytest.raises(UnsupportedLayerError, match=r"'encoder.embeddings.position_embeddings'.*\(1, 5\)"):
        with per_example.capture(3):
            model(ids, torch.ones_like(ids))
