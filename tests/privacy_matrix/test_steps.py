"""Claim 9 — one training step of every private method, as Lightning calls it: charged once before its data are read,
an empty batch charged and released too (a pure-noise update that changes the weights), only privatised values
logged unless privacy.diagnostics=true (then exactly the raw statistics each method lists), the results' privacy
block counting every step, and a first-order method's optimizer state surviving a checkpoint."""

from __future__ import annotations

import math

import pytest
import torch

from dpft.methods.zeroth_order import ZerothOrderSGD
from tests.conftest import requires_data
from tests.privacy_matrix.matrix import METHODS, PARAMETER_NOISE, build, family, run_overrides

pytestmark = requires_data

# what each step logs: privatised values (ε covers them) and, only with diagnostics, raw statistics of the data
PRIVATISED = {"zeroth_order": {"train/projected_grad"}, "first_order": set(), "federated": {"fed/update_norm"}}
RAW = {"zeroth_order": {"train/loss", "train/batch_size"}, "first_order": {"train/loss", "train/grad_norm_median",
                                                                          "train/batch_size"},
       "federated": {"train/loss", "fed/clients", "fed/upload_bytes"}}
RAW_WHEN_EMPTY = {"zeroth_order": {"train/batch_size"}, "first_order": {"train/batch_size"},
                  "federated": {"fed/clients", "fed/upload_bytes"}}


def _expected(method: str, diagnostics: bool, empty: bool) -> set[str]:
    kind = family(method)
    privatised = set(PRIVATISED[kind])
    raw = set(RAW_WHEN_EMPTY[kind] if empty else RAW[kind])
    if method in PARAMETER_NOISE:  # DPGD-0th releases the noised weights; its projection is a raw clipped sum
        privatised, raw = set(), raw | {"train/clipped_projected_grad"}
    if method == "anadp":
        privatised = {"anadp/sigma/"}  # one per group, prefix compared
    return privatised | (raw if diagnostics else set())


def _names(logged: list[str]) -> set[str]:
    return {"anadp/sigma/" if name.startswith("anadp/sigma/") else name for name in logged}


def _check_values(built, indices: list[int], out: torch.Tensor, diagnostics: bool) -> None:
    """The values logged are the step's own: the released projection, the batch's size and mean loss."""
    values, kind = built.stepper.values, family(built.method)
    if kind == "zeroth_order":
        released = built.optimizer.state["zo"]["projected_grads"][0]
        name = "train/clipped_projected_grad" if built.method in PARAMETER_NOISE else "train/projected_grad"
        if name in values:
            assert torch.equal(torch.as_tensor(values[name][0]), torch.as_tensor(released))
    if diagnostics and kind != "federated":
        assert values["train/batch_size"][0] == float(len(indices))
        if indices:
            assert float(values["train/loss"][0]) == pytest.approx(float(out))
    if diagnostics and kind == "first_order" and indices:
        assert float(values["train/grad_norm_median"][0]) == float(built.module.dp.last_norms.median())
    if built.method == "anadp":  # the allocation, post-processing of released gradients
        assert {n.split("/")[-1]: v for n, (v, _) in values.items() if n.startswith("anadp/sigma/")} == \
            built.module.dp.sigmas
    for _, options in values.values():
        assert options.get("batch_size") == 1  # one value per step, averaged over steps as such


def _batch(built, indices: list[int]) -> dict:
    if family(built.method) == "federated":
        return {"clients": indices}
    return built.batch(indices)


