"""Federated methods: partitions, FedAvg by hand, the auto-encoder's random prior, bytes and client-level ε."""

from __future__ import annotations

import copy
import dataclasses
import json
import math
from pathlib import Path

import dp_accounting as dpa
import lightning as L
import pytest
import torch
from dp_accounting import pld, rdp

from dpft.data.federated import FederatedDataModule, partition
from dpft.data.tasks import build_task
from dpft.methods import federated
from dpft.methods.federated import (
    ChunkCodec,
    FederatedLoRA,
    GradientAutoEncoder,
    RandomPrior,
    client_statistics,
)
from dpft.models.loading import load_model, load_tokenizer
from dpft.models.peft import apply_peft
from dpft.models.scoring import build_scorer
from dpft.privacy.accounting import make_spec
from dpft.train import run
from dpft.validation import ConfigError, validate_config
from tests.conftest import compose_config, requires_data

# with SHRINK: 24 MeZO-protocol training examples (2 per client), 3 rounds
FED = ["fed.clients=12", "fed.clients_per_round=4", "fed.local_steps=2", "fed.local_batch_size=4", "method.batch_size=4"]


def _max_label_share(shards: list[list[int]], labels: list[int]) -> float:
    shares = [max(sum(labels[i] == c for i in s) for c in set(labels)) / len(s) for s in shards]
    return sum(shares) / len(shares)


@requires_data
def test_partitions_are_disjoint_sized_as_configured_and_skewed_by_alpha():
    labels = [ex.label for ex in build_task("sst2-k512", 42).splits(("train",))["train"]]  # 512 per label
    n = len(labels)
    iid = partition(labels, 10, "iid", seed=3)
    assert sorted(i for s in iid for i in s) == list(range(n))
    assert max(map(len, iid)) - min(map(len, iid)) <= 1
    skews = {}
    for alpha in (0.1, 100.0):
        shards = partition(labels, 10, "dirichlet", alpha=alpha, seed=3, min_size=5)
        assert sorted(i for s in shards for i in s) == list(range(n)) and min(map(len, shards)) >= 5
        skews[alpha] = _max_label_share(shards, labels)
    # SST-2 is balanced: an IID shard's majority label holds about half of it; α = 0.1 gives nearly one label each
    assert _max_label_share(iid, labels) < 0.6 and skews[100.0] < 0.6 < 0.85 < skews[0.1]
    assert partition(labels, 10, "dirichlet", alpha=0.1, seed=3) != partition(labels, 10, "dirichlet", alpha=0.1, seed=4)
    with pytest.raises(ValueError, match="lower fed.clients"):
        partition(labels, n + 1)


def _tiny_federation(tmp_path: Path, aggregation: str, noise_multiplier: float | None = None, clip: float = 1e9,
                     rounds: int = 1, **module_kwargs):
    """opt-tiny with LoRA, 12 clients of SST-2, in a real Trainer for one round."""
    cfg = compose_config(["model=opt-tiny", "task=sst2", "method=dp_fedavg", *FED])
    task = build_task("sst2", num_train=48, num_dev=8, num_test=8)
    scorer = build_scorer(cfg.model.kind, task, load_tokenizer(cfg.model), max_length=48)
    torch.manual_seed(0)
    model = apply_peft(load_model(cfg.model, num_labels=task.num_labels), cfg.method.peft)
    model.eval()  # no dropout: the hand computation sees the same function
    private = aggregation != "mean"
    datamodule = FederatedDataModule(task, scorer, batch_size=4, eval_batch_size=8, seed=5, needed=("train",),
                                     poisson=private, clients=12)
    spec = None
    if private:
        spec = make_spec("gaussian", "pld", 2.0, 1e-5, dataset_size=12, expected_batch_size=4,
                         steps=rounds + module_kwargs.get("prior_rounds", 0), clip=clip,
                         adjacency="add/remove one client", sampling="Poisson over clients")
        if noise_multiplier is not None:
            spec = dataclasses.replace(spec, noise_multiplier=noise_multiplier)
    fed = {"clients": 12, "local_steps": 2, "local_batch_size": 100}  # a local step sees its whole shard
    module = FederatedLoRA(model, scorer, lr=0.5, fed=fed, aggregation=aggregation, clip=clip if private else None,
                           privacy=spec, seed=1, **module_kwargs)
    module.dropout_in_training = False
    trainer = L.Trainer(max_steps=rounds, max_epochs=-1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                        default_root_dir=str(tmp_path))
    return model, scorer, datamodule, module, trainer


