"""`dpft-audit`: an empirical privacy audit of the private methods as implemented.

    dpft-audit method=dpzo privacy=eps1
    dpft-audit method=dpsgd privacy=eps1 broken=no_clip --out audit.json
    dpft-audit method=dpzo,dpzero,dpsgd,anadp audit.trials=2000 --out audits/

A distinguishing game over many runs of the real private step. The run is built as `dpft-train`
builds it (conf/audit.yaml: the training config with audit defaults, then the overrides): task data,
model, calibrated `PrivacySpec`, method module; a real Lightning Trainer then fits it for
trials × steps steps. Before each trial a callback restores the starting parameters, optimizer state
(the ZO step counter, so every trial perturbs along the same z), ledger and DP-optimizer state — all
but the noise stream — and a coin picks the world: the base set D or D ∪ {canary} (add/remove
adjacency). After each step it reads what the step released (the ZO projected-gradient scalars,
or the noised gradient p.grad of DP-SGD/ANADP) and projects it on the canary's clipped contribution
divided by the noise variance (the likelihood-ratio direction for Gaussian noise; for ZO this is the
released scalar times the sign of the canary's loss difference along z). `dpft.privacy.audit` turns
the scores into ε_lb at the stated confidence, which is compared with the ledger's ε.

The canary is the candidate (held-out examples with every label) that moves the release most: the
largest |ℓ⁺ − ℓ⁻| along the audited step's z (ZO; z is public, derived from the seed) or the largest
per-example gradient norm (first order). `audit.clip_ratio` sets the method's clip so that its
unclipped contribution is that many times the bound, so the canary saturates the bound (the
strongest single-example audit) and a mechanism that skips clipping is caught.

`broken=no_noise|no_clip` breaks the built mechanism (never a training option) while it still claims
the calibrated ε: the noise source draws zeros, or the clipped sum is replaced by the unclipped one
with the noise still σ·C. Model dropout is off during the audit (as in the ZO methods): it is not
part of the privacy claim and would only blur the canary's signal.
"""

from __future__ import annotations

import argparse
import copy
import itertools
import logging
import math
import os
import time
import warnings
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from hydra import compose, initialize_config_dir
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import DictConfig, OmegaConf, open_dict
from torch.utils.data import DataLoader, Sampler

from dpft.config import CONFIG_DIR
from dpft.data.datamodule import TaskDataModule
from dpft.data.sampling import PoissonBatchSampler
from dpft.data.tasks import Example
from dpft.methods.base import MethodModule
from dpft.methods.dp_first_order import DPFirstOrder
from dpft.methods.zeroth_order import PrivateEstimator, ZerothOrder
from dpft.models.loading import load_model, load_tokenizer
from dpft.models.peft import apply_peft, select_trainable
from dpft.models.precision import cast_trainable
from dpft.models.scoring import Scorer, build_scorer, check_compatible
from dpft.privacy.audit import audit_scores
from dpft.privacy.noise import NoiseSource
from dpft.results import write_results
from dpft.train import build_method, build_task_from_config, calibrate
from dpft.validation import validate_config

log = logging.getLogger("dpft")

BROKEN = ("none", "no_noise", "no_clip")
MIN_TRIALS = 20


