"""Hydra entry point: compose -> task data, model, method module -> fit -> validate/test -> results.json.

    dpft-train model=opt-tiny task=sst2 method=mezo seed=3 trainer.max_steps=200
    python -m dpft.train --multirun method=ft,mezo seed=0,1
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import hydra
import lightning as L
import torch
from lightning.pytorch.callbacks import RichProgressBar
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf, open_dict

from dpft.checkpointing import (
    AtomicCheckpointIO,
    ResumableRun,
    check_resumable,
    checkpoint_dir,
    find_checkpoint,
    read_checkpoint,
)
from dpft.config import CONFIG_DIR
from dpft.data.datamodule import TaskDataModule
from dpft.data.federated import FederatedDataModule
from dpft.data.tasks import MissingDataError, build_task_from_config
from dpft.distributed import DeviceMapStrategy
from dpft.methods.base import MethodModule
from dpft.models.loading import count_parameters, init_classifier_head, load_model, load_tokenizer
from dpft.models.peft import apply_peft, select_trainable
from dpft.models.precision import cast_trainable
from dpft.models.scoring import build_scorer, check_compatible
from dpft.privacy.accounting import PrivacyConfigError, PrivacySpec, make_spec
from dpft.results import (
    build_failure,
    build_results,
    format_table,
    peak_memory_by_device,
    read_results,
    reset_peak_memory,
    write_results,
)
from dpft.run_log import keep_run_log, log_results, quiet_library_noise
from dpft.seeding import secret_seed
from dpft.selection import BestValidation, main_validation_metric
from dpft.validation import ConfigError, check_delta, needed_splits, validate_config
from dpft.validation import trains as training_run

log = logging.getLogger("dpft")

# method-config keys that configure the run, not the LightningModule's constructor
RUN_KEYS = ("name", "steps", "batch_size", "eval_batch_size", "peft", "private", "trainable", "mechanism",
            "federated")


def build_method(cfg: DictConfig, model: torch.nn.Module, scorer, **extra: Any) -> MethodModule:
    kwargs = {k: v for k, v in cfg.method.items() if k not in RUN_KEYS}
    if cfg.method.get("federated"):  # the federation's settings (the `fed` block) go to the method as one dict
        extra["fed"] = OmegaConf.to_container(cfg.fed, resolve=True)
    # partial first: objects passed through instantiate would be turned into configs
    factory = hydra.utils.instantiate(kwargs, _partial_=True, _convert_="all")
    module = factory(model=model, scorer=scorer, **extra)
    module.name = cfg.method.name
    return module


def calibrate(cfg: DictConfig, dataset_size: int) -> PrivacySpec:
    """The run's privacy statement: noise calibrated for (ε, δ, q = batch_size / n, T = max_steps).

    Federated methods: the unit is a client (n = fed.clients, batch_size = clients per round), and T adds
    DR-Encoder's `method.prior_rounds` (stage 1) to the rounds. δ ≥ 1/n is refused (`check_delta`)."""
    federated = bool(cfg.method.get("federated"))
    unit = "client" if federated else "example"
    large_delta = check_delta(cfg.privacy, dataset_size, unit)
    spec = make_spec(
        mechanism=cfg.privacy.mechanism, accountant=cfg.privacy.accountant,
        target_epsilon=cfg.privacy.target_epsilon, target_delta=cfg.privacy.target_delta,
        dataset_size=dataset_size, expected_batch_size=cfg.method.batch_size,
        steps=int(cfg.trainer.max_steps) + int(cfg.method.get("prior_rounds", 0)),
        clip=cfg.method.clip, directions=int(cfg.method.get("directions", 1)),
        secure_mode=bool(cfg.privacy.get("secure_mode", False)),
        adjacency=f"add/remove one {unit}", sampling="Poisson over clients" if federated else "Poisson",
        large_delta_allowed=large_delta, convention=cfg.privacy.get("convention", "ours"),
        local=cfg.method.get("noise_placement") == "local",
    )
    log.info("privacy: %s", spec)
    return spec


def sampling_seed(cfg: DictConfig, saved: dict[str, Any]) -> int:
    """The seed of the data-dependent sampling (Poisson batches, clients, local minibatches): the experiment
    seed, or in secure mode a secret from the OS entropy source, kept only in the run's checkpoint so that a
    resumed run continues its own sample and nothing released can rebuild it."""
    if not cfg.privacy.get("secure_mode", False):
        return int(cfg.seed)
    kept = saved.get("dpft", {}).get("sampling_seed")
    return int(kept) if kept is not None else secret_seed()


def build_logger(cfg: DictConfig, run_id: str | None = None):
    """The configured logger; a resumed run continues its W&B run (same id)."""
    if not cfg.get("logger"):
        return False
    if run_id is not None and str(cfg.logger.get("_target_", "")).endswith("WandbLogger"):
        return hydra.utils.instantiate(cfg.logger, id=run_id, resume="allow")
    return hydra.utils.instantiate(cfg.logger)


