"""Scale-out: data-parallel ZO and DP-SGD (2 CPU processes, gloo) against one process; placement independence."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from dpft.methods.zeroth_order import PrivateEstimator, ZerothOrderSGD
from tests.conftest import compose_config, requires_data

COMMON = ["model=opt-tiny", "task=sst2", "trainer.max_steps=4", "method.batch_size=8", "logger=none",
          "trainer.limit_val_batches=2", "trainer.limit_test_batches=2", "trainer.enable_progress_bar=false",
          "task.num_train=32", "task.num_dev=16", "task.num_test=16", "checkpoint.keep=true",
          "checkpoint.every_n_steps=null", "method.eval_batch_size=8", "++model.config.dropout=0.0"]
DDP = ["trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2", "trainer.precision=32-true"]


def _train(tmp_path: Path, name: str, *overrides: str) -> tuple[dict, dict[str, torch.Tensor]]:
    folder = tmp_path / name
    env = {**os.environ, "DPFT_LOG_DIR": str(tmp_path / "logs"), "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-m", "dpft.train", *COMMON, *overrides, f"hydra.run.dir={folder}"],
                         env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    results = json.loads((folder / "results.json").read_text())
    weights = torch.load(folder / "checkpoints" / "last.ckpt", weights_only=False)["state_dict"]
    return results, weights


@requires_data
@pytest.mark.parametrize("method", [["method=dpzo", "privacy=eps2", "method.lr=1e-3"],
                                    ["method=dpsgd", "privacy=eps2", "method.lr=1e-2"]], ids=["dpzo", "dpsgd"])
def test_two_processes_train_the_same_parameters_as_one(tmp_path, method):
    one, w1 = _train(tmp_path, "one", *method)
    two, w2 = _train(tmp_path, "two", *method, *DDP)
    assert two["privacy"] == one["privacy"]  # the accountant sees the global rate: the same statement
    assert two["data_sizes"] == one["data_sizes"] and two["cost"]["steps"] == one["cost"]["steps"] == 4
    for key in w1:  # the same batches, directions and noise; only summation order and padding differ
        torch.testing.assert_close(w2[key], w1[key], rtol=1e-5, atol=1e-6)
    assert two["cost"]["forward_passes"] > 0 and two["privacy"]["epsilon_spent"] > 0
    assert two["metrics"]["test/acc"] == pytest.approx(one["metrics"]["test/acc"])
    assert two["metrics"]["val/loss"] == pytest.approx(one["metrics"]["val/loss"], rel=1e-5)


# --- the reductions themselves, on 2 gloo processes -------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawn(fn, *args) -> None:
    port = _free_port()
    mp.spawn(fn, args=(port, *args), nprocs=2, join=True)


def _init(rank: int, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    torch.set_num_threads(1)


def _estimator_worker(rank: int, port: int, out: str) -> None:
    _init(rank, port)
    plus = torch.tensor([0.9, 0.1, 0.5, 0.3, 0.7, 0.2], dtype=torch.float64)
    minus = torch.tensor([0.1, 0.8, 0.4, 0.3, 0.1, 0.9], dtype=torch.float64)
    est = PrivateEstimator(0.2, "difference", 2.0, "gaussian", expected_batch_size=6, seed=5)
    share = slice(rank, None, 2)
    values = [est(plus[share], minus[share], 1e-3) for _ in range(2000)]
    if rank == 0:
        torch.save(torch.tensor(values), out)
    dist.destroy_process_group()


def test_zo_scalars_are_all_reduced_and_noised_once(tmp_path):
    _spawn(_estimator_worker, str(tmp_path / "g.pt"))
    two = torch.load(tmp_path / "g.pt")
    plus = torch.tensor([0.9, 0.1, 0.5, 0.3, 0.7, 0.2], dtype=torch.float64)
    minus = torch.tensor([0.1, 0.8, 0.4, 0.3, 0.1, 0.9], dtype=torch.float64)
    est = PrivateEstimator(0.2, "difference", 2.0, "gaussian", expected_batch_size=6, seed=5)
    one = torch.tensor([est(plus, minus, 1e-3) for _ in range(2000)])
    torch.testing.assert_close(two, one, rtol=1e-12, atol=1e-9)  # same draws: noise from rank 0 only
    bound = 0.2 / (2 * 1e-3)
    # one N(0, (σ·bound)²) draw on the sum, not one per rank (which would give √2 times the std)
    assert (two * 6).std().item() == pytest.approx(2.0 * bound, rel=0.05)


def _zo_step_worker(rank: int, port: int, out: str) -> None:
    _init(rank, port)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 4), nn.Tanh(), nn.Linear(4, 3))
    x = torch.randn(8, 6, generator=torch.Generator().manual_seed(1))
    y = torch.arange(8) % 3
    est = PrivateEstimator(5.0, "normalized", 1.0, "gaussian", expected_batch_size=8, seed=3)
    opt = ZerothOrderSGD(model.parameters(), lr=0.1, eps=1e-3, seed=7, estimator=est)
    share = slice(rank, None, 2)
    for _ in range(5):
        opt.step(lambda: nn.functional.cross_entropy(model(x[share]), y[share], reduction="none"))
    torch.save([p.detach() for p in model.parameters()], f"{out}.{rank}")
    dist.destroy_process_group()


def test_every_rank_applies_the_same_update_as_one_process(tmp_path):
    _spawn(_zo_step_worker, str(tmp_path / "p"))
    rank0, rank1 = (torch.load(tmp_path / f"p.{r}") for r in (0, 1))
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 4), nn.Tanh(), nn.Linear(4, 3))
    x = torch.randn(8, 6, generator=torch.Generator().manual_seed(1))
    y = torch.arange(8) % 3
    est = PrivateEstimator(5.0, "normalized", 1.0, "gaussian", expected_batch_size=8, seed=3)
    opt = ZerothOrderSGD(model.parameters(), lr=0.1, eps=1e-3, seed=7, estimator=est)
    for _ in range(5):
        opt.step(lambda: nn.functional.cross_entropy(model(x), y, reduction="none"))
    for a, b, c in zip(rank0, rank1, model.parameters()):
        assert torch.equal(a, b)  # identical replicas
        torch.testing.assert_close(a, c.detach(), rtol=1e-6, atol=1e-7)


def _dpsgd_noise_worker(rank: int, port: int, out: str) -> None:
    _init(rank, port)
    from dpft.methods.dp_first_order import DPOptimizer
    from dpft.privacy.noise import NoiseSource
    from dpft.privacy.per_example import PerExampleGradients

    layer = nn.Linear(3, 2)
    dp = DPOptimizer(PerExampleGradients(layer, list(layer.parameters())), list(layer.parameters()),
                     noise_multiplier=1.5, max_grad_norm=2.0, expected_batch_size=1.0,
                     noise=NoiseSource("gaussian", seed=11))
    draws = []
    for _ in range(3000):
        dp.pre_step(empty=True)  # an empty share on both ranks: the reduced gradient is pure noise
        draws.append(layer.weight.grad.flatten().clone())
    if rank == 0:
        torch.save(torch.stack(draws), out)
    dist.destroy_process_group()


def test_dpsgd_noise_is_drawn_once_for_the_global_sum(tmp_path):
    _spawn(_dpsgd_noise_worker, str(tmp_path / "n.pt"))
    draws = torch.load(tmp_path / "n.pt")
    assert draws.std().item() == pytest.approx(1.5 * 2.0, rel=0.03)  # σC, not √2·σC


# --- placement --------------------------------------------------------------------------------------
def test_the_update_does_not_depend_on_which_worker_draws_which_parameter():
    """Each parameter's z comes from a generator reseeded from (step seed, parameter name): one worker
    (one generator) or several (as devices or threads each with their own) give the same bits."""

    def train(threads: int) -> list[torch.Tensor]:
        torch.manual_seed(0)
        model = nn.Sequential(*[nn.Linear(8, 8) for _ in range(6)])
        x = torch.randn(4, 8, generator=torch.Generator().manual_seed(2))
        before = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            opt = ZerothOrderSGD(model.parameters(), lr=0.05, eps=1e-3, seed=9,
                                 param_names=[n for n, _ in model.named_parameters()])
            for _ in range(3):
                opt.step(lambda: model(x).pow(2).mean(1))
        finally:
            torch.set_num_threads(before)
        return [p.detach().clone() for p in model.parameters()]

    assert all(torch.equal(a, b) for a, b in zip(train(1), train(2)))


def test_a_model_dispatched_with_a_device_map_trains_like_one_in_place(tmp_path):
    """accelerate's dispatch (hooks moving activations between the devices of a device map) around the
    model: the ZO step perturbs and updates in place, and the result equals the undispatched model's."""
    from accelerate import dispatch_model

    from dpft.models.loading import load_model

    cfg = compose_config(["model=opt-tiny"], tmp_path)

    def train(dispatch: bool) -> list[torch.Tensor]:
        model = load_model(cfg.model).eval()
        if dispatch:
            layers = {f"model.decoder.layers.{i}": "cpu" for i in range(2)}
            model = dispatch_model(model, device_map={"model.decoder.embed_tokens": "cpu",
                                                      "model.decoder.embed_positions": "cpu",
                                                      "model.decoder.final_layer_norm": "cpu", "lm_head": "cpu",
                                                      **layers})
        ids = torch.randint(3, 1000, (4, 12), generator=torch.Generator().manual_seed(0))
        names = [n for n, _ in model.named_parameters()]
        opt = ZerothOrderSGD(model.parameters(), lr=1e-3, eps=1e-3, seed=1, param_names=names)
        for _ in range(2):
            opt.step(lambda: nn.functional.cross_entropy(model(input_ids=ids).logits[:, :-1].flatten(0, 1),
                                                         ids[:, 1:].flatten(), reduction="none").view(4, -1).mean(1))
        return [p.detach().clone() for p in model.parameters()]

    assert all(torch.equal(a, b) for a, b in zip(train(False), train(True)))


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_placement_over_two_gpus_gives_the_same_update():
    torch.manual_seed(0)
    state = nn.Sequential(nn.Linear(32, 32), nn.Linear(32, 8)).state_dict()

    def train(devices: tuple[str, str]) -> list[torch.Tensor]:
        model = nn.Sequential(nn.Linear(32, 32), nn.Linear(32, 8))
        model.load_state_dict(state)
        model[0].to(devices[0]), model[1].to(devices[1])
        x = torch.randn(4, 32, generator=torch.Generator().manual_seed(2)).to(devices[0])
        opt = ZerothOrderSGD(model.parameters(), lr=0.05, eps=1e-3, seed=4,
                             param_names=[n for n, _ in model.named_parameters()])
        for _ in range(3):
            opt.step(lambda: model[1](torch.tanh(model[0](x)).to(devices[1])).pow(2).mean(1))
        return [p.detach().cpu() for p in model.parameters()]

    assert all(torch.equal(a, b) for a, b in zip(train(("cuda:0", "cuda:0")), train(("cuda:0", "cuda:1"))))


