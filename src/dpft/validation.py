"""Every user-facing value that can be wrong, checked before any data or model is loaded.

Each error names the config key, the value given and what is valid. What per-example gradients cannot
bound (DP-SGD, DP-LoRA, ANADP) is found on a weightless copy of the model, built on the meta device from
its configuration (`check_per_example_layers`). Checks that need the data (batch size against the
training-set size, a missing model folder) read no more than a task's protocol and the file system
(`check_sources`).
Unknown options of a config group (`method=`, `model=`, `task=`, `privacy=`) are refused by Hydra with
the list of valid ones.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import hydra
import torch
from omegaconf import DictConfig, ListConfig
from transformers import AutoConfig

from dpft.data.federated import PARTITIONS
from dpft.data.tasks import DATA_ENV, MissingDataError, Split, build_task_from_config, data_dir
from dpft.distributed import visible_gpus
from dpft.methods.dp_first_order import OPTIMIZERS
from dpft.methods.federated import AGGREGATIONS, NOISE_PLACEMENTS
from dpft.methods.zeroth_order import CLIP_TARGETS, DIRECTIONS, Z_GENERATORS
from dpft.models.loading import HEAD_INITS, MODEL_KINDS, load_model, mirrored_tokenizer, resolve_source
from dpft.models.peft import LORA_PRESETS, PEFT_MODES, TRAINABLE_MODES, apply_peft, select_trainable
from dpft.models.precision import (
    AUTOCAST,
    CASTING,
    DTYPES,
    HALF,
    model_dtype,
    trained_dtype,
    unified_precision,
)
from dpft.privacy.accounting import ACCOUNTANTS, MECHANISMS, PrivacyConfigError, check_convention
from dpft.privacy.per_example import PerExampleGradients, UnsupportedLayerError
from dpft.selection import SELECTIONS

log = logging.getLogger(__name__)

PRIVATE_METHODS = "dpzo, dpzo_laplace, dpzero, dpgd_zo, dpzoso, dpzopo, dpsgd, dpsgd_lora, anadp, dp_fedavg, dr_encoder"
# a GradScaler multiplies the loss: per-example gradients would be clipped at C / scale, and a ZO step has no
# gradients to unscale
LOSS_SCALING = ("16-mixed",)
# float16 weights without loss scaling: a first-order step's states and small updates underflow
HALF_UNSCALED = ("16-true",)

class ConfigError(ValueError):
    """A configuration value outside its valid range."""


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and not math.isnan(value)


def _int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


Check = tuple[str, Any, Callable[[Any], bool], str]


def _check(checks: list[Check]) -> None:
    for key, value, ok, valid in checks:
        if value is None or not ok(value):
            raise ConfigError(f"{key}={value} is invalid: must be {valid}")


def check_precision(cfg: DictConfig) -> None:
    """The trainer precision against the method and the model's dtypes (`dpft.models.precision`), by Lightning's own
    reading of the value, so every alias of a refused precision is refused."""
    m, value = cfg.method, cfg.trainer.get("precision", "32-true")
    try:
        precision = unified_precision(value)
    except ValueError as err:
        raise ConfigError(f"trainer.precision={value} is not a Lightning precision: {err}") from None
    first_order = str(m.get("_target_", "")).endswith("DPFirstOrder")
    if precision in LOSS_SCALING and ("eps" in m or first_order):
        why = ("a zeroth-order step has no gradients for its GradScaler" if "eps" in m else
               "it scales the loss for a GradScaler, so the per-example gradients would be clipped at method.clip / "
               "scale")
        raise ConfigError(f"trainer.precision={value} cannot run {m.name}: {why}; use bf16-mixed or 32-true")
    if first_order and precision in HALF_UNSCALED:
        raise ConfigError(f"trainer.precision={value} keeps the weights, AdamW's states and the noised gradient in "
                          f"float16 without loss scaling (eps and small updates underflow): use bf16-mixed or 32-true")
    if not trains(cfg):
        return
    if precision not in (*AUTOCAST, *CASTING, "32-true"):
        raise ConfigError(f"trainer.precision={value} ({precision}) has no analysis in dpft's training methods: use "
                          f"bf16-mixed or 32-true")
    stored, named = trained_dtype(cfg.model, value), cfg.model.get("trainable_dtype", "float32")
    if stored in HALF and DTYPES[str(named)] != stored:
        raise ConfigError(
            f"trainer.precision={value} stores the trained weights in {str(stored)[6:]}, where a zeroth-order "
            f"perturb/restore drifts and small updates round away (dpft-bench --only precision): use bf16-mixed "
            f"(trainer=gpu) with model.trainable_dtype=float32, or set model.trainable_dtype={str(stored)[6:]} to "
            f"train in it anyway (MeZO's fp16 protocol)")
    if precision not in AUTOCAST and precision not in CASTING and model_dtype(cfg.model) != stored:
        raise ConfigError(
            f"trainer.precision={value} computes without autocast, but model.dtype={cfg.model.dtype} (frozen weights) "
            f"and model.trainable_dtype={named} (trained weights) differ: use trainer.precision=bf16-mixed "
            f"(trainer=gpu), or set model.dtype={named}")


def trains(cfg: DictConfig) -> bool:
    """Whether the run updates weights (zero-shot and max_steps=0 only evaluate)."""
    return int(cfg.trainer.get("max_steps", 0)) > 0 and not str(cfg.method.get("_target_", "")).endswith("ZeroShot")


def validate_config(cfg: DictConfig) -> bool:
    """Checks the whole run's configuration; returns whether the run is private."""
    m, t = cfg.method, cfg.task
    mirror = data_dir()
    if mirror is not None and not mirror.is_dir():  # else every file falls back to the Hub, after minutes of retries
        raise ConfigError(f"{DATA_ENV}={mirror} is not a folder: set it to the local data mirror (README: Data), or "
                          f"unset it to read the Hugging Face Hub")
    checks: list[Check] = [
        ("seed", cfg.seed, lambda v: _int(v) and v >= 0, "an integer >= 0"),
        ("method.lr", m.get("lr", 0.0), lambda v: _number(v) and 0 <= v < math.inf, "a finite number >= 0"),
        ("method.weight_decay", m.get("weight_decay", 0.0), lambda v: _number(v) and 0 <= v < math.inf,
         "a finite number >= 0"),
        ("method.batch_size", m.batch_size, lambda v: _int(v) and v >= 1, "an integer >= 1"),
        ("method.eval_batch_size", m.eval_batch_size, lambda v: _int(v) and v >= 1, "an integer >= 1"),
        ("trainer.max_steps", cfg.trainer.max_steps, lambda v: _int(v) and v >= 0,
         "an integer >= 0 (0: evaluate only)"),
        ("task.max_length", t.get("max_length", 256), lambda v: _int(v) and v >= 8, "an integer >= 8 (tokens)"),
    ]
    if "max_new_tokens" in t:
        checks.append(("task.max_new_tokens", t.max_new_tokens, lambda v: _int(v) and 1 <= v < t.max_length,
                       f"an integer in [1, task.max_length={t.max_length})"))
    for key in ("num_train", "num_dev", "num_test"):
        if key in t:
            checks.append((f"task.{key}", t[key], lambda v: _int(v) and v >= 1, "an integer >= 1"))
    if "clip" in m:
        checks.append(("method.clip", m.clip, lambda v: _number(v) and 0 < v < math.inf, "a finite number > 0"))
    if "eps" in m:
        checks.append(("method.eps", m.eps, lambda v: _number(v) and 0 < v < math.inf,
                       "a finite number > 0 (the perturbation scale φ)"))
    if "directions" in m:
        checks.append(("method.directions", m.directions, lambda v: _int(v) and v >= 1, "an integer >= 1"))
    every = (cfg.get("checkpoint") or {}).get("every_n_steps")
    if every is not None:
        checks.append(("checkpoint.every_n_steps", every, lambda v: _int(v) and v >= 1,
                       "null (only on SIGTERM) or an integer >= 1"))
    checks.append(("resume", cfg.get("resume", "auto"), lambda v: v in ("auto", "never"), "auto or never"))
    checks.append(("select", cfg.get("select", "last"), lambda v: v in SELECTIONS, f"one of {SELECTIONS}"))
    if cfg.get("select", "last") == "best_val" and not (cfg.get("validate", True) and trains(cfg)):
        raise ConfigError("select=best_val chooses among the validations of a training run: it needs validate=true "
                          "and trainer.max_steps > 0 (and a method that trains)")
    if m.get("federated"):
        checks += federated_checks(cfg)
    _check(checks)
    targets = (m.get("peft") or {}).get("target_modules")  # a preset's name (a list names modules itself)
    choices = [("method.optimizer", m.get("optimizer"), sorted(OPTIMIZERS)),
               ("method.peft.mode", (m.get("peft") or {}).get("mode", "none"), PEFT_MODES),
               ("method.peft.target_modules", targets if isinstance(targets, str) else None, LORA_PRESETS),
               ("method.trainable", m.get("trainable", "all"), TRAINABLE_MODES),
               ("method.clip_target", m.get("clip_target"),
                getattr(method_class(cfg), "clip_targets", CLIP_TARGETS) if m.get("clip_target") else ()),
               ("method.z_generator", m.get("z_generator"), Z_GENERATORS),
               ("method.direction", m.get("direction"), DIRECTIONS),
               ("model.kind", cfg.model.kind, MODEL_KINDS),
               ("model.dtype", cfg.model.get("dtype", "float32"), tuple(DTYPES)),
               ("model.trainable_dtype", cfg.model.get("trainable_dtype", "float32"), tuple(DTYPES)),
               ("model.head_init", cfg.model.get("head_init", "random"), HEAD_INITS)]
    for key, value, valid in choices:
        if value is not None and value not in valid:
            raise ConfigError(f"{key}={value!r} is not one of {tuple(valid)}")
    check_precision(cfg)
    check_devices(cfg)
    if m.get("private") and getattr(method_class(cfg), "noise_on_parameters", False):
        if _several(cfg.trainer.get("devices", 1)):
            raise ConfigError(f"trainer.devices={cfg.trainer.devices} cannot run method={m.name}: each process would "
                              "add its own noise to every parameter; use one device")
        if m.get("mask_fraction"):
            raise ConfigError(f"method.mask_fraction={m.mask_fraction} cannot run method={m.name}: its noise covers "
                              "every trainable coordinate, a mask has no analysis; use method.mask_fraction=null")
    check_sources(cfg)
    if cfg.privacy.get("mechanism", "none") != "none":  # the budget's own values first, then the pairing
        validate_privacy(cfg.privacy, local=m.get("noise_placement") == "local")
    private = check_privacy_pair(cfg)
    check_per_example_layers(cfg)
    return private