class StepProgressBar(RichProgressBar):
    """Lightning's bar names the epoch ("Epoch 0/-2" under max_steps); a dpft run counts steps."""

    def _get_train_description(self, current_epoch: int) -> str:
        return f"Steps (of {self.trainer.max_steps})"


def build_trainer(cfg: DictConfig, output_dir: Path, logger, callbacks: list[L.Callback],
                  validate: bool, model: torch.nn.Module | None = None) -> L.Trainer:
    kwargs = OmegaConf.to_container(cfg.trainer, resolve=True)
    if not validate:
        kwargs["limit_val_batches"] = 0
    if isinstance(kwargs.get("strategy"), dict):  # e.g. trainer=ddp: dpft.distributed.ReplicatedDDPStrategy
        kwargs["strategy"] = hydra.utils.instantiate(kwargs["strategy"])
    if getattr(model, "hf_device_map", None):  # dispatched over devices: leave the weights where they are
        kwargs["strategy"] = DeviceMapStrategy(next(model.parameters()).device)
        kwargs["devices"] = 1
    # checkpoints are written by ResumableRun (not Lightning's ModelCheckpoint), atomically
    kwargs["enable_checkpointing"] = False
    if kwargs.get("enable_progress_bar", True):
        callbacks = [*callbacks, StepProgressBar()]
    return L.Trainer(**kwargs, logger=logger, callbacks=callbacks, plugins=[AtomicCheckpointIO()],
                     default_root_dir=str(output_dir))


# a user's mistake, found before any training: a one-line message, no traceback and no results.json (the data's
# files are read before the model loads)
USER_ERRORS = (ConfigError, PrivacyConfigError, MissingDataError)


def run(cfg: DictConfig) -> dict[str, Any]:
    """Train and evaluate one configuration; returns the results block (also written to results.json).

    A run that raises writes a results.json with `status` "failed" (or "interrupted") and the error, so a
    sweep records the cell and goes on; a rerun of the sweep tries it again.
    """
    output_dir = Path(cfg.paths.output_dir)
    done = output_dir / "results.json"
    if cfg.get("skip_existing") and done.is_file() and read_results(done).get("status") == "completed":
        log.info("skipping %s: it has a completed results.json", output_dir)
        return read_results(done)
    output_dir.mkdir(parents=True, exist_ok=True)
    try:
        return _run(cfg, output_dir)
    except USER_ERRORS:
        raise  # refused before any work: no results.json that a report would list as a failed run
    except BaseException as err:
        if rank_zero_only.rank == 0:
            write_results(build_failure(cfg, err), done)
        raise


def z_generator_fallback(cfg: DictConfig) -> str | None:
    """A zeroth-order run on CPU draws z with the Philox kernel, which needs a C compiler (or a kernel built
    before). Without one, decided before anything loads: the run uses torch's generator, says so in one line
    and records it (results.json `fallbacks`; the config then names z_generator=torch, so a report does not
    pool it with Philox runs). Returns the reason, or None."""
    if cfg.method.get("z_generator") != "philox":
        return None
    if cfg.trainer.get("accelerator") != "cpu" and torch.cuda.is_available():
        return None  # on a GPU, z is drawn by torch's CUDA generator whatever the setting
    from dpft import philox

    try:
        philox.kernel()
        return None
    except philox.KernelUnavailable as err:
        reason = err.reason
    with open_dict(cfg):
        cfg.method.z_generator = "torch"
    log.warning("method.z_generator=philox needs a C compiler: using torch's generator (slower on CPU; its z "
                "differ from Philox's). Install gcc or clang to use the kernel.")
    return reason