@pytest.mark.parametrize("diagnostics", [False, True], ids=["private", "diagnostics"])
@pytest.mark.parametrize("method", METHODS)
def test_a_step_is_charged_once_released_even_when_empty_and_logs_what_it_may(method, diagnostics):
    built = build(method, *run_overrides(method), f"privacy.diagnostics={str(diagnostics).lower()}")
    module, ledger = built.module, built.module.ledger
    built.stepper.start()
    charged = ledger.steps  # DR-Encoder's stage-1 rounds
    passes = []
    for step, indices in enumerate(([0, 3, 5], [])):
        before = [p.detach().clone() for p in built.params]
        built.stepper.logged.clear()
        forward_passes = module.forward_passes
        out = built.stepper.step(_batch(built, indices))
        passes.append(module.forward_passes - forward_passes)
        assert ledger.steps == charged + step + 1
        assert _names(built.stepper.logged) == _expected(method, diagnostics, empty=not indices)
        assert any(not torch.equal(b, p) for b, p in zip(before, built.params))  # released, noised: moved
        assert out.dim() == 0
        if indices and family(method) != "federated":
            assert torch.isfinite(out) and out > 0  # the batch's mean loss
        elif family(method) != "federated":
            assert out == 0  # nothing to average: no NaN
        _check_values(built, indices, out, diagnostics)
    if family(method) != "federated":  # the cost does not reveal an empty batch
        assert passes[0] == passes[1] > 0
    block = module.privacy_block()
    assert block["steps"] == ledger.steps == charged + 2
    assert block["epsilon_spent"] == pytest.approx(built.spec.epsilon(ledger.steps), rel=1e-12)
    assert block["epsilon_spent"] < built.spec.target_epsilon  # two of the budget's steps, not all of them
    if family(method) == "federated":  # what the statement adds for federated runs
        assert block["prior_rounds"] == int(built.cfg.method.get("prior_rounds", 0) or 0)
        assert block["noise_placement"] == {"dp_fedavg": "server, on the sum",
                                            "dr_encoder": "split over the round's clients before encoding"}[method]
    raw = module.raw_statistics()  # end-of-run counts, released only as diagnostics
    if family(method) == "zeroth_order":
        assert raw == {"nonfinite_scalars": 0}
    elif family(method) == "first_order":
        assert raw == {"dropped_nonfinite_examples": 0}
    else:
        assert raw["nonfinite_client_updates"] == 0 and raw["communication/clients_per_round"] == [3, 0]


@pytest.mark.parametrize("method", [m for m in METHODS if family(m) == "first_order"])
def test_a_first_order_methods_optimizer_state_survives_a_checkpoint(method):
    """ANADP's allocation, its history and the dropped-example count come back with the checkpoint, before the first
    resumed step (on_fit_start), so the resumed noise is the one the run had reached."""
    first = build(method, *run_overrides(method))
    for indices in ([0, 3, 5], [1, 2]):
        first.stepper.step(first.batch(indices))
    first.module.dp.dropped = 2
    checkpoint: dict = {"state_dict": {}}
    first.module.on_save_checkpoint(checkpoint)
    resumed = build(method, *run_overrides(method))
    resumed.module.on_load_checkpoint(checkpoint)
    resumed.module.on_fit_start()
    assert resumed.module.ledger.steps == 2 and resumed.module.dp.dropped == 2
    assert resumed.module.raw_statistics() == {"dropped_nonfinite_examples": 2}
    assert resumed.module.sigma_history == first.module.sigma_history
    if method == "anadp":
        assert resumed.module.dp.sigmas == first.module.dp.sigmas and len(first.module.sigma_history) == 2
        block = resumed.module.privacy_block()
        assert block["final_group_noise_multipliers"] == first.module.dp.sigmas
        assert block["group_noise_multipliers_history"] == first.module.sigma_history
        groups = len(first.module.dp.groups)
        assert block["group_clip"] == pytest.approx(first.module.clip / math.sqrt(groups)) and groups > 1
        assert first.module.sigma_history[-1] == first.module.dp.sigmas  # the allocation each step released
        resumed.module.sigma_history = [{"g": float(i)} for i in range(200)]  # long runs: about 100 kept, evenly
        assert resumed.module.privacy_block()["group_noise_multipliers_history"] == [
            {"g": float(i)} for i in range(0, 200, 2)]