def check_sources(cfg: DictConfig) -> None:
    """The model's weights and tokenizer can be found, and a training batch fits in the training set: a
    missing folder or an impossible batch fails in a second, naming the key and the fix."""
    model = cfg.model
    sources = [("model.pretrained", model.get("pretrained"))]
    if not mirrored_tokenizer(model):
        sources.append(("model.tokenizer", model.get("tokenizer") or model.get("pretrained")))
    for key, value in sources:
        if value:
            _check_source(key, value)
    try:
        task = build_task_from_config(cfg.task)  # an unknown protocol, option or data seed: its own message
    except ValueError as err:
        raise ConfigError(str(err)) from None
    family = _model_type(model) if task.protocol == "paper" else None  # a saved config is read only then
    paper_family = PAPER_FAMILIES.get(model.kind)
    if family is not None and family != paper_family:
        raise ConfigError(f"task.protocol=paper feeds the token ids of the papers' code, written for "
                          f"{paper_family or 'no'} {model.kind} models, not model={model.name} ({family}): use "
                          "task.protocol=dpft")
    try:
        task.check_files(needed_splits(cfg))
        n = task.train_size() if trains(cfg) and not cfg.method.get("federated") else math.inf
    except MissingDataError as err:
        raise ConfigError(str(err)) from None
    if cfg.method.batch_size > n:
        raise ConfigError(f"method.batch_size={cfg.method.batch_size} exceeds the {n} training examples of task "
                          f"{task.name}: set method.batch_size <= {n}, or use a task with more training examples")