# --- what a private step releases -----------------------------------------------------------------
class Release:
    """One method family's private step seen by the auditor: its release, the canary's effect on it,
    the state a trial restores, and how to break it."""

    def __init__(self, module: MethodModule, optimizer: torch.optim.Optimizer):
        self.module, self.optimizer = module, optimizer
        self.params = module.trainable_parameters()

    @staticmethod
    def of(module: MethodModule, optimizer: torch.optim.Optimizer) -> Release:
        if isinstance(module, ZerothOrder) and module.private:
            return ZerothOrderRelease(module, optimizer)
        if isinstance(module, DPFirstOrder):
            return GradientRelease(module, optimizer)
        raise ValueError(f"method={module.name} has no private step to audit")

    def snapshot(self) -> dict[str, Any]:
        return {"params": [p.detach().clone() for p in self.params],
                "optimizer": copy.deepcopy(self.optimizer.state_dict()),
                "ledger": self.module.ledger.state_dict()}

    def restore(self, snapshot: dict[str, Any]) -> None:
        """Back to the start of a trial; the noise stream goes on (each trial draws fresh noise)."""
        with torch.no_grad():
            for p, value in zip(self.params, snapshot["params"]):
                p.copy_(value)
        self.module.ledger.load_state_dict(snapshot["ledger"])

    def score(self, weights: list[torch.Tensor]) -> float:
        """<release, weights>: the step's release projected on the canary's weighted contribution."""
        return float(sum((r.double() * w.to(r.device)).sum() for r, w in zip(self.released(), weights)))

    def canary_weights(self, batch: dict[str, Any]) -> tuple[list[torch.Tensor], float]:
        """The canary's clipped contribution over the noise variance, per released tensor (the
        likelihood-ratio direction for Gaussian noise), and the contribution's size in units of the noise
        scale (at most 1/σ_step: all one example may move one step)."""
        contribution, std = self.canary_contribution(batch)
        scaled = [c.double() / s for c, s in zip(contribution, std)]
        return [x / s for x, s in zip(scaled, std)], math.sqrt(sum(float(x.pow(2).sum()) for x in scaled))

    def released(self) -> list[torch.Tensor]:
        raise NotImplementedError

    def contributions(self, batch: dict[str, Any]) -> torch.Tensor:
        """Each example's unclipped contribution over the clip bound, [B]."""
        raise NotImplementedError

    def canary_contribution(self, batch: dict[str, Any]) -> tuple[list[torch.Tensor], list[float]]:
        """The canary's clipped contribution to each released tensor, as the unbroken mechanism clips
        it, and the scale of the noise each one gets."""
        raise NotImplementedError

    def break_mechanism(self, broken: str) -> None:
        raise NotImplementedError

    def discard(self) -> None:
        """Undo what building this release's module left on the shared model."""


class ZerothOrderRelease(Release):
    """DP-ZO / DPZero: a step releases K scalars g_k = (Σ_i clip(r_ik) + noise_k) / B, r_ik = (ℓ⁺ − ℓ⁻)/2φ."""

    @property
    def estimator(self) -> PrivateEstimator:
        return self.optimizer.estimator

    def restore(self, snapshot: dict[str, Any]) -> None:
        super().restore(snapshot)
        state = copy.deepcopy(snapshot["optimizer"])  # the step counter: the same z in every trial
        state["estimator"] = self.estimator.state_dict()
        self.optimizer.load_state_dict(state)

    def released(self) -> list[torch.Tensor]:
        return [torch.tensor(self.optimizer.state["zo"]["projected_grads"], dtype=torch.float64)]

    @torch.no_grad()
    def _losses_along_z(self, batch: dict[str, Any]) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], float]:
        """(ℓ⁺, ℓ⁻) per direction of the coming step, by the optimizer's own perturbation; θ is put back
        exactly (θ + φz − 2φz + φz is not θ in floating point)."""
        opt, saved = self.optimizer, [p.detach().clone() for p in self.params]
        eps, step = opt.param_groups[0]["eps"], opt.state["zo"]["step"]
        pairs = []
        for k in range(opt.directions):
            seed = opt.step_seed(step, k)
            opt.perturb(seed, eps)
            plus = self.module.scorer.losses(self.module.model, batch)
            opt.perturb(seed, -2 * eps)
            minus = self.module.scorer.losses(self.module.model, batch)
            for p, value in zip(self.params, saved):
                p.copy_(value)
            pairs.append((plus, minus))
        return pairs, eps

    def contributions(self, batch: dict[str, Any]) -> torch.Tensor:
        pairs, eps = self._losses_along_z(batch)
        r = torch.stack([self.estimator.scalars(plus, minus, eps) for plus, minus in pairs])
        return r.norm(dim=0) / self.estimator.bound(eps)

    def canary_contribution(self, batch: dict[str, Any]) -> tuple[list[torch.Tensor], list[float]]:
        pairs, eps = self._losses_along_z(batch)
        est = self.estimator
        clipped = [PrivateEstimator.clipped_sum(est, plus, minus, eps) for plus, minus in pairs]
        return [torch.stack(clipped)], [est.noise_multiplier * est.bound(eps)]

    def break_mechanism(self, broken: str) -> None:
        est = self.estimator
        if broken == "no_noise":
            est.noise = NoiseSource("none", 0)
        elif broken == "no_clip":
            est.clipped_sum = lambda plus, minus, eps: torch.nan_to_num(est.scalars(plus, minus, eps), nan=0.0).sum()