def test_dpzopo_moves_only_its_data_free_mask_and_states_its_clip_rule():
    """DP-ZOPO's steps (noise included) change exactly the coordinates of the mask chosen at setup: about
    mask_fraction of the non-embedding weights, none of the embeddings; the block names the clipped scalar."""
    built = build("dpzopo", *run_overrides("dpzopo"), "method.mask_fraction=0.05")
    module = built.module
    assert module.masks is not None and len(module.masks) == len(module._optimizer_order())
    before = [p.detach().clone() for p in module._optimizer_order()]
    for indices in ([0, 3, 5], []):
        built.stepper.step(built.batch(indices))
    embeddings = {id(m.weight) for m in module.model.modules() if isinstance(m, torch.nn.Embedding)}
    selected = total = 0
    for p, b, mask in zip(module._optimizer_order(), before, module.masks):
        moved = (p.detach() != b).flatten().nonzero().flatten()
        allowed = set(mask.tolist())
        assert set(moved.tolist()) <= allowed and len(moved) >= 0.9 * len(allowed)
        if id(p) in embeddings:
            assert not allowed
        else:
            selected, total = selected + len(allowed), total + p.numel()
    assert selected == round(0.05 * total)
    assert module.privacy_block()["clip_target"] == "normalized"


@pytest.mark.parametrize("method", METHODS)
def test_secure_mode_reaches_the_noise_every_method_draws(method):
    """privacy.secure_mode=true: the noise source a step draws from is the OS CSPRNG (no generator to replay); off, a
    seeded generator."""
    for secure in (True, False):
        built = build(method, *run_overrides(method), f"privacy.secure_mode={str(secure).lower()}")
        kind = family(method)
        source = (built.optimizer.estimator.noise if kind == "zeroth_order" else
                  built.module.dp.noise if kind == "first_order" else built.module.noise)
        assert source.secure is secure and (source.generator is None) is secure


@pytest.mark.parametrize("clip,target,message", [
    (0.0, "normalized", r"method.clip must be > 0, got 0.0"),
    (-1.0, "difference", r"method.clip must be > 0, got -1.0"),
    (1.0, "sum", r"method.clip_target='sum' is not one of \('difference', 'normalized'\)"),
])
def test_a_private_estimator_refuses_what_it_cannot_bound(clip, target, message):
    from dpft.methods.zeroth_order import PrivateEstimator

    with pytest.raises(ValueError, match=message):
        PrivateEstimator(clip, target, 1.0, "gaussian", 4.0, seed=0)


@pytest.mark.parametrize("method", [m for m in METHODS if family(m) == "zeroth_order"])
def test_a_zeroth_order_run_counts_its_non_finite_scalars_in_its_raw_statistics(method):
    """An example whose loss is NaN is dropped by the private estimator and counted; the end-of-run raw statistics
    (released only as diagnostics) read that count from the run's own estimator."""
    from types import SimpleNamespace

    built = build(method, *run_overrides(method))
    module = built.module
    losses = module.per_example_losses
    module.per_example_losses = lambda batch: losses(batch).index_fill(0, torch.tensor([1]), math.nan)
    built.stepper.step(built.batch([0, 3, 5]))
    counted = built.optimizer.estimator.nonfinite
    assert counted >= 1
    module._trainer = SimpleNamespace(global_step=1)  # a fitted module reads its optimizer's estimator
    assert module.raw_statistics() == {"nonfinite_scalars": counted}