def test_a_device_mapped_model_is_never_moved_by_the_strategy(tmp_path):
    """Lightning's teardown moves the module to the host after fit; a dispatched model must stay where it is
    (on GPUs the next stage, trainer.test, would otherwise get host weights and device inputs)."""
    import lightning as L
    import torch

    from dpft.distributed import DeviceMapStrategy

    class Module(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.layer = torch.nn.Linear(2, 1)
            self.moves = 0

        def cpu(self):  # what Strategy.teardown calls
            self.moves += 1
            return super().cpu()

        def training_step(self, batch, batch_idx):
            return self.layer(batch[0]).sum()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    module = Module()
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.ones(4, 2)), batch_size=2)
    trainer = L.Trainer(strategy=DeviceMapStrategy("cpu"), max_steps=2, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)
    trainer.fit(module, data)
    assert module.moves == 0


def test_a_device_map_that_offloads_to_the_cpu_or_disk_is_refused_when_gpus_exist(monkeypatch):
    from types import SimpleNamespace

    import torch
    from omegaconf import OmegaConf

    from dpft.models.loading import _check_not_offloaded

    cfg = OmegaConf.create({"name": "opt-66b", "device_map": "auto"})
    placed = SimpleNamespace(hf_device_map={"model.decoder.layers.0": 0, "model.decoder.layers.63": "disk"})
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    with pytest.raises(ValueError, match=r"1 module\(s\) of opt-66b .* offloaded .*model.decoder.layers.63"):
        _check_not_offloaded(cfg, placed)
    _check_not_offloaded(cfg, SimpleNamespace(hf_device_map={"model": 0, "lm_head": 1}))  # all on GPUs
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    _check_not_offloaded(cfg, placed)  # a CPU-only machine: the CPU is where the model runs