class GradientRelease(Release):
    """DP-SGD / ANADP: a step releases the noised gradient p.grad = (Σ_i clip(∇ℓ_i) + noise) / B."""

    @property
    def dp(self):
        return self.module.dp

    def snapshot(self) -> dict[str, Any]:
        return {**super().snapshot(), "dp": copy.deepcopy(self.dp.state_dict())}

    def restore(self, snapshot: dict[str, Any]) -> None:
        super().restore(snapshot)
        self.optimizer.load_state_dict(copy.deepcopy(snapshot["optimizer"]))
        self.dp.load_state_dict({**copy.deepcopy(snapshot["dp"]), "noise": self.dp.noise.state_dict()})

    def released(self) -> list[torch.Tensor]:
        return [p.grad for p in self.dp.params]

    def _capture(self, batch: dict[str, Any]) -> None:
        """Per-example gradients of `batch` into the module's hooks (no .grad is touched)."""
        per_example = self.module.per_example
        with torch.enable_grad(), per_example.capture(len(batch["examples"]), batch.get("owner")):
            losses = self.module.scorer.losses(self.module.model, batch)
        per_example.backward(losses.sum())  # as training does

    def contributions(self, batch: dict[str, Any]) -> torch.Tensor:
        self._capture(batch)
        norms = torch.stack(list(self.module.per_example.norms_by_layer().values())).sum(0).sqrt()
        return norms / self.module.clip

    def canary_contribution(self, batch: dict[str, Any]) -> tuple[list[torch.Tensor], list[float]]:
        dp = self.dp
        self._capture(batch)
        type(dp).clip_and_accumulate(dp)  # the class's clipping, not a broken=no_clip patch
        contribution = [p.summed_grad for p in dp.params]
        for p in dp.params:
            del p.summed_grad
        return contribution, [dp.noise_std(p) for p in dp.params]

    def break_mechanism(self, broken: str) -> None:
        dp = self.dp
        if broken == "no_noise":
            dp.noise = NoiseSource("none", 0)
        elif broken == "no_clip":
            clip_and_accumulate = dp.clip_and_accumulate

            def unclipped() -> None:
                clip_and_accumulate()  # the real norms (logged), then the sum with every factor 1
                dp.per_example.accumulate(torch.ones_like(dp.last_norms))

            dp.clip_and_accumulate = unclipped

    def discard(self) -> None:
        self.module.per_example.remove()