# the architectures whose token ids task.protocol=paper reproduces: MeZO's OPT code, LM-BFF's RoBERTa code
PAPER_FAMILIES = {"causal_lm": "opt", "masked_lm": "roberta"}


def _model_type(model: DictConfig) -> str | None:
    """The architecture (`model_type`) a model config builds: from its `config` block, or the saved model's config
    (None where that cannot be read before loading)."""
    if not model.get("pretrained"):
        return (model.get("config") or {}).get("model_type")
    try:
        return AutoConfig.from_pretrained(resolve_source(model.pretrained)).model_type
    except (OSError, ValueError, ImportError):
        return None


def needed_splits(cfg: DictConfig) -> tuple[Split, ...]:
    """The splits a run reads: train when its method trains, val when it validates, test always."""
    needed = ("train", "val", "test") if trains(cfg) else ("val", "test")
    return needed if cfg.get("validate", True) else tuple(s for s in needed if s != "val")


def _check_source(key: str, value: str) -> None:
    """A local folder must exist; a Hub id needs the Hub, or a copy in its cache when HF_HUB_OFFLINE=1."""
    try:
        source = resolve_source(value)
    except ImportError as err:  # `pkg:` names a package that is not installed
        raise ConfigError(f"{key}={value!r}: {err}") from None
    if Path(source).expanduser().is_dir():
        return
    if source.startswith(("/", "./", "../", "~")) or source.count("/") > 1:
        raise ConfigError(f"{key}={value!r} is not a folder: point it at a model folder written by save_pretrained")
    if os.environ.get("HF_HUB_OFFLINE") == "1" and not _hub_cached(source):
        raise ConfigError(f"{key}={value!r} is not a local folder, nor in the Hugging Face cache, and HF_HUB_OFFLINE=1 "
                          f"keeps the Hub out (the Makefile sets it beside the local data mirror): set {key}=<folder "
                          f"written by save_pretrained>, or unset HF_HUB_OFFLINE on a machine with Hub access")


