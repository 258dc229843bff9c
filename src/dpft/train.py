"""Hydra entry point: compose -> task data, model, method module -> fit -> validate/test -> results.json.

    dpft-train model=opt-tiny task=sst2 method=mezo seed=3 trainer.max_steps=200
    python -m dpft.train --multirun method=ft,mezo seed=0,1
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any

import hydra
import lightning as L
import torch
from lightning.pytorch.loggers import WandbLogger
from omegaconf import DictConfig, OmegaConf

from dpft.config import CONFIG_DIR
from dpft.data.datamodule import TaskDataModule
from dpft.data.tasks import build_task
from dpft.methods.base import MethodModule
from dpft.methods.dp_first_order import OPTIMIZERS
from dpft.models.loading import count_parameters, init_classifier_head, load_model, load_tokenizer
from dpft.models.peft import apply_peft, select_trainable
from dpft.models.scoring import build_scorer, check_compatible
from dpft.privacy.accounting import PrivacySpec, make_spec
from dpft.results import build_results, format_table, peak_memory_bytes, write_results

log = logging.getLogger("dpft")

# method-config keys that configure the run, not the LightningModule's constructor
RUN_KEYS = ("name", "steps", "batch_size", "eval_batch_size", "peft", "private", "trainable", "mechanism")
# task-config keys read here; the others (num_train, ...) are options of the task's protocol
TASK_RUN_KEYS = ("name", "data_seed", "max_length", "max_new_tokens")


def build_task_from_config(task_cfg: DictConfig):
    options = {k: v for k, v in task_cfg.items() if k not in TASK_RUN_KEYS}
    return build_task(task_cfg.name, task_cfg.get("data_seed"), **options)


def build_method(cfg: DictConfig, model: torch.nn.Module, scorer, **extra: Any) -> MethodModule:
    kwargs = {k: v for k, v in cfg.method.items() if k not in RUN_KEYS}
    # partial first: objects passed through instantiate would be turned into configs
    factory = hydra.utils.instantiate(kwargs, _partial_=True, _convert_="all")
    module = factory(model=model, scorer=scorer, **extra)
    module.name = cfg.method.name
    return module


def validate_method(cfg: DictConfig) -> None:
    """Values that can be wrong, checked before any data or model is loaded."""
    m = cfg.method
    checks = [("method.lr", m.get("lr", 0.0), lambda v: v >= 0, ">= 0"),
              ("method.batch_size", m.batch_size, lambda v: v >= 1, ">= 1"),
              ("method.eval_batch_size", m.eval_batch_size, lambda v: v >= 1, ">= 1"),
              ("trainer.max_steps", cfg.trainer.max_steps, lambda v: v >= 0, ">= 0")]
    if "clip" in m:
        checks.append(("method.clip", m.clip, lambda v: v > 0, "> 0"))
    if "eps" in m:
        checks.append(("method.eps", m.eps, lambda v: v > 0, "> 0 (the perturbation scale φ)"))
    for key, value, ok, valid in checks:
        if value is None or not ok(value):
            raise ValueError(f"{key}={value} is invalid: must be {valid}")
    if "optimizer" in m and m.optimizer not in OPTIMIZERS:
        raise ValueError(f"method.optimizer={m.optimizer!r} is not one of {sorted(OPTIMIZERS)}")


def check_privacy_pair(cfg: DictConfig) -> bool:
    """Private methods need a private `privacy` option with their mechanism, and the reverse. Returns
    whether the run is private."""
    private, mechanism = bool(cfg.method.get("private")), cfg.privacy.get("mechanism", "none")
    if private and mechanism == "none":
        raise ValueError(f"method={cfg.method.name} is private: choose a privacy budget, e.g. privacy=eps2 "
                         "(or privacy=pure_eps4 for Laplace methods)")
    if not private and mechanism != "none":
        raise ValueError(f"method={cfg.method.name} is not private, but privacy={cfg.privacy.name} asks for a "
                         "guarantee: use privacy=none, or a private method (dpzo, dpzo_laplace, dpzero, dpzoso, dpzopo)")
    if private and cfg.method.get("mechanism") != mechanism:
        fix = "privacy=pure_eps4" if cfg.method.mechanism == "laplace" else "privacy=eps2"
        raise ValueError(f"method={cfg.method.name} adds {cfg.method.mechanism} noise but privacy={cfg.privacy.name} "
                         f"is a {mechanism} budget: use e.g. {fix}")
    return private


def calibrate(cfg: DictConfig, dataset_size: int) -> PrivacySpec:
    """The run's privacy statement: noise calibrated for (ε, δ, q = batch_size / n, T = max_steps)."""
    spec = make_spec(
        mechanism=cfg.privacy.mechanism, accountant=cfg.privacy.accountant,
        target_epsilon=cfg.privacy.target_epsilon, target_delta=cfg.privacy.target_delta,
        dataset_size=dataset_size, expected_batch_size=cfg.method.batch_size, steps=int(cfg.trainer.max_steps),
        clip=cfg.method.clip, directions=int(cfg.method.get("directions", 1)),
    )
    if spec.mechanism == "gaussian" and spec.target_delta >= 1 / dataset_size:
        log.warning("privacy.target_delta=%g is not below 1/n = %g: (ε, δ)-DP then allows leaking a whole "
                    "example; use δ < 1/n", spec.target_delta, 1 / dataset_size)
    log.info("privacy: %s", spec)
    return spec


