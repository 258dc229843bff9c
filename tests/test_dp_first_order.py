"""DP-SGD and ANADP: per-example gradients against a naive loop, clipping, noise, and the allocation."""

from __future__ import annotations

import math

import pytest
import torch

from dpft import seeding
from dpft.data.tasks import build_task
from dpft.methods.dp_first_order import AdaptiveNoiseDPOptimizer, DPOptimizer
from dpft.models.loading import load_model, load_tokenizer
from dpft.models.peft import apply_peft, select_trainable
from dpft.models.scoring import build_scorer
from dpft.privacy.noise import NoiseSource
from dpft.privacy.per_example import PerExampleGradients, UnsupportedLayerError
from tests.conftest import compose_config, requires_data

pytestmark = requires_data

CASES = [("opt-tiny", "sst2", "none"), ("opt-tiny", "sst2", "lora"), ("roberta-tiny", "sst2-k16", "none"),
         ("roberta-tiny", "sst2-k16", "lora"), ("opt-tiny", "copa", "none")]
# today's families: RMSNorm (Gemma's 1 + w), gated MLPs, rotary grouped-query attention, q/k/v biases (Qwen2), a
# fused QKV and parallel blocks (GPT-NeoX, Phi), tied (Llama, Gemma) and untied (Qwen2, GPT-NeoX, Phi: with a bias)
# heads; full and LoRA
FAMILIES = ("llama-tiny", "qwen2-tiny", "gpt-neox-tiny", "gemma-tiny", "phi-tiny")
FAMILY_CASES = [(family, "sst2", peft) for family in FAMILIES for peft in ("none", "lora")]


def _setup(model_name: str, task_name: str, peft: str, trainable: str = "no_embeddings"):
    cfg = compose_config([f"model={model_name}", f"task={task_name}", "method=dpsgd", f"method.peft.mode={peft}"])
    task = build_task(task_name, num_train=24, num_dev=8, num_test=8) if "-k" not in task_name else build_task(task_name)
    scorer = build_scorer(cfg.model.kind, task, load_tokenizer(cfg.model), max_length=48)
    model = apply_peft(load_model(cfg.model, num_labels=task.num_labels), cfg.method.peft)
    select_trainable(model, trainable if peft == "none" else "all")
    model.eval()  # dropout off: the per-example and one-at-a-time gradients must see the same function
    params = [p for p in model.parameters() if p.requires_grad]
    # variable lengths: these examples pad differently in a batch than alone
    examples = sorted(task.splits(("train",))["train"], key=lambda ex: len(str(ex.fields)))[::5][:5]
    return model, scorer, params, examples


def _naive(model, scorer, params, examples) -> list[list[torch.Tensor]]:
    grads = []
    for ex in examples:
        loss = scorer.losses(model, scorer.collate([ex], train=True))[0]
        grads.append([g.detach() for g in torch.autograd.grad(loss, params, allow_unused=True)])
    return [[torch.zeros_like(p) if g is None else g for g, p in zip(gs, params)] for gs in grads]


def _captured(model, scorer, params, examples):
    """Capture one batch and differentiate to the hooked layers' outputs, as training does."""
    per_example = PerExampleGradients(model, params)
    batch = scorer.collate(examples, train=True)
    assert batch["attention_mask"].sum(1).unique().numel() > 1  # really padded
    with per_example.capture(len(examples)):
        losses = scorer.losses(model, batch)
    per_example.backward(losses.sum())
    return per_example