def _hub_cached(repo_id: str) -> bool:
    from huggingface_hub import try_to_load_from_cache

    try:
        return isinstance(try_to_load_from_cache(repo_id, "config.json"), str)
    except ValueError:  # not a valid repo id
        return False


def check_per_example_layers(cfg: DictConfig) -> None:
    """First-order private methods: refuse, by name, a trainable layer that per-example gradients cannot bound,
    on the configured model built on the meta device (no weights, no data). Training's own checks run there:
    the layer types and tied weights, then a forward pass of a dummy two-row batch, where every trainable layer
    must read one input per row (BERT's position embedding reads one [1, T] row for the whole batch)."""
    m = cfg.method
    if not str(m.get("_target_", "")).endswith("DPFirstOrder"):
        return
    trainable, peft = m.get("trainable", "all"), (m.get("peft") or {}).get("mode", "none")
    model = load_model(cfg.model, num_labels=2, meta=True)  # the head's width does not change what is supported
    model = select_trainable(apply_peft(model, m.get("peft")), trainable)
    try:
        per_example = PerExampleGradients(model, [p for p in model.parameters() if p.requires_grad])
        try:
            with torch.enable_grad(), per_example.capture(2):
                model(input_ids=torch.zeros((2, 3), dtype=torch.long, device="meta"))
        except (RuntimeError, NotImplementedError) as err:  # the first training step checks the same, by name
            log.debug("model=%s does not run on the meta device (%s): its layers' inputs are checked at the first "
                      "step", cfg.model.name, err)
        finally:
            per_example.remove()
    except UnsupportedLayerError as err:
        raise ConfigError(f"model={cfg.model.name} with method.trainable={trainable}, method.peft.mode={peft}: "
                          f"{err}") from None


def _several(devices: Any) -> bool:
    """Whether Lightning's `devices` value asks for more than one process (-1: every GPU)."""
    return (isinstance(devices, int) and devices > 1) or (str(devices).isdigit() and int(devices) > 1) or \
        (isinstance(devices, list | ListConfig) and len(devices) > 1) or devices == -1


