"""The privacy matrix's shared pieces: the private methods (from their configs), each method's objects built as
`dpft.train` builds them, a stand-in for the Lightning loop around one training step, and the oracles.

The oracles are written out here, independent of the code under test: Poisson draws from the published rule,
ε from `dp_accounting` directly (or the Laplace closed form), each zeroth-order method's clip bound from its
paper, and tolerances for empirical standard deviations; per-example gradients one example at a time are in
the clipping claim's module.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import math
import os
import shutil
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from types import SimpleNamespace
from typing import Any
from unittest import mock

import dp_accounting as dpa
import lightning as L
import pytest
import torch
from dp_accounting import pld, rdp
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import DictConfig, OmegaConf, open_dict

import dpft.train
from dpft.config import CONFIG_DIR
from dpft.data.federated import FederatedDataModule
from dpft.data.tasks import build_task_from_config
from dpft.methods.federated import FederatedLoRA
from dpft.models.loading import load_model, load_tokenizer
from dpft.models.peft import apply_peft, select_trainable
from dpft.models.scoring import build_scorer
from dpft.privacy import noise as noise_module
from dpft.privacy.noise import NoiseSource
from dpft.seeding import derive_seed
from tests.conftest import compose_config


# --- the private methods -------------------------------------------------------------------------------
def _resolved(name: str, key: str) -> Any:
    """`key` of conf/method/<name>.yaml after its `defaults` chain (the file's own value wins, as `_self_` last)."""
    cfg = OmegaConf.load(CONFIG_DIR / "method" / f"{name}.yaml")
    if key in cfg:
        return cfg[key]
    for parent in cfg.get("defaults", []):
        if isinstance(parent, str) and parent != "_self_":
            value = _resolved(parent, key)
            if value is not None:
                return value
    return None


def config_value(method: str, key: str) -> Any:
    """A key of the method's config as composed (None where absent)."""
    return _resolved(method, key)


def configured_private_methods() -> tuple[str, ...]:
    return tuple(sorted(p.stem for p in (CONFIG_DIR / "method").glob("*.yaml") if _resolved(p.stem, "private")))


METHODS = configured_private_methods()  # the one list every claim is parametrised over
FAMILIES = {"ZerothOrder": "zeroth_order", "ParameterNoiseZerothOrder": "zeroth_order", "DPFirstOrder": "first_order",
            "FederatedLoRA": "federated"}


def family(method: str) -> str:
    """Which oracle a method gets, from the class its config builds; a new class has none and fails the matrix."""
    cls = str(_resolved(method, "_target_")).rsplit(".", 1)[-1]
    if cls not in FAMILIES:
        raise AssertionError(f"method={method} builds {cls}: the privacy matrix has no oracle for it yet")
    return FAMILIES[cls]


def mechanism(method: str) -> str:
    return str(_resolved(method, "mechanism"))


def in_family(name: str) -> list[str]:
    return [m for m in METHODS if family(m) == name]


# zeroth-order methods whose noise goes on the d parameters (DPGD-0th), not on the projected gradient; each claim
# about a zeroth-order method's noise reads the update for them
PARAMETER_NOISE = {"dpgd_zo"}
# the zeroth-order methods with a Laplace analysis (K scalars: L1 bound K·bound); a d-dimensional release has none
LAPLACE_ANALYSED = {"dpzo", "dpzo_laplace", "dpzero", "dpzoso", "dpzopo"}


# --- configurations ----------------------------------------------------------------------------------
CLIENTS = 8
# the smallest settings of each method (fast stage 1, a cheap data-free mask)
SMALL = {"zeroth_order": [], "first_order": [],
         "federated": [f"fed.clients={CLIENTS}", "fed.local_steps=1", "fed.local_batch_size=2"]}
EXTRA = {"dpzopo": ["method.mask_queries=1"], "dr_encoder": ["method.encoder.steps=2", "method.encoder.rows=4"]}


def budget(method: str) -> str:
    return "privacy=pure_eps8" if mechanism(method) == "laplace" else "privacy=eps8"


@cache
def _composed(method: str, groups: tuple[str, ...]) -> DictConfig:
    return compose_config(["model=opt-tiny", "task=sst2-k16", f"method={method}", budget(method), "task.max_length=24",
                           *SMALL[family(method)], *EXTRA.get(method, []), *groups])


_PARSER = OverridesParser.create()
CONFIG_GROUPS = {p.name for p in CONFIG_DIR.iterdir() if p.is_dir()}  # privacy=..., method=...: composed


def typed(override: str) -> Any:
    """The value Hydra's command-line grammar gives `key=value` (16 is an int, '16' a string, True a bool)."""
    return _PARSER.parse_overrides([override])[0].value()


def method_cfg(method: str, *overrides: str, output_dir: Path | None = None) -> DictConfig:
    """The run's config as a user composes it. Config-group choices (`privacy=eps2`) are composed by Hydra
    (cached: composing costs ~0.1 s); `key=value` overrides are parsed by Hydra's grammar and set on a fresh
    copy, as compose sets them (the config stays in struct mode: an unknown key fails as it would in Hydra)."""
    groups = tuple(o for o in overrides if o.split("=", 1)[0] in CONFIG_GROUPS)
    cfg = copy.deepcopy(_composed(method, groups))
    for override in overrides:
        if override not in groups:
            OmegaConf.update(cfg, override.split("=", 1)[0], typed(override), merge=False)
    if output_dir is not None:
        with open_dict(cfg):
            cfg.paths.output_dir = str(output_dir)
    return cfg


def units(cfg: DictConfig) -> int:
    """n of q = B / n: training examples, or clients for the federated methods."""
    return int(cfg.fed.clients) if cfg.method.get("federated") else len(train_examples(cfg))


def sample_rate(cfg: DictConfig) -> float:
    return cfg.method.batch_size / units(cfg)


# --- objects as a run builds them ----------------------------------------------------------------------
@cache
def _task(name: str, max_length: int):
    cfg = compose_config(["model=opt-tiny", f"task={name}", f"task.max_length={max_length}"])
    return build_task_from_config(cfg.task)


def train_examples(cfg: DictConfig) -> list:
    return _task(cfg.task.name, cfg.task.max_length).splits(("train",))["train"]


@cache
def _scorer(model: str, task: str, max_length: int):
    cfg = compose_config([f"model={model}", f"task={task}", f"task.max_length={max_length}"])
    return build_scorer(cfg.model.kind, _task(task, max_length), load_tokenizer(cfg.model), max_length=max_length)


class Stepper:
    """What the Lightning loop gives a method's `training_step`: its optimizer, `log`, and (federated) the
    datamodule. `logged` records every name the step logs (what the run would release)."""

    class _Optimizer:  # a LightningOptimizer's surface: `.optimizer`, step, zero_grad
        def __init__(self, optimizer):
            self.optimizer = optimizer

        def step(self, closure=None):
            return self.optimizer.step(closure) if closure is not None else self.optimizer.step()

        def zero_grad(self, set_to_none: bool = True):
            self.optimizer.zero_grad(set_to_none=set_to_none)

    def __init__(self, module, optimizer, datamodule=None):
        self.module, self.optimizer, self.logged = module, optimizer, []
        self.values: dict[str, tuple[Any, dict]] = {}  # the last value logged under each name, with its options
        wrapped = self._Optimizer(optimizer)
        module.optimizers = lambda use_pl_optimizer=True: wrapped
        module.log = lambda name, value, **kwargs: self.logged.append(name) or self.values.update(
            {name: (value, kwargs)})
        if datamodule is not None:
            module._trainer = SimpleNamespace(datamodule=datamodule, global_step=0, logger=None)

    def start(self) -> None:
        """What fit does before the first step (DR-Encoder: the stage-1 rounds, charged to the ledger)."""
        self.module.on_fit_start()

    def step(self, batch: dict) -> Any:
        out = self.module.training_step(batch, 0)
        if self.module._trainer is not None:
            self.module._trainer.global_step += 1
        return out


@dataclass
class Built:
    method: str
    cfg: DictConfig
    spec: Any
    module: Any
    optimizer: Any
    scorer: Any
    examples: list
    stepper: Stepper
    datamodule: Any = None

    @property
    def params(self) -> list[torch.nn.Parameter]:
        return self.module.trainable_parameters()

    def batch(self, indices: list[int]) -> dict:
        if not indices:
            return {"examples": []}
        return self.scorer.collate([self.examples[i] for i in indices], train=True)


def build(method: str, *overrides: str, spec_changes: dict | None = None, setup: bool = True) -> Built:
    """The method's LightningModule and optimizer from its composed config, as `dpft.train._run` builds them
    (calibrated privacy statement, peft, trainable selection); `spec_changes` replaces fields of the statement
    (e.g. noise_multiplier=0 to read a clipped sum)."""
    cfg = method_cfg(method, *overrides)
    task = _task(cfg.task.name, cfg.task.max_length)
    scorer = _scorer(cfg.model.name, cfg.task.name, cfg.task.max_length)
    examples = task.splits(("train",))["train"]
    spec = dpft.train.calibrate(cfg, units(cfg))
    torch.manual_seed(int(cfg.seed))  # as the run's seed_everything: peft's LoRA initialisation draws from it
    if spec_changes:
        spec = dataclasses.replace(spec, **spec_changes)
    model = apply_peft(load_model(cfg.model, num_labels=task.num_labels), cfg.method.get("peft"))
    select_trainable(model, cfg.method.get("trainable", "all"))
    extra: dict[str, Any] = {"privacy": spec}
    datamodule = None
    if cfg.method.get("federated"):
        extra["sampling_seed"] = int(cfg.seed)
        datamodule = FederatedDataModule(task, scorer, batch_size=cfg.method.batch_size, eval_batch_size=1,
                                         seed=int(cfg.seed), needed=("train",), poisson=True, clients=cfg.fed.clients,
                                         partition=cfg.fed.partition, alpha=cfg.fed.alpha,
                                         partition_seed=cfg.fed.partition_seed)
        datamodule.setup()
    module = dpft.train.build_method(cfg, model, scorer, **extra)
    module.diagnostics = bool(cfg.privacy.get("diagnostics", False))
    module.model.train(module.dropout_in_training)
    if datamodule is not None:
        module.clients = datamodule.clients
    if setup:
        module.setup("fit")  # DP-ZOPO's data-free mask
    optimizer = module.configure_optimizers()
    return Built(method, cfg, spec, module, optimizer, scorer, examples, Stepper(module, optimizer, datamodule),
                 datamodule)


# --- oracles -------------------------------------------------------------------------------------------
# which scalar each zeroth-order method clips (the papers' rules): DP-ZO the loss difference ℓ⁺-ℓ⁻, DPZero and
# its descendants the normalised (ℓ⁺-ℓ⁻)/2φ; a new zeroth-order method fails the matrix until it is listed
# DPGD-0th the L2 norm of the example's gradient estimate r·z (DPZero's analysis, its "direct combination")
CLIPPED = {"dpzo": "difference", "dpzo_laplace": "difference", "dpzero": "normalized", "dpzoso": "normalized",
           "dpzopo": "normalized", "dpgd_zo": "gradient_l2"}
PHI = 2e-3  # a perturbation scale φ that is not the configs' 1e-3


def clip_bound(method: str, clip: float, phi: float, dimension: int | None = None) -> float:
    """The bound on a zeroth-order method's per-example scalar r = (ℓ⁺-ℓ⁻)/2φ; for an L2 bound on r·z with z on the
    sphere of radius √d (DPZero's directions), |r| ≤ C/√d, d the trainable coordinates."""
    if CLIPPED[method] == "gradient_l2":
        return clip / math.sqrt(dimension)
    return clip / (2 * phi) if CLIPPED[method] == "difference" else clip


def poisson_draw(seed: int, step: int, n: int, q: float) -> list[int]:
    """The published rule: member i of batch t iff U_i < q, U ~ torch.rand(n) from a generator seeded with
    derive_seed(seed, t)."""
    generator = torch.Generator().manual_seed(derive_seed(seed, step))
    return [i for i, u in enumerate(torch.rand(n, generator=generator).tolist()) if u < q]


@cache
def gaussian_epsilon(sigma: float, q: float, steps: int, delta: float, accountant: str) -> float:
    """ε of `steps` Poisson(q)-subsampled Gaussian(σ) steps at δ, by dp_accounting (PLD on the reporting grid)."""
    acc = rdp.RdpAccountant() if accountant == "rdp" else pld.PLDAccountant(value_discretization_interval=1e-4)
    acc.compose(dpa.SelfComposedDpEvent(dpa.PoissonSampledDpEvent(q, dpa.GaussianDpEvent(sigma)), steps))
    return float(acc.get_epsilon(delta))


@cache
def laplace_pld_epsilon(scale: float, q: float, steps: int, delta: float) -> float:
    acc = pld.PLDAccountant(value_discretization_interval=1e-4)
    acc.compose(dpa.SelfComposedDpEvent(dpa.PoissonSampledDpEvent(q, dpa.LaplaceDpEvent(scale)), steps))
    return float(acc.get_epsilon(delta))


def pure_laplace_epsilon(scale: float, q: float, steps: int, directions: int) -> float:
    """K Laplace(b) scalars of sensitivity 1 (b in units of the bound): ε₀ = K/b, amplified by Poisson sampling
    to ln(1 + q(e^ε₀ - 1)), composed over the steps (basic composition)."""
    return steps * math.log1p(q * math.expm1(directions / scale))


def check_epsilon(block: dict, q: float, steps: int, delta: float, directions: int) -> None:
    """A results.json privacy block's ε against dp_accounting (Gaussian: the K scalars of a step are one query
    of multiplier σ/√K) or the closed form (Laplace), with its own σ (or b), q, steps and δ."""
    if block["mechanism"] == "gaussian":
        sigma = block["noise_multiplier"] / math.sqrt(directions)
        eps = {acc: gaussian_epsilon(sigma, q, steps, delta, acc) for acc in ("pld", "rdp")}
        assert block["epsilon_pld"] == pytest.approx(eps["pld"], rel=1e-6)
        assert block["epsilon_rdp"] == pytest.approx(eps["rdp"], rel=1e-6)
        assert block["epsilon_spent"] == pytest.approx(eps[block["accountant"]], rel=1e-6)
    else:
        scale = block["noise_multiplier"]
        assert block["epsilon_spent"] == pytest.approx(pure_laplace_epsilon(scale, q, steps, directions), rel=1e-9)
        expected = laplace_pld_epsilon(scale, q, steps, block["comparison_delta"]) if directions == 1 else None
        assert block["epsilon_pld"] == (pytest.approx(expected, rel=1e-6) if expected is not None else None)
    assert block["epsilon_spent"] <= block["target_epsilon"]


def check_std(values: torch.Tensor, expected: float, what: str, kurtosis: float = 3.0) -> None:
    """The sample std of `values` within 5 standard errors of `expected` (a false alarm has p < 1e-6 per check)."""
    n = values.numel()
    std = float(values.double().std())
    assert abs(std - expected) <= std_tolerance(expected, n, kurtosis), f"{what}: std {std:.5g}, expected " \
        f"{expected:.5g} ± {std_tolerance(expected, n, kurtosis):.2g} over {n} draws"


def std_tolerance(std: float, n: int, kurtosis: float = 3.0, k: float = 5.0) -> float:
    """k standard errors of a sample std over n draws: SE ≈ σ √((κ - 1) / 4n) (κ = 3 Gaussian, 6 Laplace)."""
    return k * std * math.sqrt((kurtosis - 1) / (4 * n))


# --- private runs, shared by the claims that need the whole loop (sampling, charging, secure mode) ----------
STEPS = 3  # released steps of every matrix run: trainer.max_steps (+ DR-Encoder's stage-1 round)
# one (q, T, ε, δ) for every family (q = 8/32 examples = 2/8 clients): one calibration serves the matrix
BUDGET = ["privacy.target_epsilon=1.5", "privacy.target_delta=3e-4"]
RUN = ["validate=false", "trainer.limit_test_batches=1", "method.eval_batch_size=1"]


def run_overrides(method: str, noise: str | None = None) -> list[str]:
    """T = STEPS released steps at q = 1/4, with the matrix's budget for the method's noise (or `noise`)."""
    prior = int(_resolved(method, "prior_rounds") or 0)
    batch = 2 if family(method) == "federated" else 8
    noise = noise or mechanism(method)
    budget_ = BUDGET if noise == "gaussian" else ["privacy=pure_eps1", "method.mechanism=laplace", BUDGET[0]]
    return [f"trainer.max_steps={STEPS - prior}", f"method.batch_size={batch}", *budget_]


def seed_with_an_empty_last_batch(n: int, q: float, steps: int) -> int:
    """The first seed whose published draws for steps 0..steps-1 end with an empty batch after a non-empty one."""
    for seed in range(1_000_000):
        if not poisson_draw(seed, steps - 1, n, q) and poisson_draw(seed, 0, n, q):
            return seed
    raise AssertionError("no seed found")


@dataclass
class Session:
    """What one `run()` did, recorded from outside the method."""

    results: dict
    batches: dict[int, list[int]]  # step -> example indices (or client ids) the step trained on
    stage_one: list[list[int]]  # DR-Encoder: the clients whose statistics each stage-1 round used
    released: int  # training steps that ran (each releases a noised update)
    stage_one_releases: int  # noised stage-1 statistics drawn before training
    csprng_bytes: int  # bytes the noise source read from the OS CSPRNG
    snapshots: dict[int, Path]  # copies of the checkpoint folder after step t
    # the run's own batch sampler, asked for steps far past the run's few (a rate off by 1/n shows in a few)
    sampler_draws: list[list[int]]


@dataclass
class Runs:
    cfg: DictConfig
    seed: int
    plain: Session
    plain_again: Session
    secure: Session
    secure_again: Session  # a second secure run at the same seed
    resumed: Session  # secure, resumed from `secure`'s checkpoint after step RESUME_AT
    secret: int  # the sampling seed secure mode kept in its checkpoint
    secret_again: int
    plain_noise_states: list[dict]  # every noise source's state saved in each run's last checkpoint
    secure_noise_states: list[dict]


def noise_states(obj: Any) -> list[dict]:
    """Every noise source's saved state in a checkpoint (NoiseSource.state_dict: mechanism and secure flag)."""
    if isinstance(obj, dict):
        found = [obj] if {"mechanism", "secure"} <= set(obj) else []
        return found + [s for value in obj.values() for s in noise_states(value)]
    if isinstance(obj, list | tuple):
        return [s for value in obj for s in noise_states(value)]
    return []


RESUME_AT = 1
SAMPLER_DRAWS = 200


def _session(cfg: DictConfig, snapshot: bool = False) -> Session:
    """run(cfg), recording the batches each step trained on, the stage-1 rounds, the releases, the bytes the
    noise source read from the OS CSPRNG, and (snapshot) the checkpoint folder after every step."""
    index = {ex.uid: i for i, ex in enumerate(train_examples(cfg))}
    out = Path(cfg.paths.output_dir)
    state = {"training": False, "released": 0, "bytes": 0}
    batches: dict[int, list[int]] = {}
    stage_one: list[list[int]] = []
    round_clients: list[int] = []
    snapshots: dict[int, Path] = {}
    sampler_draws: list[list[int]] = []

    class Recorder(L.Callback):
        def on_train_start(self, trainer, pl_module):
            state["training"] = True
            sampler = trainer.train_dataloader.batch_sampler
            sampler_draws.extend(sampler.global_batch(t) for t in range(SAMPLER_DRAWS))

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            batches[trainer.global_step] = (sorted(batch["clients"]) if "clients" in batch
                                            else [index[ex.uid] for ex in batch["examples"]])

        def on_train_batch_end(self, trainer, pl_module, *args):
            state["released"] += 1
            if snapshot:  # after ResumableRun wrote the step's checkpoint (callbacks run in order)
                snapshots[trainer.global_step] = out.parent / f"{out.name}-after-{trainer.global_step}"
                shutil.copytree(out / "checkpoints", snapshots[trainer.global_step])

    build_trainer, local_update, sample = dpft.train.build_trainer, FederatedLoRA.local_update, NoiseSource.sample
    os_urandom = os.urandom

    def with_recorder(cfg, output_dir, logger, callbacks, **kwargs):
        return build_trainer(cfg, output_dir, logger, [*callbacks, Recorder()], **kwargs)

    def spy_update(self, client, round_seed):
        if not state["training"]:  # stage 1: the clients of the current round
            round_clients.append(client)
        return local_update(self, client, round_seed)

    def spy_sample(self, *args, **kwargs):
        if not state["training"]:  # stage 1: a round's noised statistics, drawn after its clients reported
            stage_one.append(sorted(round_clients))
            round_clients.clear()
        return sample(self, *args, **kwargs)

    def urandom(count: int) -> bytes:
        state["bytes"] += count
        return os_urandom(count)

    with mock.patch.object(dpft.train, "build_trainer", with_recorder), \
            mock.patch.object(FederatedLoRA, "local_update", spy_update), \
            mock.patch.object(NoiseSource, "sample", spy_sample), \
            mock.patch.object(noise_module, "os", mock.Mock(urandom=urandom)):
        results = dpft.train.run(cfg)
    return Session(results, batches, stage_one, state["released"], len(stage_one), state["bytes"], snapshots,
                   sampler_draws)


def produce_runs(method: str, root: Path) -> Runs:
    """Five runs of `method` at one seed: two plain, two secure, and the first secure run resumed from its checkpoint
    after step RESUME_AT (same secret sample, same weights: only the noise can differ). The seed is one whose
    published draws end with an empty batch (the last step, and an empty one, are then both released)."""
    root = root / method
    probe = method_cfg(method, *run_overrides(method))
    seed = seed_with_an_empty_last_batch(units(probe), sample_rate(probe), int(probe.trainer.max_steps))
    common = [*run_overrides(method), f"seed={seed}", *RUN]
    keep = ["checkpoint.every_n_steps=1", "checkpoint.keep=true"]
    plain = _session(method_cfg(method, *common, *keep, output_dir=root / "plain"))
    plain_again = _session(method_cfg(method, *common, output_dir=root / "plain-again"))
    secure_cfg = [*common, *keep, "privacy.secure_mode=true"]
    secure = _session(method_cfg(method, *secure_cfg, output_dir=root / "secure"), snapshot=True)
    secure_again = _session(method_cfg(method, *secure_cfg, output_dir=root / "secure-again"))
    shutil.copytree(secure.snapshots[RESUME_AT], root / "resumed" / "checkpoints")
    resumed = _session(method_cfg(method, *secure_cfg, output_dir=root / "resumed"))
    load = functools.partial(torch.load, map_location="cpu", weights_only=False)
    secure_checkpoint, again_checkpoint, plain_checkpoint = (
        load(root / name / "checkpoints" / "last.ckpt") for name in ("secure", "secure-again", "plain"))
    return Runs(method_cfg(method, *common), seed, plain, plain_again, secure, secure_again, resumed,
                secure_checkpoint["dpft"]["sampling_seed"], again_checkpoint["dpft"]["sampling_seed"],
                noise_states(plain_checkpoint), noise_states(secure_checkpoint))