@pytest.mark.parametrize("method", ["dpzoso", "dpzopo"])
def test_the_zeroth_order_engine_runs_with_the_methods_own_settings(method):
    """The engine a method builds carries its schedule (DP-ZOSO's stages), proximal term, z generator, directions,
    seed, weight decay and per-name seeding; DP-ZOPO's mask is the data-free one of its configured queries, seed
    and selection rule (recomputed here on a fresh copy of the model)."""
    from dpft.methods.pruning import data_free_mask

    overrides = [*run_overrides(method), "method.first_stage=2", "method.proximal=0.25", "method.weight_decay=0.01",
                 "method.seed=7", "method.direction=sphere"]
    if method == "dpzopo":
        overrides += ["method.mask_queries=2", "method.mask_select=largest", "method.mask_fraction=0.05"]
    built = build(method, *overrides)
    module, engine = built.module, built.optimizer
    assert engine.schedule is module.schedule and engine.schedule.first_stage == 2
    assert (engine.proximal, engine.seed, engine.direction) == (0.25, 7, "sphere")
    assert engine.z_generator == module.z_generator and engine.directions == module.directions
    assert [(g["weight_decay"], all(p.ndim >= 2 for p in g["params"])) for g in engine.param_groups] in (
        [(0.01, True), (0.0, False)], [(0.01, True)])  # decay on matrices only
    names = {id(p): n for n, p in module.model.named_parameters()}
    expected_keys = ZerothOrderSGD(module.param_groups(), lr=0.0,
                                   param_names=[names[id(p)] for p in module._optimizer_order()])._keys
    assert engine._keys == expected_keys
    if method == "dpzopo":  # the largest rule shows the queries and seed; the smallest one shows the rule itself
        for select in ("largest", "smallest"):
            chosen = [*overrides[:-2], f"method.mask_select={select}", overrides[-1]]
            masks = module.masks if select == "largest" else build(method, *chosen).module.masks
            fresh = build(method, *chosen, setup=False)
            expected = data_free_mask(fresh.module._optimizer_order(), fresh.module.model, 0.05, queries=2, seed=7,
                                      select=select)
            assert all(torch.equal(a, b) for a, b in zip(masks, expected))
            assert select == "largest" or not all(torch.equal(a, b) for a, b in zip(masks, module.masks))


@pytest.mark.parametrize("method", [m for m in METHODS if family(m) == "federated"])
def test_a_round_averages_the_clipped_updates_over_the_expected_clients_and_logs_their_mean_loss(method):
    """Without noise and with an identity codec for DR-Encoder, a round's update is Σ_c clip_C(Δ_c) / m, m the
    expected number of clients; the raw loss (diagnostics) is the mean of the clients' local losses."""
    built = build(method, *run_overrides(method), "privacy.diagnostics=true", spec_changes={"noise_multiplier": 0.0})
    module = built.module
    built.stepper.start()
    if module.autoencoder is not None:
        module.autoencoder.encode = lambda tensors: [t.clone() for t in tensors]
        module.autoencoder.decode = lambda codes: [c.clone() for c in codes]
    updates = [[torch.randn(p.shape) * scale for p in built.params] for scale in (0.01, 10.0, 3.0)]
    from dpft.methods.federated import clip_update

    expected = [sum(parts) / built.spec.expected_batch_size
                for parts in zip(*[clip_update(u, module.clip) for u in updates])]
    for got, want in zip(module.aggregate(updates), expected):
        torch.testing.assert_close(got, want)
    losses = []
    local_update = module.local_update
    module.local_update = lambda client, seed: (lambda out: losses.append(out[1]) or out)(local_update(client, seed))
    built.stepper.step({"clients": [0, 3, 5]})
    assert float(built.stepper.values["train/loss"][0]) == pytest.approx(sum(losses) / len(losses)) and len(losses) == 3


def test_a_non_private_zeroth_order_step_stops_on_a_non_finite_loss_naming_the_step():
    """MeZO (no estimator to drop values) stops at the first non-finite loss, naming the step and the values."""
    from types import SimpleNamespace

    import dpft.train
    from dpft.methods.base import NonFiniteLossError
    from dpft.models.loading import load_model
    from tests.privacy_matrix.matrix import Stepper, _scorer, _task, method_cfg

    cfg = method_cfg("mezo")
    task, scorer = _task(cfg.task.name, cfg.task.max_length), _scorer(cfg.model.name, cfg.task.name, cfg.task.max_length)
    module = dpft.train.build_method(cfg, load_model(cfg.model, num_labels=task.num_labels), scorer)
    stepper = Stepper(module, module.configure_optimizers())
    module._trainer = SimpleNamespace(global_step=7)
    losses = module.per_example_losses
    module.per_example_losses = lambda batch: losses(batch).index_fill(0, torch.tensor([1]), math.nan)
    examples = task.splits(("train",))["train"][:3]
    with pytest.raises(NonFiniteLossError, match=r"non-finite training loss at step 7 \(\[[-0-9.e]+, nan, "):
        stepper.step(scorer.collate(examples, train=True))