# --- the game --------------------------------------------------------------------------------------
class GameSampler(Sampler[list[int]]):
    """Step s belongs to trial s // steps. Each example of D ∪ {canary} (the canary is the last index)
    joins a step's batch with probability q; in the trials of world D the canary is left out."""

    def __init__(self, base_size: int, sample_rate: float, canary_in: np.ndarray, steps: int, seed: int):
        self.poisson = PoissonBatchSampler(base_size + 1, sample_rate, seed)
        self.canary, self.canary_in, self.steps = base_size, canary_in, steps

    def __len__(self) -> int:
        return len(self.canary_in) * self.steps

    def __iter__(self):
        for step in range(len(self)):
            batch = self.poisson.batch(step)
            yield batch if self.canary_in[step // self.steps] else [i for i in batch if i != self.canary]


class GameData(TaskDataModule):
    """The training stream of the game (D is `data["train"]`, set before fitting)."""

    def __init__(self, *args: Any, canary: Example, sampler: GameSampler, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.canary, self.sampler = canary, sampler

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.data["train"] + [self.canary], batch_sampler=self.sampler,
                          collate_fn=lambda examples: self._collate(examples, train=True))


class GameCallback(L.Callback):
    """Restores the start before each trial, scores each step's release, collects one score per trial."""

    def __init__(self, canary_batch: dict[str, Any], steps: int, broken: str):
        self.canary_batch, self.steps, self.broken = canary_batch, steps, broken
        self.scores: list[float] = []

    def on_train_start(self, trainer: L.Trainer, module: MethodModule) -> None:
        self.canary_batch = trainer.datamodule.transfer_batch_to_device(self.canary_batch, module.device, 0)
        self.release = Release.of(module, trainer.optimizers[0])
        self.start = self.release.snapshot()
        self.release.break_mechanism(self.broken)
        self.first_weights: list[torch.Tensor] | None = None

    def on_train_batch_start(self, trainer: L.Trainer, module: MethodModule, batch: Any, batch_idx: int) -> None:
        if batch_idx % self.steps == 0:
            self.release.restore(self.start)
            self.score = 0.0
            if self.first_weights is None:  # every trial starts from the same θ
                self.first_weights, self.noise_units = self.release.canary_weights(self.canary_batch)
            self.weights = self.first_weights
        else:  # θ_t follows from the released steps: the weights are post-processing
            self.weights, _ = self.release.canary_weights(self.canary_batch)

    def on_train_batch_end(self, trainer: L.Trainer, module: MethodModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        self.score += self.release.score(self.weights)
        if batch_idx % self.steps == self.steps - 1:
            self.scores.append(self.score)


# --- one audit --------------------------------------------------------------------------------------
def compose_audit_config(overrides: list[str]) -> DictConfig:
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose("audit", overrides=list(overrides))
    with open_dict(cfg):
        cfg.paths.output_dir = None  # an audit writes only its --out file
    return cfg


def validate_audit(cfg: DictConfig) -> None:
    a = cfg.audit

    def count(minimum: int):
        return lambda v: isinstance(v, int) and v >= minimum

    checks = [("broken", cfg.broken, lambda v: v in BROKEN, f"one of {BROKEN}"),
              ("audit.trials", a.trials, count(MIN_TRIALS), f"an integer >= {MIN_TRIALS}"),
              ("audit.confidence", a.confidence, lambda v: v is not None and 0 < v < 1, "in (0, 1)"),
              ("audit.base_size", a.base_size, count(1), "an integer >= 1"),
              ("audit.candidates", a.candidates, count(1), "an integer >= 1"),
              ("audit.clip_ratio", a.clip_ratio, lambda v: v is None or v > 0, "null or > 0"),
              ("audit.threads", a.threads, lambda v: v is None or count(1)(v), "null or an integer >= 1"),
              ("trainer.max_steps", cfg.trainer.max_steps, count(1), "an integer >= 1 (steps per trial)"),
              ("privacy.convention", cfg.privacy.get("convention", "ours"), lambda v: v == "ours",
               "ours: the game adds or removes one canary, it tests no replace-one claim")]
    for key, value, ok, valid in checks:
        if not ok(value):
            raise ValueError(f"{key}={value} is invalid: must be {valid}")
    size = build_task_from_config(cfg.task).train_size()  # before validate_config names it method.batch_size
    if a.base_size > size:
        raise ValueError(f"audit.base_size={a.base_size} exceeds the {size} training examples of task "
                         f"{cfg.task.name}")
    if not validate_config(cfg):
        raise ValueError(f"method={cfg.method.name} is not private: nothing to audit (choose a private method, "
                         "e.g. dpzo, dpzero, dpsgd, anadp)")


def _candidates(examples: list[Example], num_labels: int) -> list[Example]:
    """Every held-out example with every label (classification), else as it is."""
    if not num_labels:
        return list(examples)
    return [replace(ex, label=label, uid=f"{ex.uid}/label={label}") for ex in examples for label in range(num_labels)]


def _build(cfg: DictConfig, model: torch.nn.Module, scorer: Scorer, base_size: int) -> tuple[MethodModule, Release]:
    module = build_method(cfg, model, scorer, privacy=calibrate(cfg, base_size))
    module.dropout_in_training = False
    module.setup("fit")  # what the optimizer depends on (DP-ZOPO's data-free mask), kept for the fit
    return module, Release.of(module, module.configure_optimizers())


def _canary(release: Release, scorer: Scorer, candidates: list[Example]) -> tuple[Example, float]:
    """The candidate whose unclipped contribution is largest (the model in eval mode, as in the trials)."""
    release.module.model.train(False)
    contributions = release.contributions(scorer.collate(candidates, train=True))
    best = int(torch.argmax(contributions))
    if not contributions[best] > 0:
        raise ValueError(f"no canary candidate moves the release of method={release.module.name} (every "
                         "contribution is 0): audit a configuration whose trainable weights affect the loss")
    return candidates[best], float(contributions[best])


@contextmanager
def torch_threads(threads: int | None):
    """torch's intra-op threads for the audit (None: unchanged), restored afterwards."""
    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def run_audit(cfg: DictConfig, family_size: int = 1) -> dict[str, Any]:
    """Audit one configuration, one of `family_size` run together; returns the record written to audit.json.

    `audit.confidence` is the family-wise confidence: each audit's bound is at 1 − (1 − confidence)/family_size
    (Bonferroni), so that a false violation anywhere in the family has probability at most 1 − confidence.
    """
    cfg = copy.deepcopy(cfg)
    validate_audit(cfg)
    if not (isinstance(family_size, int) and family_size >= 1):
        raise ValueError(f"family_size={family_size!r} is invalid: must be the number of audits run together (>= 1)")
    familywise = float(cfg.audit.confidence)
    with open_dict(cfg):
        cfg.audit.confidence = 1 - (1 - familywise) / family_size
    with torch_threads(cfg.audit.threads):
        return _play(cfg, family_size, familywise)


def _play(cfg: DictConfig, family_size: int, familywise: float) -> dict[str, Any]:
    started = time.perf_counter()
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    task = build_task_from_config(cfg.task)
    check_compatible(cfg.model.kind, task, cfg.model.name)
    scorer = build_scorer(cfg.model.kind, task, load_tokenizer(cfg.model), max_length=cfg.task.max_length,
                          max_new_tokens=cfg.task.get("max_new_tokens", 50))
    splits = task.splits(("train", "val"))
    base_size = int(cfg.audit.base_size)  # at most the training set's size (validate_audit)
    base = splits["train"][:base_size]
    candidates = _candidates(splits["val"][: cfg.audit.candidates], task.num_labels)

    model = apply_peft(load_model(cfg.model, num_labels=task.num_labels), cfg.method.get("peft"))
    select_trainable(model, cfg.method.get("trainable", "all"))
    cast_trainable(model, cfg.model)
    module, release = _build(cfg, model, scorer, base_size)
    canary, contribution = _canary(release, scorer, candidates)
    if cfg.audit.clip_ratio is not None:  # the bound scales with the clip: rebuild with the audit's clip
        release.discard()
        with open_dict(cfg):
            cfg.method.clip = float(cfg.method.clip) * contribution / cfg.audit.clip_ratio
        module, release = _build(cfg, model, scorer, base_size)
        contribution = float(release.contributions(scorer.collate([canary], train=True))[0])
    search_seconds = time.perf_counter() - started

    steps, trials = int(cfg.trainer.max_steps), int(cfg.audit.trials)
    canary_in = np.random.default_rng(cfg.audit.seed).random(trials) < 0.5
    sampler = GameSampler(base_size, module.privacy.sample_rate, canary_in, steps, cfg.seed)
    data = GameData(task, scorer, batch_size=cfg.method.batch_size, eval_batch_size=cfg.method.eval_batch_size,
                    seed=cfg.seed, needed=("train",), poisson=True, canary=canary, sampler=sampler)
    data.data = {"train": base}
    callback = GameCallback(scorer.collate([canary], train=True), steps, cfg.broken)
    trainer = L.Trainer(accelerator=cfg.trainer.accelerator, devices=cfg.trainer.devices,
                        precision=cfg.trainer.precision, deterministic=cfg.trainer.deterministic,
                        max_steps=trials * steps, max_epochs=1, limit_val_batches=0, num_sanity_val_steps=0,
                        logger=False, enable_checkpointing=False, enable_model_summary=False,
                        enable_progress_bar=cfg.trainer.enable_progress_bar, callbacks=[callback])
    game_started = time.perf_counter()
    with warnings.catch_warnings():  # the model is in eval mode on purpose (no dropout)
        warnings.filterwarnings("ignore", message=r".*module\(s\) in eval mode")
        trainer.fit(module, datamodule=data)
    game_seconds = time.perf_counter() - game_started
    if len(callback.scores) != trials:
        raise RuntimeError(f"the game ran {len(callback.scores)} of {trials} trials")

    spec = module.privacy
    claimed = module.ledger.epsilon_spent()  # after `steps` steps: what one trial's run claims
    outcome = audit_scores(callback.scores, canary_in, spec.target_delta, cfg.audit.confidence)
    scores = np.asarray(callback.scores)
    return {
        "method": cfg.method.name,
        "broken": cfg.broken,
        "claimed_epsilon": claimed,
        "delta": spec.target_delta,
        "epsilon_lower_bound": outcome.epsilon_lower_bound,
        "confidence": outcome.confidence,  # this audit's: Bonferroni's share of the family's error rate
        "family_size": family_size,
        "familywise_confidence": familywise,
        "trials": trials,
        "verdict": "violation" if outcome.epsilon_lower_bound > claimed else "consistent",
        "epsilon_ceiling": outcome.epsilon_ceiling,
        "target_epsilon": spec.target_epsilon,
        "model": cfg.model.name,
        "task": cfg.task.name,
        "seed": int(cfg.seed),
        "steps_per_trial": steps,
        "privacy": module.ledger.report(),
        "canary": {"uid": canary.uid, "fields": canary.fields, "label": canary.label,
                   "contribution_over_clip": contribution, "noise_units": callback.noise_units,
                   "max_noise_units": 1 / spec.step_noise_multiplier, "candidates": len(candidates),
                   "base_size": base_size},
        "test": outcome.as_dict(),
        "scores": _score_summary(scores, canary_in),
        "seconds": {"total": time.perf_counter() - started, "canary_search": search_seconds, "game": game_seconds,
                    "per_trial": game_seconds / trials},
        "config": OmegaConf.to_container(cfg, resolve=True),
    }


def _score_summary(scores: np.ndarray, canary_in: np.ndarray) -> dict[str, float]:
    """Per-world mean and std, and their separation (mean shift / pooled std): a diagnostic, not a bound
    (for one Gaussian step at q = 1 it estimates sensitivity/noise = 1/σ)."""
    with_canary, without = scores[canary_in], scores[~canary_in]
    pooled = math.sqrt((with_canary.var() + without.var()) / 2)
    shift = float(with_canary.mean() - without.mean())
    if pooled > 0:
        separation = shift / pooled
    else:  # no noise at all: any shift separates the worlds perfectly
        separation = math.copysign(math.inf, shift) if shift else 0.0
    return {"mean_with_canary": float(with_canary.mean()), "std_with_canary": float(with_canary.std()),
            "mean_without_canary": float(without.mean()), "std_without_canary": float(without.std()),
            "separation": separation}


# --- the command ------------------------------------------------------------------------------------
def expand_sweeps(overrides: list[str]) -> list[list[str]]:
    """Hydra's basic-sweeper syntax: `method=dpzo,dpsgd broken=none,no_noise` gives 4 override lists."""
    choices = []
    for o in OverridesParser.create().parse_overrides(list(overrides)):
        if o.is_sweep_override():
            choices.append([f"{o.get_key_element()}={v}" for v in o.sweep_string_iterator()])
        else:
            choices.append([o.input_line])
    return [list(combination) for combination in itertools.product(*choices)]


def format_audit_table(records: list[dict[str, Any]]) -> str:
    header = "| method | broken | claimed ε | δ | ε lower bound | confidence | trials | verdict | seconds |"
    lines = [header, "|" + "---|" * (header.count("|") - 1)]
    for r in records:
        lines.append(f"| {r['method']} | {r['broken']} | {r['claimed_epsilon']:.3f} | {r['delta']:g} | "
                     f"{r['epsilon_lower_bound']:.3f} | {r['confidence']:.4g} | {r['trials']} | {r['verdict']} | "
                     f"{r['seconds']['total']:.1f} |")
    if records and records[0].get("family_size", 1) > 1:
        lines.append(f"\nFamily-wise confidence {records[0]['familywise_confidence']:g} over the "
                     f"{records[0]['family_size']} audits (Bonferroni: each at {records[0]['confidence']:.4g}).")
    return "\n".join(lines)


def run_audits(jobs: list[list[str]], overrides: list[str], out: Path | None = None) -> list[dict[str, Any]]:
    """Audit each job (the expanded `overrides`) as one family (Bonferroni over the jobs); write the records to
    `out` (a .json file for a single job, else a folder) when given."""
    configs = [compose_audit_config(job) for job in jobs]
    for cfg in configs:  # every job's settings, before the first audit runs
        validate_audit(cfg)
    if len(levels := sorted({float(cfg.audit.confidence) for cfg in configs})) > 1:
        raise ValueError(f"audit.confidence={','.join(map(str, levels))}: the audits of one invocation share one "
                         "family-wise confidence; give one value (or run them separately)")
    records = []
    for job, cfg in zip(jobs, configs):
        record = {**run_audit(cfg, family_size=len(jobs)), "overrides": job}
        records.append(record)
        if out is not None:
            write_results(record, out if out.suffix == ".json" else out / f"{_job_name(job, overrides, record)}.json")
        if record["claimed_epsilon"] >= record["epsilon_ceiling"]:
            log.warning("%s: %d trials can show at most ε_lb = %.2f, not above the claim %.2f: raise audit.trials",
                        record["method"], record["trials"], record["epsilon_ceiling"], record["claimed_epsilon"])
        canary = record["canary"]
        if canary["noise_units"] < canary["max_noise_units"] / 2:
            log.warning("%s: the canary moves the release by %.3g noise scales of the %.3g the claim allows: the "
                        "audit is weak (set audit.clip_ratio, e.g. 100, or lower method.clip)", record["method"], canary["noise_units"],
                        canary["max_noise_units"])
    return records


def _job_name(job: list[str], overrides: list[str], record: dict[str, Any]) -> str:
    """The values of the swept overrides (`dpzo-no_noise`), else `<method>[-<broken>]`."""
    swept = {o.get_key_element() for o in OverridesParser.create().parse_overrides(overrides) if o.is_sweep_override()}
    if swept:
        return "-".join(o.split("=", 1)[1] for o in job if o.split("=", 1)[0] in swept)
    return record["method"] + ("" if record["broken"] == "none" else f"-{record['broken']}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="dpft-audit", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("overrides", nargs="*", help="Hydra overrides; comma lists audit every combination")
    parser.add_argument("--out", type=Path, default=None,
                        help="a .json file (one audit), or a folder that gets one <name>.json per audit")
    args = parser.parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    jobs = expand_sweeps(args.overrides)
    if len(jobs) > 1 and args.out is not None and args.out.suffix == ".json":
        parser.error(f"--out {args.out}: the overrides give {len(jobs)} audits; give a folder")
    print(format_audit_table(run_audits(jobs, args.overrides, args.out)))


if __name__ == "__main__":
    main()