class Rounds(L.Callback):
    def __init__(self):
        self.clients: list[list[int]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.clients.append(list(batch["clients"]))


def _hand_update(model, scorer, shard, start, lr: float, steps: int) -> list[torch.Tensor]:
    """Full-batch local gradient descent on a copy, written out by hand."""
    local = copy.deepcopy(model)
    params = [p for p in local.parameters() if p.requires_grad]
    with torch.no_grad():
        for p, s in zip(params, start):
            p.copy_(s)
    for _ in range(steps):
        loss = scorer.losses(local, scorer.collate(shard, train=True)).mean()
        grads = torch.autograd.grad(loss, params)
        with torch.no_grad():
            for p, g in zip(params, grads):
                p -= lr * g
    return [p.detach() - s for p, s in zip(params, start)]


@requires_data
@pytest.mark.parametrize("aggregation", ["mean", "noisy_sum"])
def test_a_round_without_noise_or_encoder_equals_fedavg_by_hand(tmp_path, aggregation):
    model, scorer, datamodule, module, trainer = _tiny_federation(tmp_path, aggregation, noise_multiplier=0.0)
    start = [p.detach().clone() for p in model.parameters() if p.requires_grad]
    rounds = Rounds()
    trainer.callbacks.append(rounds)
    trainer.fit(module, datamodule=datamodule)
    chosen = rounds.clients[0]
    assert chosen and len(datamodule.clients) == 12
    updates = [_hand_update(model, scorer, datamodule.clients[c], start, 0.5, 2) for c in chosen]
    # FedAvg: the mean over the round's clients; DP-FedAvg (σ = 0, C = ∞): the sum over the expected count
    divisor = len(chosen) if aggregation == "mean" else 4
    after = [p.detach() for p in model.parameters() if p.requires_grad]
    moved = False
    for j, (p, s) in enumerate(zip(after, start)):
        expected = s + sum(u[j] for u in updates) / divisor
        torch.testing.assert_close(p, expected, rtol=1e-5, atol=1e-7)
        moved |= not torch.equal(p, s)
    assert moved


def test_client_statistics_have_sensitivity_c_and_invert_to_the_moments():
    torch.manual_seed(0)
    for scale in (1e-3, 1.0, 1e3):  # any update of norm ≤ C, however its mass is spread
        update = [torch.randn(5, 7) * scale, torch.randn(3) * scale + scale, torch.zeros(4)]
        norm = math.sqrt(sum(float((u ** 2).sum()) for u in update))
        update = [u * (2.0 / norm) for u in update]  # ‖Δ‖ = C = 2
        assert float(client_statistics(update, 2.0).norm()) <= 2.0 + 1e-9
    stats = client_statistics(update, 2.0)
    prior = RandomPrior.from_statistics(stats, [35, 3, 4], 2.0, var_floor=1e-12)
    for u, mean, std in zip(update, prior.means, prior.stds):
        assert mean == pytest.approx(float(u.double().mean()), abs=1e-9)
        assert std == pytest.approx(max(float(u.double().var(unbiased=False)), 1e-12) ** 0.5, rel=1e-6, abs=1e-6)


def test_encoder_is_linear_and_reconstruction_error_falls_on_synthetic_data():
    torch.manual_seed(0)
    ae = GradientAutoEncoder([torch.Size([8, 40]), torch.Size([100])], compression=4, chunk=32, hidden=32)
    prior = RandomPrior(means=[0.5, -0.2], stds=[1.0, 0.3])
    history = ae.fit(prior, seed=7, steps=300, lr=3e-3, rows=128)
    assert len(history) == 300 and history[-1] < 0.5 * history[0]
    # held-out synthetic updates: better than the untrained codec, and codes add up (E is linear)
    generator = torch.Generator().manual_seed(99)
    x = [prior.sample(i, c.rows, c.chunk, generator).flatten()[: c.numel] for i, c in enumerate(ae.codecs)]
    y = [prior.sample(i, c.rows, c.chunk, generator).flatten()[: c.numel] for i, c in enumerate(ae.codecs)]
    fresh = GradientAutoEncoder(ae.shapes, 4, 32, 32)
    for codec, fresh_codec in zip(ae.codecs, fresh.codecs):
        fresh_codec.scale.copy_(codec.scale)
    def error(model):
        return sum(float(((d.flatten() - t) ** 2).mean()) for d, t in zip(model.decode(model.encode(x)), x))

    # i.i.d. entries: no code of chunk/4 numbers can do better than PCA, which keeps 1/4 of each chunk's variance
    optimum = sum((1 - 1 / 4) * std ** 2 for std in prior.stds)
    assert error(ae) < 1.25 * optimum < 0.7 * error(fresh)
    for cx, cy, cxy in zip(ae.encode(x), ae.encode(y), ae.encode([a + b for a, b in zip(x, y)])):
        torch.testing.assert_close(cx + cy, cxy, rtol=1e-5, atol=1e-5)
    assert ae.code_numel == 10 * 8 + 4 * 8  # ⌈320/32⌉ chunks of 32/4 numbers, ⌈100/32⌉ chunks of 8


@requires_data
def test_stage_one_trains_the_auto_encoder_on_the_random_prior_only(tmp_path, monkeypatch):
    """Stage 1 as `fit` runs it. The trained codec equals one trained from the same start on the privatised prior
    alone (so no real update can have shaped it: were one fed to it, the weights would differ), and no chunk a
    codec was fed in stage 1 is a chunk of a real client update."""
    encoder = {"compression": 4, "chunk": 16, "hidden": 16, "steps": 40, "lr": 1e-3, "rows": 32}
    model, scorer, datamodule, module, trainer = _tiny_federation(tmp_path, "encoded", clip=0.5, prior_rounds=2,
                                                                  encoder=encoder)
    untrained = copy.deepcopy(module.autoencoder)
    stage_one, real, fed_chunks = [True], [], []
    local_update, encode_chunks = FederatedLoRA.local_update, ChunkCodec.encode_chunks

    def spy_update(self, client, seed):
        update, loss = local_update(self, client, seed)
        if stage_one[0]:
            real.append([u.clone() for u in update])
        return update, loss

    def spy_encode(self, chunks):
        if stage_one[0]:
            fed_chunks.append(chunks.detach().clone())
        return encode_chunks(self, chunks)

    class EndOfStageOne(L.Callback):
        def on_train_start(self, trainer, pl_module):
            stage_one[0] = False

    monkeypatch.setattr(FederatedLoRA, "local_update", spy_update)
    monkeypatch.setattr(ChunkCodec, "encode_chunks", spy_encode)
    trainer.callbacks.append(EndOfStageOne())
    trainer.fit(module, datamodule=datamodule)
    assert real and module.ledger.steps == 2 + 1 and len(fed_chunks) == 40 * len(untrained.codecs)
    alone = copy.deepcopy(untrained)
    alone.fit(module.prior, seed=federated.derive_seed(1, federated._AUTOENCODER), steps=40, lr=1e-3, rows=32)
    for (name, a), b in zip(module.autoencoder.state_dict().items(), alone.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)
    assert any(not torch.equal(a, b) for a, b in zip(alone.state_dict().values(), untrained.state_dict().values()))
    real_chunks = {tuple(row.tolist()) for update in real for codec, u in zip(untrained.codecs, update)
                   for row in codec.chunks(u.reshape(-1).float())}
    assert not any(tuple(row.tolist()) in real_chunks for chunks in fed_chunks for row in chunks)


@requires_data
def test_dr_encoder_end_to_end_bytes_and_client_level_epsilon(make_cfg):
    cfg = make_cfg("model=opt-tiny", "task=sst2", "method=dr_encoder", "privacy=eps2", *FED, "trainer.max_steps=3",
                   "method.prior_rounds=2", "method.encoder.steps=20", "method.encoder.chunk=32",
                   "method.encoder.compression=8", "privacy.diagnostics=true")
    results = run(cfg)
    on_disk = json.loads((Path(cfg.paths.output_dir) / "results.json").read_text())
    p, comm = on_disk["privacy"], {**on_disk["communication"], **_realised(on_disk)}
    assert p["adjacency"] == "add/remove one client" and p["sampling"] == "Poisson over clients"
    assert p["dataset_size"] == 12 and p["sample_rate"] == pytest.approx(4 / 12)
    assert p["steps"] == p["budget_steps"] == 3 + 2 and p["prior_rounds"] == 2
    # ε after prior + R rounds from dp-accounting directly: Poisson(q) ∘ Gaussian(σ), composed 5 times
    event = dpa.SelfComposedDpEvent(dpa.PoissonSampledDpEvent(4 / 12, dpa.GaussianDpEvent(p["noise_multiplier"])), 5)
    accountant = pld.PLDAccountant(value_discretization_interval=1e-4)
    accountant.compose(event)
    assert p["epsilon_spent"] == pytest.approx(accountant.get_epsilon(1e-5), rel=1e-6) and p["epsilon_spent"] <= 2.0
    assert p["epsilon_rdp"] == pytest.approx(rdp.RdpAccountant().compose(event).get_epsilon(1e-5), rel=1e-6)
    # bytes: one client's code times the clients sampled, every round
    code_numel = comm["upload_bytes_per_client"] // 4
    assert comm["compression_ratio"] == pytest.approx(on_disk["cost"]["params_trainable"] / code_numel)
    assert comm["compression_ratio"] > 6
    assert len(comm["upload_bytes_per_round"]) == len(comm["clients_per_round"]) == 3
    for sampled, sent in zip(comm["clients_per_round"], comm["upload_bytes_per_round"]):
        assert sent == sampled * code_numel * 4
    assert comm["upload_bytes_total"] == sum(comm["upload_bytes_per_round"])
    # the realised counts reveal how many clients were sampled: released only as diagnostics, never in the summary
    assert "communication/upload_bytes_total" not in on_disk["summary"]
    assert comm["expected_upload_bytes_per_round"] == 4 * code_numel * 4
    assert on_disk["encoder"]["loss_last"] < on_disk["encoder"]["loss_first"]
    assert results["metrics"] == on_disk["metrics"] and "test/acc" in on_disk["metrics"]


def _realised(results: dict) -> dict:
    """The realised communication counts a private run lists under nonprivate_releases (privacy.diagnostics)."""
    values = results.get("nonprivate_releases", {}).get("values", {})
    return {k.split("/", 1)[1]: v for k, v in values.items() if k.startswith("communication/")}


@requires_data
def test_upload_bytes_match_the_codes_actually_sent(tmp_path):
    """code size × sampled clients, with the code size counted from the codec definition, not the counter."""
    _, _, datamodule, module, trainer = _tiny_federation(
        tmp_path, "encoded", clip=0.5, rounds=3, prior_rounds=1,
        encoder={"compression": 8, "chunk": 32, "hidden": 0, "steps": 5, "rows": 8})
    rounds = Rounds()
    trainer.callbacks.append(rounds)
    trainer.fit(module, datamodule=datamodule)
    per_client = sum(math.ceil(p.numel() / 32) * 4 for p in module.trainable_parameters())
    assert module.round_bytes == [4 * per_client * len(c) for c in rounds.clients]
    assert module.communication()["upload_bytes_per_client"] == 4 * per_client


@requires_data
@pytest.mark.parametrize("method,privacy", [("fedavg", "none"), ("dp_fedavg", "eps4")])
def test_fedavg_and_dp_fedavg_run_and_report_communication(make_cfg, method, privacy):
    cfg = make_cfg("model=roberta-tiny", "task=sst2-k16", f"method={method}", f"privacy={privacy}", *FED,
                   "fed.partition=dirichlet", "fed.alpha=1.0", "fed.clients=8", "method.batch_size=3",
                   *(["privacy.diagnostics=true"] if privacy != "none" else []))
    results = run(cfg)
    comm = {**results["communication"], **_realised(results)}
    assert comm["compression_ratio"] == 1.0 and comm["rounds"] == 3
    assert comm["upload_bytes_total"] == comm["clients_sampled"] * results["cost"]["params_trainable"] * 4
    assert results["data_sizes"]["clients"] == 8
    if method == "fedavg":
        assert comm["clients_sampled"] == 9 and results["privacy"]["epsilon_spent"] == 0
    else:
        assert 0 < results["privacy"]["epsilon_spent"] <= 4 and results["privacy"]["adjacency"] == "add/remove one client"


@pytest.mark.parametrize("overrides,message", [
    (["method=dp_fedavg", "privacy=eps2", "method.batch_size=20", "fed.clients=10"], "method.batch_size"),
    (["method=fedavg", "fed.partition=shards"], "fed.partition"),
    (["method=fedavg", "fed.alpha=0"], "fed.alpha"),
    (["method=fedavg", "fed.local_steps=0"], "fed.local_steps"),
    (["method=dr_encoder", "privacy=eps2", "method.encoder.compression=128"], "method.encoder.compression"),
    (["method=dr_encoder", "privacy=eps2", "method.prior_rounds=0"], "method.prior_rounds"),
    (["method=dp_fedavg", "privacy=eps2", "trainer=ddp"], "trainer.devices"),
    (["method=dr_encoder", "privacy=none"], "is private"),
])
def test_invalid_federated_settings_are_refused(overrides, message):
    with pytest.raises(ConfigError, match=message):
        validate_config(compose_config(["model=opt-tiny", "task=sst2", *overrides]))


@requires_data
def test_more_clients_than_examples_is_refused_with_a_hint(make_cfg):
    cfg = make_cfg("model=opt-tiny", "task=sst2", "method=fedavg", "fed.clients=30", "method.batch_size=4")
    with pytest.raises(ValueError, match="lower fed.clients"):
        run(cfg)


@requires_data
def test_dr_encoder_local_noise_states_and_spends_the_local_guarantee(make_cfg):
    """The paper's local noise: results.json says replace-one, local, no amplification; ε is dp-accounting's
    replace-one PLD of the Gaussian at the run's own σ composed over prior + R rounds at q = 1, ≤ the target."""
    cfg = make_cfg("model=opt-tiny", "task=sst2", "method=dr_encoder", "privacy=eps8", *FED, "trainer.max_steps=2",
                   "method.prior_rounds=1", "method.encoder.steps=5", "method.noise_placement=local",
                   "privacy.target_delta=3e-5")
    p = run(cfg)["privacy"]
    assert p["local"] and p["adjacency"] == "replace one client (each upload on its own: local)"
    assert p["noise_placement"] == "each client, the full σC, before encoding" and p["epsilon_rdp"] is None
    accountant = pld.PLDAccountant(neighboring_relation=dpa.NeighboringRelation.REPLACE_ONE,
                                   value_discretization_interval=1e-4)
    accountant.compose(dpa.SelfComposedDpEvent(dpa.GaussianDpEvent(p["noise_multiplier"]), 3))
    assert p["epsilon_spent"] == pytest.approx(accountant.get_epsilon(3e-5), rel=1e-6) and p["epsilon_spent"] <= 8
    split = make_spec("gaussian", "pld", 8, 3e-5, p["dataset_size"], p["expected_batch_size"], 3, p["clip"])
    assert p["noise_multiplier"] > 2 * split.noise_multiplier  # no amplification, replace-one: far more noise


@requires_data
@pytest.mark.parametrize("overrides,message", [
    (["method.noise_placement=local", "privacy.accountant=rdp"], "method.noise_placement=local .* set privacy.acc"),
    (["method.noise_placement=central"], "method.noise_placement"),
])
def test_dr_encoder_noise_placements_without_analysis_are_refused(overrides, message):
    with pytest.raises(ConfigError, match=message):
        validate_config(compose_config(["model=opt-tiny", "task=sst2", "method=dr_encoder", "privacy=eps2",
                                        *overrides]))