def build_logger(cfg: DictConfig):
    return hydra.utils.instantiate(cfg.logger) if cfg.get("logger") else False


def run(cfg: DictConfig) -> dict[str, Any]:
    """Train and evaluate one configuration; returns the results block (also written to results.json)."""
    output_dir = Path(cfg.paths.output_dir)
    done = output_dir / "results.json"
    if cfg.get("skip_existing") and done.is_file() and json.loads(done.read_text()).get("status") == "completed":
        log.info("skipping %s: it has a completed results.json", output_dir)
        return json.loads(done.read_text())
    output_dir.mkdir(parents=True, exist_ok=True)
    L.seed_everything(cfg.seed, workers=True, verbose=False)

    validate_method(cfg)
    private = check_privacy_pair(cfg)
    task = build_task_from_config(cfg.task)
    check_compatible(cfg.model.kind, task, cfg.model.name)
    tokenizer = load_tokenizer(cfg.model)
    scorer = build_scorer(cfg.model.kind, task, tokenizer, max_length=cfg.task.max_length,
                          max_new_tokens=cfg.task.get("max_new_tokens", 50))

    trains = int(cfg.method.steps) > 0
    needed = ("train", "val", "test") if trains else ("val", "test")
    if not cfg.get("validate", True):
        needed = tuple(s for s in needed if s != "val")
    datamodule = TaskDataModule(task, scorer, batch_size=cfg.method.batch_size,
                                eval_batch_size=cfg.method.eval_batch_size, seed=cfg.seed, needed=needed,
                                poisson=private)
    datamodule.setup()
    # calibrate before loading the model: an impossible budget fails in seconds
    extra = {"privacy": calibrate(cfg, len(datamodule.data["train"]))} if private else {}

    model = load_model(cfg.model, num_labels=task.num_labels)
    if cfg.model.kind == "classifier":
        init_classifier_head(model, tokenizer, task.label_descriptions(), cfg.model)
    model = apply_peft(model, cfg.method.get("peft"))
    select_trainable(model, cfg.method.get("trainable", "all"))
    module = build_method(cfg, model, scorer, **extra)

    logger = build_logger(cfg)
    trainer_kwargs = OmegaConf.to_container(cfg.trainer, resolve=True)
    if "val" not in needed:
        trainer_kwargs["limit_val_batches"] = 0
    trainer = L.Trainer(**trainer_kwargs, logger=logger, default_root_dir=str(output_dir))
    if trainer.logger is not None:
        trainer.logger.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))

    start = time.perf_counter()
    if trains:
        trainer.fit(module, datamodule=datamodule)
    elif "val" in needed:
        trainer.validate(module, datamodule=datamodule, verbose=False)
    trainer.test(module, datamodule=datamodule, verbose=False)
    wall = time.perf_counter() - start

    total, trainable = count_parameters(model)
    results = build_results(
        cfg, module, wall_seconds=wall, data_sizes=datamodule.sizes(), params_total=total,
        params_trainable=trainable, peak_memory=peak_memory_bytes(),
    )
    write_results(results, output_dir / "results.json")
    if isinstance(logger, WandbLogger):
        logger.experiment.summary.update(results["summary"])
    print(format_table([results]))
    return results


@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="train")
def main(cfg: DictConfig) -> float | None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        results = run(cfg)
    finally:
        _finish_wandb()  # each multirun job closes its own W&B run, even when it fails
    return results["summary"].get(cfg.get("optimized_metric", ""), None)


def _finish_wandb() -> None:
    import sys

    if "wandb" in sys.modules:
        import wandb

        if wandb.run is not None:
            wandb.finish()


if __name__ == "__main__":
    main()