@pytest.mark.parametrize("model_name,task_name,peft", CASES + FAMILY_CASES)
def test_per_example_norms_and_clipped_sums_equal_a_naive_loop(model_name, task_name, peft):
    model, scorer, params, examples = _setup(model_name, task_name, peft)
    naive = _naive(model, scorer, params, examples)
    naive_norms = torch.stack([torch.sqrt(sum(g.pow(2).sum() for g in gs)) for gs in naive])
    per_example = _captured(model, scorer, params, examples)
    norms = torch.stack(list(per_example.norms_by_layer().values())).sum(0).sqrt()
    torch.testing.assert_close(norms, naive_norms, rtol=1e-4, atol=1e-7)
    factors = torch.tensor([0.3, 1.0, 0.0, 2.5, 0.7])[: len(examples)]
    per_example.accumulate(factors)
    for j, p in enumerate(params):
        expected = sum(c * gs[j] for c, gs in zip(factors, naive))
        torch.testing.assert_close(p.summed_grad, expected, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("ghost", [True, False], ids=["ghost", "materialised"])
@pytest.mark.parametrize("model_name,task_name,peft", [CASES[0], CASES[3]])
def test_both_norm_rules_equal_a_naive_loop(monkeypatch, model_name, task_name, peft, ghost):
    """Each Linear's norm by the ghost identity (q, k and v sharing their input's Gram) or materialised."""
    monkeypatch.setattr(PerExampleGradients, "_ghost", staticmethod(lambda t, d_in, d_out: ghost))
    model, scorer, params, examples = _setup(model_name, task_name, peft)
    naive = _naive(model, scorer, params, examples)
    naive_norms = torch.stack([torch.sqrt(sum(g.pow(2).sum() for g in gs)) for gs in naive])
    norms = torch.stack(list(_captured(model, scorer, params, examples).norms_by_layer().values())).sum(0).sqrt()
    torch.testing.assert_close(norms, naive_norms, rtol=1e-4, atol=1e-7)


def test_backward_to_the_layer_outputs_skips_weight_gradients_and_changes_nothing():
    """No p.grad is computed (the clipped sum replaces it), and the unclipped sum is an ordinary backward's gradient."""
    model, scorer, params, examples = _setup("opt-tiny", "sst2", "none")
    scorer.losses(model, scorer.collate(examples, train=True)).sum().backward()
    ordinary = [p.grad.clone() for p in params]
    for p in params:
        p.grad = None
    captured = _captured(model, scorer, params, examples)
    assert all(p.grad is None for p in params)
    captured.accumulate(torch.ones(len(examples)))
    for p, expected in zip(params, ordinary):
        torch.testing.assert_close(p.summed_grad, expected, rtol=1e-5, atol=1e-8)
    with pytest.raises(RuntimeError, match="capture"):
        PerExampleGradients(model, params).backward(torch.zeros((), requires_grad=True))


def _dp(per_example, params, sigma: float, clip: float, batch: float, cls=DPOptimizer, **kw):
    return cls(per_example, params, noise_multiplier=sigma, max_grad_norm=clip, expected_batch_size=batch,
               noise=NoiseSource("gaussian", 0), **kw)


def test_zero_noise_and_huge_clip_equal_the_non_private_step():
    model, scorer, params, examples = _setup("roberta-tiny", "sst2-k16", "none")
    batch = scorer.collate(examples, train=True)
    reference = torch.autograd.grad(scorer.losses(model, batch).mean(), params)
    per_example = _captured(model, scorer, params, examples)
    dp = _dp(per_example, params, sigma=0.0, clip=1e10, batch=len(examples))
    dp.pre_step(empty=False)
    for p, ref in zip(params, reference):
        torch.testing.assert_close(p.grad, ref, rtol=1e-5, atol=1e-8)  # equal up to summation order
    assert per_example.norms_by_layer() == {}  # the step released what it captured


def test_each_clipped_contribution_is_bounded_by_c():
    model, scorer, params, examples = _setup("opt-tiny", "sst2", "none")
    naive = _naive(model, scorer, params, examples)
    per_example = _captured(model, scorer, params, examples)
    dp = _dp(per_example, params, sigma=0.0, clip=1e-3, batch=1.0)
    dp.clip_and_accumulate()
    factors = (1e-3 / (dp.last_norms + 1e-6)).clamp(max=1.0)
    for c, gs in zip(factors, naive):
        assert torch.sqrt(sum((c * g).pow(2).sum() for g in gs)) <= 1e-3 * (1 + 1e-4)
    total = torch.sqrt(sum(p.summed_grad.pow(2).sum() for p in params))
    assert total <= len(examples) * 1e-3 * (1 + 1e-4)


def test_empirical_noise_std_matches_sigma_c():
    model, scorer, params, _ = _setup("roberta-tiny", "sst2-k16", "none")
    per_example = PerExampleGradients(model, params)
    dp = _dp(per_example, params, sigma=1.3, clip=0.5, batch=4.0)
    dp.pre_step(empty=True)  # empty Poisson batch: pure noise
    noise = torch.cat([p.grad.flatten() for p in params]) * 4.0
    assert noise.numel() > 5000
    # SE of the sample std over n > 5000 draws is σC/√(2n) < 1%
    assert noise.std().item() == pytest.approx(1.3 * 0.5, rel=0.04)
    assert abs(noise.mean().item()) < 5 * 0.65 / math.sqrt(noise.numel())


@pytest.mark.parametrize("mechanism", ["gaussian", "laplace"])
def test_noise_drawn_in_chunks_over_threads_is_calibrated_independent_and_reproducible(monkeypatch, mechanism):
    """`add_to` draws chunk c of tensor i from a seed of its own, over threads: the same values on one thread
    or two, from a restored checkpoint too; calibrated; chunks uncorrelated (not one seed reused)."""
    monkeypatch.setattr(seeding, "CHUNK", 1000)
    monkeypatch.setattr(seeding, "PARALLEL_MIN", 0)
    monkeypatch.setattr(seeding, "_pools", {})
    shapes, b = [(40, 50), (3000,), (7,)], 2.0

    def draw(source: NoiseSource, threads: int) -> list[torch.Tensor]:
        before = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            tensors = [torch.zeros(shape) for shape in shapes]
            source.add_to(tensors, [b] * len(tensors))
        finally:
            torch.set_num_threads(before)
        return tensors

    source = NoiseSource(mechanism, seed=3)
    restored = NoiseSource(mechanism, seed=99)
    restored.load_state_dict(source.state_dict())
    threaded, serial = draw(source, 2), draw(restored, 1)
    assert seeding._pools  # the chunks did run on threads
    assert all(torch.equal(x, y) for x, y in zip(threaded, serial))
    assert not torch.equal(draw(source, 2)[0], threaded[0])  # the next call draws afresh
    flat = torch.cat([t.flatten() for t in threaded])
    std = b if mechanism == "gaussian" else b * math.sqrt(2)
    assert flat.std().item() == pytest.approx(std, rel=0.05) and abs(flat.mean().item()) < 5 * std / math.sqrt(5007)
    chunks = torch.stack([flat[i:i + 1000] for i in range(0, 5000, 1000)])  # 2 chunks of tensor 0, 3 of tensor 1
    correlations = torch.corrcoef(chunks)[~torch.eye(5, dtype=torch.bool)]
    assert correlations.abs().max() < 0.15  # SE 0.03; a reused seed gives 1
    with pytest.raises(ValueError, match="contiguous"):
        source.add_to([torch.zeros(4, 3).t()], [b])


def test_unsupported_layers_and_tied_weights_are_refused_with_the_fix():
    model, _, _, _ = _setup("opt-tiny", "sst2", "none", trainable="all")
    params = [p for p in model.parameters() if p.requires_grad]
    with pytest.raises(UnsupportedLayerError, match="tied"):
        PerExampleGradients(model, params)
    model, _, _, _ = _setup("opt-tiny", "sst2", "none")
    model.model.decoder.layers[0].self_attn.register_parameter("scale", torch.nn.Parameter(torch.ones(1)))
    with pytest.raises(UnsupportedLayerError, match="OPTAttention.*supported mode"):
        PerExampleGradients(model, [p for p in model.parameters() if p.requires_grad])


# --- ANADP -----------------------------------------------------------------------------------------
class PerLayerClipDPOptimizer(DPOptimizer):
    """DP-SGD with per-layer clipping C/√K and noise σC: overrides one piece, as Opacus variants do."""

    def clip_and_accumulate(self) -> None:
        norms = {k: v.sqrt() for k, v in self.per_example.norms_by_layer().items()}
        clip = self.max_grad_norm / math.sqrt(len(self.per_example.layers))
        self.per_example.accumulate({k: (clip / (n + 1e-6)).clamp(max=1.0) for k, n in norms.items()})


def _anadp_setup(**kw):
    model, scorer, params, examples = _setup("roberta-tiny", "sst2-k16", "lora")
    per_example = PerExampleGradients(model, params)
    batch = scorer.collate(examples, train=True)

    def backward():
        for p in params:
            p.grad = None
        with per_example.capture(len(examples)):
            losses = scorer.losses(model, batch)
        per_example.backward(losses.sum())

    return params, per_example, backward


def test_anadp_allocation_keeps_the_privacy_of_one_gaussian_at_every_step():
    params, per_example, backward = _anadp_setup()
    dp = _dp(per_example, params, 1.1, 0.5, 4.0, AdaptiveNoiseDPOptimizer, warmup_steps=2, mix=0.8)
    seen = set()
    for _ in range(6):
        backward()
        dp.pre_step(empty=False)
        for p in params:
            p.data.add_(p.grad, alpha=-1e-2)
        assert sum(s ** -2 for s in dp.sigmas.values()) == pytest.approx(1.1 ** -2, rel=1e-9)
        seen.add(tuple(round(s, 6) for s in dp.sigmas.values()))
    assert len(seen) > 2  # the allocation moves with importance


def test_anadp_with_uniform_importance_is_dp_sgd_with_per_group_clipping():
    params, per_example, backward = _anadp_setup()
    anadp = _dp(per_example, params, 1.1, 0.5, 4.0, AdaptiveNoiseDPOptimizer, mix=0.0, warmup_steps=0)
    backward()
    anadp.pre_step(empty=False)
    anadp_grads = [p.grad.clone() for p in params]
    reference = _dp(per_example, params, 1.1, 0.5, 4.0, PerLayerClipDPOptimizer)
    backward()
    reference.pre_step(empty=False)
    for a, b in zip(anadp_grads, params):
        torch.testing.assert_close(a, b.grad, rtol=1e-6, atol=1e-9)


def test_anadp_importance_reads_only_the_noised_gradient(monkeypatch):
    params, per_example, backward = _anadp_setup()
    dp = _dp(per_example, params, 50.0, 0.5, 4.0, AdaptiveNoiseDPOptimizer, beta1=0.0, warmup_steps=100)
    clean = {}
    original = DPOptimizer.add_noise

    def spy(self):
        clean.update({id(p): p.summed_grad.clone() / self.expected_batch_size for p in self.params})
        original(self)

    monkeypatch.setattr(DPOptimizer, "add_noise", spy)
    backward()
    before = {id(p): p.detach().clone() for p in params}
    dp.pre_step(empty=False)
    group = dp.groups[0]
    members = [p for p in params if dp.group_of[id(p)] == group]
    from_noised = float(torch.cat([(before[id(p)] * p.grad).abs().flatten() for p in members]).mean())
    from_clean = float(torch.cat([(before[id(p)] * clean[id(p)]).abs().flatten() for p in members]).mean())
    assert dp.sensitivity[group] == pytest.approx(from_noised, rel=1e-6)  # β1 = 0: the current estimate
    assert abs(from_noised - from_clean) > 0.5 * from_noised  # so reading the clean gradient would fail here


class _Recorded:
    """A stand-in for PerExampleGradients with given squared per-example norms per layer: records the clip factors
    the optimizer applies and the examples it drops (the oracle below never reads the optimizer's own formula)."""

    def __init__(self, squared: dict[str, list[float]]):
        self.squared = {k: torch.tensor(v, dtype=torch.float64) for k, v in squared.items()}
        self.layers = [(name, torch.nn.Linear(1, 1)) for name in squared]
        self.applied, self.dropped = None, []

    def norms_by_layer(self):
        return {k: v.clone() for k, v in self.squared.items()}

    def accumulate(self, factors):
        self.applied = factors

    def drop(self, examples):
        self.dropped.append(examples.clone())

    def release(self):
        pass


def test_the_applied_factor_bounds_every_example_even_at_norms_near_the_clip_floor():
    """c_i·‖g_i‖ ≤ C exactly (float64) for norms from 1e-7 to 1e3 around C = 1e-6 and C = 2; an example at or under
    the clip keeps c_i within 1e-3 of 1; a non-finite norm gets c_i = 0, is dropped and counted."""
    for clip in (1e-6, 2.0):
        norms = [1e-7, 5e-7, 1e-6, 2e-6, 3e-6, 0.5, 2.0, 7.0, 1e3, math.inf, math.nan]
        stand_in = _Recorded({"a": [n * n * 0.36 for n in norms], "b": [n * n * 0.64 for n in norms]})
        dp = DPOptimizer(stand_in, [], noise_multiplier=1.0, max_grad_norm=clip, expected_batch_size=4.0,
                         noise=NoiseSource("gaussian", 0))
        dp.clip_and_accumulate()
        c = stand_in.applied.double()
        for i, n in enumerate(norms):
            if not math.isfinite(n):
                assert c[i] == 0 and bool(stand_in.dropped[-1][i])
                continue
            assert c[i] * n <= clip and 0 <= c[i] <= 1
            if n <= clip / 1.001 and n >= 1e-3:
                assert c[i] >= 1 - 1e-3
            elif n >= 1e-3:
                assert c[i] * n >= clip * (1 - 1e-3)  # clipped to C, not below
        assert dp.dropped == 2 and dp.last_norms[-1] == 0 and dp.last_norms[-2] == 0


def test_examples_dropped_for_their_loss_add_to_those_dropped_for_their_gradient_and_the_count_accumulates():
    stand_in = _Recorded({"a": [1.0, math.inf, 4.0, 9.0]})
    dp = DPOptimizer(stand_in, [], noise_multiplier=1.0, max_grad_norm=1.0, expected_batch_size=4.0,
                     noise=NoiseSource("gaussian", 0))
    dp.exclude(torch.tensor([False, False, True, False]))  # example 2's loss was NaN
    dp.clip_and_accumulate()
    assert stand_in.dropped[-1].tolist() == [False, True, True, False]  # both reasons, every row of each
    assert dp.dropped == 2
    dp.pre_step(empty=False)  # the step ends: the next one starts with nothing excluded
    dp.exclude(torch.tensor([True, False, False, False]))
    assert dp.dropped == 4 and stand_in.dropped[-1].tolist() == [True, False, False, False]
    dp.clip_and_accumulate()
    assert stand_in.dropped[-1].tolist() == [True, True, False, False] and dp.dropped == 5
    with pytest.raises(ValueError, match="method.clip must be > 0, got 0.0"):
        DPOptimizer(stand_in, [], noise_multiplier=1.0, max_grad_norm=0.0, expected_batch_size=4.0,
                    noise=NoiseSource("gaussian", 0))


@pytest.mark.parametrize("mix", [0.0, 0.3, 1.0])
def test_anadp_allocation_keeps_the_budget_in_every_branch(mix):
    """Σ_k σ_k⁻² = σ⁻² (ANADP's budget identity) during warm-up, after it, and when the importance scores are all
    zero or not finite; uniform exactly for the first warmup_steps updates; the importance EMAs as the paper writes
    them, s ← β₁s + (1 − β₁)|θ·g|, u ← β₂u + (1 − β₂)|current − s|."""
    stand_in = _Recorded({"a": [1.0], "b": [1.0], "c": [1.0]})
    layers = [torch.nn.Linear(2, 2, bias=False) for _ in range(3)]
    stand_in.layers = list(zip("abc", layers))
    params = [m.weight for m in layers]
    sigma = 1.7
    dp = AdaptiveNoiseDPOptimizer(stand_in, params, noise_multiplier=sigma, max_grad_norm=3.0, expected_batch_size=4.0,
                                  noise=NoiseSource("gaussian", 0), beta1=0.6, beta2=0.7, mix=mix, warmup_steps=2)
    assert dp.group_clip == pytest.approx(3.0 / math.sqrt(3))

    def budget():
        return sum(s ** -2 for s in dp.sigmas.values())

    assert budget() == pytest.approx(sigma ** -2, rel=1e-12)
    grads = {id(p): torch.full_like(p, float(i + 1)) for i, p in enumerate(params)}
    s = dict.fromkeys("abc", 0.0)
    u = dict.fromkeys("abc", 0.0)
    for step in range(4):
        dp.update_importance(grads)
        for g, p in zip("abc", params):
            current = float((p.detach() * grads[id(p)]).abs().mean())
            s[g] = 0.6 * s[g] + 0.4 * current
            u[g] = 0.7 * u[g] + 0.3 * abs(current - s[g])
            assert dp.sensitivity[g] == pytest.approx(s[g], rel=1e-12) and dp.uncertainty[g] == pytest.approx(u[g])
        assert budget() == pytest.approx(sigma ** -2, rel=1e-12) and dp.steps == step + 1
        uniform = len(set(round(v, 12) for v in dp.sigmas.values())) == 1
        assert uniform == (step + 1 < 2 or mix == 0.0)
    for bad in (0.0, math.nan):  # no usable importance: back to uniform, same budget
        dp.sensitivity = dict.fromkeys("abc", bad)
        weights = dp.allocation_weights()
        assert weights == pytest.approx(dict.fromkeys("abc", 1 / 3))