def check_devices(cfg: DictConfig) -> None:
    """Several processes need dpft's data-parallel strategy (trainer=ddp), and a device-mapped model one process."""
    devices = cfg.trainer.get("devices", 1)
    several = _several(devices)
    strategy = cfg.trainer.get("strategy")
    ddp = isinstance(strategy, dict | DictConfig) and str(strategy.get("_target_", "")).endswith("ReplicatedDDPStrategy")
    if several and not ddp:
        raise ConfigError(f"trainer.devices={devices} needs trainer=ddp (dpft's data-parallel strategy: the samplers "
                          "shard every batch and each method all-reduces what its step needs)")
    if ddp and cfg.model.get("device_map") is not None:
        raise ConfigError(f"model.device_map={cfg.model.device_map} spreads one model over the GPUs of one process; "
                          "it cannot be combined with trainer=ddp: use trainer=gpu (or model.device_map=null)")
    m = cfg.method
    spread = cfg.model.get("device_map") is not None and visible_gpus() > 1
    if spread and (str(m.get("_target_", "")).endswith("DPFirstOrder") or m.get("mask_fraction")):
        raise ConfigError(f"model.device_map={cfg.model.device_map} spreads the model over "
                          f"{visible_gpus()} GPUs, which method={m.name} cannot run on (its per-example norms "
                          "or masks are combined on one device): use model.device_map=null (one GPU) or trainer=ddp")


def federated_checks(cfg: DictConfig) -> list[Check]:
    """The `fed` block and the federated method's own keys; the run is one process (clients are simulated)."""
    f, m = cfg.fed, cfg.method
    checks: list[Check] = [
        ("fed.clients", f.clients, lambda v: _int(v) and v >= 1, "an integer >= 1"),
        ("method.batch_size (clients per round, fed.clients_per_round)", m.batch_size,
         lambda v: _int(v) and 1 <= v <= f.clients, f"an integer in [1, fed.clients={f.clients}]"),
        ("fed.rounds", f.rounds, lambda v: _int(v) and v >= 1, "an integer >= 1"),
        ("fed.local_steps", f.local_steps, lambda v: _int(v) and v >= 1, "an integer >= 1"),
        ("fed.local_batch_size", f.local_batch_size, lambda v: _int(v) and v >= 1, "an integer >= 1"),
        ("fed.partition", f.partition, lambda v: v in PARTITIONS, f"one of {PARTITIONS}"),
        ("fed.alpha", f.alpha, lambda v: _number(v) and 0 < v < math.inf, "a finite number > 0"),
        ("method.server_lr", m.get("server_lr", 1.0), lambda v: _number(v) and 0 < v < math.inf, "a finite number > 0"),
        ("method.aggregation", m.get("aggregation"), lambda v: v in AGGREGATIONS, f"one of {AGGREGATIONS}"),
        ("trainer.devices", cfg.trainer.get("devices", 1), lambda v: v in (1, "1"),
         "1 for federated methods (the clients are simulated in one process)"),
    ]
    if cfg.model.get("device_map") is not None:
        raise ConfigError(f"model.device_map={cfg.model.device_map} is invalid: must be null for federated methods")
    if m.get("aggregation") == "encoded":
        e = m.encoder
        checks += [
            ("method.prior_rounds", m.prior_rounds, lambda v: _int(v) and v >= 1, "an integer >= 1 (stage 1)"),
            ("method.encoder.chunk", e.chunk, lambda v: _int(v) and v >= 1, "an integer >= 1"),
            ("method.encoder.compression", e.compression, lambda v: _int(v) and 1 <= v <= e.chunk,
             f"an integer in [1, method.encoder.chunk={e.chunk}]"),
            ("method.encoder.hidden", e.hidden, lambda v: _int(v) and v >= 0, "an integer >= 0 (0: linear decoder)"),
            ("method.encoder.steps", e.steps, lambda v: _int(v) and v >= 1, "an integer >= 1"),
            ("method.encoder.lr", e.lr, lambda v: _number(v) and 0 < v < math.inf, "a finite number > 0"),
            ("method.encoder.rows", e.rows, lambda v: _int(v) and v >= 1, "an integer >= 1"),
            ("method.encoder.var_floor", e.var_floor, lambda v: _number(v) and 0 < v < math.inf, "a finite number > 0"),
            ("method.noise_placement", m.get("noise_placement", "split"), lambda v: v in NOISE_PLACEMENTS,
             f"one of {NOISE_PLACEMENTS}"),
        ]
    return checks