def _run(cfg: DictConfig, output_dir: Path) -> dict[str, Any]:
    private = validate_config(cfg)
    fallback = z_generator_fallback(cfg)
    reset_peak_memory()  # this job's peak, not an earlier job's of the same multirun process
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    task = build_task_from_config(cfg.task)
    check_compatible(cfg.model.kind, task, cfg.model.name)
    tokenizer = load_tokenizer(cfg.model)
    scorer = build_scorer(cfg.model.kind, task, tokenizer, max_length=cfg.task.max_length,
                          max_new_tokens=cfg.task.get("max_new_tokens", 50))

    trains = training_run(cfg)
    needed = needed_splits(cfg)
    ckpt = find_checkpoint(cfg, output_dir) if trains else None
    saved = read_checkpoint(ckpt) if ckpt else {}
    seed = sampling_seed(cfg, saved)
    common = dict(batch_size=cfg.method.batch_size, eval_batch_size=cfg.method.eval_batch_size, seed=seed,
                  needed=needed, poisson=private)
    if cfg.method.get("federated"):
        datamodule = FederatedDataModule(task, scorer, **common, clients=cfg.fed.clients, partition=cfg.fed.partition,
                                         alpha=cfg.fed.alpha, partition_seed=cfg.fed.partition_seed)
    else:
        datamodule = TaskDataModule(task, scorer, **common)
    datamodule.setup()
    # calibrate before loading the model: an impossible budget fails in seconds
    units = cfg.fed.clients if cfg.method.get("federated") else len(datamodule.data.get("train", ()))
    spec = calibrate(cfg, units) if private else None
    if ckpt:
        check_resumable(saved, cfg, spec.as_dict() if spec else None)
        log.info("resuming from %s (step %s)", ckpt, saved.get("global_step"))

    model = load_model(cfg.model, num_labels=task.num_labels)
    if cfg.model.kind == "classifier":
        init_classifier_head(model, tokenizer, task.label_descriptions(), cfg.model)
    model = apply_peft(model, cfg.method.get("peft"))
    select_trainable(model, cfg.method.get("trainable", "all"))
    cast_trainable(model, cfg.model)
    extra = {"privacy": spec} if spec else {}
    if cfg.method.get("federated"):
        extra["sampling_seed"] = seed
    module = build_method(cfg, model, scorer, **extra)
    module.diagnostics = bool(cfg.privacy.get("diagnostics", False))

    logger = build_logger(cfg, run_id=saved.get("dpft", {}).get("wandb_run_id"))
    resumable = ResumableRun(output_dir, cfg, cfg.checkpoint.get("every_n_steps"), resumed_from=ckpt,
                             keep=cfg.checkpoint.get("keep", False),
                             sampling_seed=seed if cfg.privacy.get("secure_mode", False) else None)
    best = (BestValidation(checkpoint_dir(output_dir), main_validation_metric(task.kind))
            if cfg.get("select", "last") == "best_val" else None)
    trainer = build_trainer(cfg, output_dir, logger, [resumable, *([best] if best else [])], validate="val" in needed,
                            model=model)
    if trainer.logger is not None:
        trainer.logger.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))

    start = time.perf_counter()
    if trains:
        # our own checkpoints hold numpy RNG states and optimizer state: not weights only
        trainer.fit(module, datamodule=datamodule, ckpt_path=str(ckpt) if ckpt else None, weights_only=False)
    elif "val" in needed:
        trainer.validate(module, datamodule=datamodule, verbose=False)
    trainer.test(module, datamodule=datamodule, verbose=False)
    wall = time.perf_counter() - start

    total, trainable = count_parameters(model)
    results = build_results(
        cfg, module, wall_seconds=wall, data_sizes=datamodule.sizes(), params_total=total,
        params_trainable=trainable, peak_memory=peak_memory_by_device(),
    )
    results["selection"] = best.summary() if best else {"rule": "last"}
    if fallback:
        results["fallbacks"] = {"method.z_generator": {"asked": "philox", "used": "torch", "reason": fallback}}
    if best and private:
        results["privacy"]["validation_treated_as_public"] = True  # the choice among releases reads it
    results["resume"] = {"resumed_from": str(ckpt) if ckpt else None, "from_step": saved.get("global_step"),
                         "lost_steps_charged": resumable.lost_steps_charged}
    if trainer.is_global_zero:  # data parallel: one results.json, one W&B summary
        write_results(results, output_dir / "results.json")
        if isinstance(logger, WandbLogger):
            logger.experiment.summary.update(results["summary"])
        if not cfg.checkpoint.get("keep", False):
            shutil.rmtree(checkpoint_dir(output_dir), ignore_errors=True)
        log_results(format_table([results]))
        log_results(f"run folder: {output_dir}\nresults: {output_dir / 'results.json'}")
    return results


def main() -> float | None:
    """`dpft-train`: our help for --help/-h (Hydra's lists `local` as a choice and no method), else Hydra."""
    if {"--help", "-h"} & set(sys.argv[1:]):
        from dpft.usage import train_help

        print(train_help())
        return None
    return hydra_main()


@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="train")
def hydra_main(cfg: DictConfig) -> float | None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    quiet_library_noise()
    keep_run_log()
    failed = True
    try:
        results = run(cfg)
        failed = False
    except USER_ERRORS as err:  # a user's mistake: one line, no traceback
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        if HydraConfig.get().mode == RunMode.MULTIRUN:
            raise  # the other jobs still run; Hydra reports the failures at the end
        sys.exit(f"dpft-train: {err}")
    finally:
        _finish_wandb(exit_code=int(failed))  # each multirun job closes its own W&B run, even when it fails
    return results["summary"].get(cfg.get("optimized_metric", ""), None)


def _finish_wandb(exit_code: int = 0) -> None:
    if "wandb" in sys.modules:
        import wandb

        if wandb.run is not None:
            wandb.finish(exit_code=exit_code)


if __name__ == "__main__":
    main()