def validate_privacy(p: DictConfig, local: bool) -> None:
    """The budget's own values; `local`: the method noises each unit's release on its own (DR-Encoder's local
    noise), which has its own analysis."""
    mechanism = p.get("mechanism")
    if mechanism not in MECHANISMS:
        raise ConfigError(f"privacy.mechanism={mechanism!r} is not one of {MECHANISMS}")
    _check([("privacy.target_epsilon", p.target_epsilon, lambda v: _number(v) and 0 < v < math.inf,
             "a finite number > 0")])
    if mechanism == "gaussian":
        _check([("privacy.target_delta", p.target_delta, lambda v: _number(v) and 0 < v < 1,
                 "in (0, 1) for the Gaussian mechanism (typically < 1/n)")])
        if p.get("accountant") not in ACCOUNTANTS:
            raise ConfigError(f"privacy.accountant={p.get('accountant')!r} is not one of {ACCOUNTANTS}")
    elif p.target_delta != 0:
        raise ConfigError(f"privacy.target_delta={p.target_delta} is invalid: pure ε-DP (Laplace) has δ = 0")
    try:
        check_convention(p.get("convention", "ours"), mechanism, p.get("accountant"), local)
    except PrivacyConfigError as err:
        raise ConfigError(str(err)) from None
    for key in ("secure_mode", "allow_large_delta", "diagnostics"):
        if not isinstance(p.get(key, False), bool):
            raise ConfigError(f"privacy.{key}={p[key]} is invalid: must be true or false")


def check_privacy_pair(cfg: DictConfig) -> bool:
    """Private methods need a private `privacy` option with their mechanism, and the reverse. Returns
    whether the run is private."""
    private, mechanism = bool(cfg.method.get("private")), cfg.privacy.get("mechanism", "none")
    if private and mechanism == "none":
        raise ConfigError(f"method={cfg.method.name} is private: choose a privacy budget, e.g. privacy=eps2 "
                          "(or privacy=pure_eps4 for Laplace methods)")
    if not private and mechanism != "none":
        raise ConfigError(f"method={cfg.method.name} is not private, but privacy={cfg.privacy.name} asks for a "
                          f"guarantee: use privacy=none, or a private method ({PRIVATE_METHODS})")
    if private and cfg.method.get("mechanism") != mechanism:
        fix = "privacy=pure_eps4" if cfg.method.mechanism == "laplace" else "privacy=eps2"
        raise ConfigError(f"method={cfg.method.name} adds {cfg.method.mechanism} noise but privacy={cfg.privacy.name} "
                          f"is a {mechanism} budget: use e.g. {fix}")
    if private:
        analysed = method_class(cfg).noise_mechanisms
        if mechanism not in analysed:
            raise ConfigError(f"method.mechanism={mechanism} has no sensitivity analysis in method={cfg.method.name} "
                              f"(it bounds each example's contribution in L2 only): use {' or '.join(analysed)} "
                              f"noise, e.g. privacy=eps2 (pure ε-DP: method=dpzo_laplace)")
    return private


def method_class(cfg: DictConfig) -> type:
    """The LightningModule class `method._target_` names (imported, not built)."""
    target = str(cfg.method.get("_target_", ""))
    try:
        return hydra.utils.get_class(target)
    except Exception as err:
        raise ConfigError(f"method._target_={target!r} is not an importable class: {err}") from None


def check_delta(privacy: DictConfig, units: int, unit: str) -> bool:
    """δ < 1/n, n the number of privacy units (examples, or clients): (ε, δ)-DP with δ ≥ 1/n allows
    releasing one unit's data whole. Refused unless `privacy.allow_large_delta=true`; returns whether δ ≥ 1/n
    was allowed (recorded in results.json)."""
    delta = privacy.get("target_delta", 0.0)
    if privacy.get("mechanism") != "gaussian" or delta < 1 / units:
        return False
    if privacy.get("allow_large_delta", False) is True:
        return True
    raise ConfigError(f"privacy.target_delta={delta:g} is not below 1/n = 1/{units} ({unit}s in the training set): "
                      f"(ε, δ)-DP then allows leaking a whole {unit}. Use privacy.target_delta < {1 / units:.3g}, "
                      "or privacy.allow_large_delta=true to run anyway (recorded in results.json)")
