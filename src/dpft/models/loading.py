"""Build models and tokenizers: `from_pretrained` (Hub id or local folder) or a tiny random config."""

from __future__ import annotations

import importlib
import logging
import os
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf
from torch import nn
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForMaskedLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from dpft.data.tasks import data_dir
from dpft.models.precision import DTYPES

log = logging.getLogger(__name__)

MODEL_KINDS = ("causal_lm", "masked_lm", "classifier")
_AUTO_CLASSES = {"causal_lm": AutoModelForCausalLM, "masked_lm": AutoModelForMaskedLM, "classifier": AutoModel}
# Heads a checkpoint must carry for each kind; a missing head would be silently re-initialised.
_HEAD_PREFIXES = {"masked_lm": ("lm_head", "cls.predictions"), "causal_lm": ("lm_head",)}


def resolve_source(source: str | None) -> str | None:
    """`pkg:<module>` names a pip package that ships a model folder as `<module>.MODEL_DIR`."""
    if source and source.startswith("pkg:"):
        module = source[4:]
        try:
            return str(importlib.import_module(module).MODEL_DIR)
        except ImportError as err:
            raise ImportError(
                f"model source {source!r} needs the pip package {module.replace('_', '-')!r}: "
                f"pip install {module.replace('_', '-')}"
            ) from err
    return source


def mirrored_tokenizer(cfg: Any) -> Path | None:
    """The local mirror's copy of a model's tokenizer (`tokenizer_mirror` under $DPFT_DATA_DIR), if present."""
    mirror = data_dir()
    path = mirror / cfg.tokenizer_mirror if cfg.get("tokenizer_mirror") and mirror is not None else None
    return path if path is not None and path.is_dir() else None


def load_tokenizer(cfg: Any) -> PreTrainedTokenizerBase:
    """The local mirror's copy (`mirrored_tokenizer`) if present, else `tokenizer` or the model source itself."""
    mirrored = mirrored_tokenizer(cfg)
    source = str(mirrored) if mirrored else resolve_source(cfg.get("tokenizer") or cfg.get("pretrained"))
    if source is None:
        raise ValueError(f"model {cfg.name}: set model.tokenizer (or model.pretrained)")
    tokenizer = AutoTokenizer.from_pretrained(source)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


class MeanPoolClassifier(nn.Module):
    """Encoder + mean pooling over real tokens + linear head.

    Sentence-transformer checkpoints (all-MiniLM-L6-v2) are trained for mean pooling; a
    `*ForSequenceClassification` head would sit on an untrained pooler instead.

    When no encoder weight trains (`method.trainable=head`), the encoder is a fixed feature extractor: it
    stays in eval mode (dropout in frozen weights would only add noise to the features) and, with
    `cache_features`, each text's pooled features are computed once, alone (so they do not depend on the
    batch it came in), and reused by every later forward pass. A head-only step then costs the head's
    arithmetic, not two encoder passes. Any change or move of an encoder weight empties the cache.
    """

    def __init__(self, encoder: PreTrainedModel, num_labels: int, cache_features: bool = False):
        super().__init__()
        self.encoder = encoder
        self.config = encoder.config
        self.head = nn.Linear(encoder.config.hidden_size, num_labels)
        nn.init.normal_(self.head.weight, std=0.02)
        nn.init.zeros_(self.head.bias)
        self.cache_features = cache_features
        self._features: dict[bytes, torch.Tensor] = {}
        self._weights_version: tuple[tuple[int, int], ...] = ()

    @property
    def encoder_frozen(self) -> bool:
        return not any(p.requires_grad for p in self.encoder.parameters())

    def train(self, mode: bool = True) -> MeanPoolClassifier:
        super().train(mode)
        if self.encoder_frozen:
            self.encoder.eval()
        return self

    def _pool(self, input_ids, attention_mask, **kwargs) -> torch.Tensor:
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask, **kwargs).last_hidden_state
        if attention_mask is None:  # every token is real
            return hidden.mean(1)
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)

    def pool(self, input_ids, attention_mask, **kwargs) -> torch.Tensor:
        if (self.cache_features and attention_mask is not None and not kwargs and not self.encoder.training
                and self.encoder_frozen):
            return self._cached_pool(input_ids, attention_mask)
        return self._pool(input_ids, attention_mask, **kwargs)

    def _cached_pool(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        version = tuple((p.data_ptr(), p._version) for p in self.encoder.parameters())  # moved or changed
        if version != self._weights_version:
            self._features.clear()
            self._weights_version = version
        rows = []
        real = attention_mask.bool()
        host_ids, host_real = input_ids.cpu(), real.cpu()  # the keys, with one copy per batch (not one per row)
        # normal tensors even under inference_mode, so a cached row can also feed a training step's head
        with torch.inference_mode(False), torch.no_grad():
            for row in range(len(input_ids)):
                key = host_ids[row][host_real[row]].numpy().tobytes()
                if key not in self._features:
                    tokens = input_ids[row][real[row]]
                    self._features[key] = self._pool(tokens[None], torch.ones_like(tokens)[None])[0]
                rows.append(self._features[key])
            return torch.stack(rows)

    def forward(self, input_ids, attention_mask=None, **kwargs) -> torch.Tensor:
        return self.head(self.pool(input_ids, attention_mask, **kwargs))

    @torch.no_grad()
    def init_head_from_texts(self, tokenizer: PreTrainedTokenizerBase, texts: list[str], scale: float) -> None:
        """Row c of the head = scale · the unit embedding of label c's description, bias 0: the untrained
        classifier scores by similarity to the descriptions, as a prompt does for a language model. Uses
        public text only (no training data), so it costs no privacy."""
        batch = tokenizer(texts, padding=True, return_tensors="pt").to(self.head.weight.device)
        prototypes = self.pool(batch["input_ids"], batch["attention_mask"]).float()
        self.head.weight.copy_(scale * prototypes / prototypes.norm(dim=1, keepdim=True))
        self.head.bias.zero_()


def _check_head(model_cfg: Any, kind: str, missing: list[str]) -> None:
    heads = _HEAD_PREFIXES.get(kind, ())
    lost = [k for k in missing if k.startswith(heads)]
    if lost:
        raise ValueError(
            f"model {model_cfg.name} ({model_cfg.pretrained}) has no {kind} head (would be randomly "
            f"initialised: {lost[:3]}...). Use a checkpoint with that head or model.kind=classifier."
        )


@contextmanager
def _quiet_loading():
    """transformers' progress bar and its load report (which lists the pooler a mean-pooling classifier leaves
    out as "UNEXPECTED"): missing weights are refused by `_check_head`, other unused ones logged by us."""
    from transformers.utils import logging as hf_logging

    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


def load_model(model_cfg: Any, num_labels: int = 0, meta: bool = False) -> nn.Module:
    """Instantiate `model_cfg.kind` from `pretrained` (Hub id / local folder / pkg:) or `config` (random).

    `meta=True`: the same modules on the meta device, from the configuration alone (no weights read or
    allocated), to check the architecture before any data loads."""
    with torch.device("meta") if meta else nullcontext():
        return _load_model(model_cfg, num_labels, meta)


def _load_model(model_cfg: Any, num_labels: int, meta: bool) -> nn.Module:
    kind = model_cfg.kind
    if kind not in MODEL_KINDS:
        raise ValueError(f"model.kind={kind!r} is not one of {MODEL_KINDS}")
    dtype = DTYPES.get(str(model_cfg.get("dtype", "float32")))
    if dtype is None:
        raise ValueError(f"model.dtype={model_cfg.dtype!r} is not one of {sorted(DTYPES)}")
    auto = _AUTO_CLASSES[kind]
    source = resolve_source(model_cfg.get("pretrained"))
    if source is not None:
        kwargs: dict[str, Any] = {"dtype": dtype}
        if kind == "classifier" and AutoConfig.from_pretrained(source).model_type == "bert":
            kwargs["add_pooling_layer"] = False  # the head mean-pools; an unused pooler would only cost
        if model_cfg.get("device_map") and not meta:
            kwargs["device_map"] = model_cfg.device_map
        try:
            if meta:  # the modules alone: no weights are read
                model, info = auto.from_config(AutoConfig.from_pretrained(source), **kwargs), {}
            else:
                with _quiet_loading():
                    model, info = auto.from_pretrained(source, output_loading_info=True, **kwargs)
        except OSError as err:
            local = Path(source).exists()
            hub = ("HF_HUB_OFFLINE=1 keeps the Hub out (the Makefile sets it where a local data mirror is used)"
                   if os.environ.get("HF_HUB_OFFLINE") == "1" else f"the Hub did not give it ({err})")
            raise OSError(
                f"cannot load model {model_cfg.name} from {source!r}: "
                + ("the folder is not a saved model." if local else
                   f"not a local folder, and {hub}. Set model.pretrained=<folder> (written by save_pretrained), or "
                   "unset HF_HUB_OFFLINE on a machine with Hub access.")
            ) from err
        _check_head(model_cfg, kind, list(info.get("missing_keys", [])))
        unexpected = [k for k in info.get("unexpected_keys", []) if not (
            kwargs.get("add_pooling_layer") is False and k.startswith("pooler."))]
        if unexpected:
            log.warning("model %s: weights in %s that the model does not use: %s", model_cfg.name, source,
                        ", ".join(sorted(unexpected)[:10]) + (" ..." if len(unexpected) > 10 else ""))
        _check_not_offloaded(model_cfg, model)
    else:
        if not model_cfg.get("config"):
            raise ValueError(f"model {model_cfg.name}: set model.pretrained or model.config")
        config = model_cfg.config  # plain containers: transformers' config classes check nested fields' types
        config_kwargs = dict(OmegaConf.to_container(config, resolve=True) if OmegaConf.is_config(config) else config)
        config = AutoConfig.for_model(config_kwargs.pop("model_type"), **config_kwargs)
        with torch.random.fork_rng():  # tiny random models are identical in every run, whatever the seed
            torch.manual_seed(int(model_cfg.get("init_seed", 0)))
            model = auto.from_config(config, dtype=dtype)
        # random weights of a big shape, spread as from_pretrained does (not weights built on the meta device)
        if model_cfg.get("device_map") and not meta and next(model.parameters()).device.type != "meta":
            model = _dispatch(model, model_cfg.device_map)
    if kind == "classifier":
        if num_labels < 2:
            raise ValueError(f"model.kind=classifier needs a classification task (got {num_labels} labels)")
        model = MeanPoolClassifier(model, num_labels, bool(model_cfg.get("cache_features", False))).to(dtype)
    return model


def _dispatch(model: nn.Module, device_map: Any) -> nn.Module:
    from accelerate import dispatch_model, infer_auto_device_map
    from omegaconf import OmegaConf

    if device_map == "auto":
        placed = infer_auto_device_map(model, no_split_module_classes=model._no_split_modules)
    else:
        placed = OmegaConf.to_container(device_map) if OmegaConf.is_config(device_map) else dict(device_map)
    return dispatch_model(model, device_map=placed)


def _check_not_offloaded(model_cfg: Any, model: nn.Module) -> None:
    """accelerate offloads what the GPUs cannot hold to the CPU or disk, where the weights are meta tensors filled at
    each forward: an in-place ZO perturbation or a per-example gradient of them would be lost. Refused."""
    placed = getattr(model, "hf_device_map", None) or {}
    offloaded = sorted(name for name, device in placed.items() if device in ("cpu", "disk"))
    if offloaded and torch.cuda.is_available():
        raise ValueError(f"model.device_map={model_cfg.device_map}: {len(offloaded)} module(s) of {model_cfg.name} do "
                         f"not fit the GPUs and were offloaded to the CPU or disk (e.g. {offloaded[0]}), where the "
                         "methods cannot update them: use more GPUs or a smaller model")


HEAD_INITS = ("random", "prototypes")


def init_classifier_head(model: nn.Module, tokenizer: PreTrainedTokenizerBase, descriptions: list[str],
                         model_cfg: Any) -> None:
    """`model.head_init=prototypes` starts a classifier's head from the task's label descriptions."""
    mode = model_cfg.get("head_init", "random")
    if mode not in HEAD_INITS:
        raise ValueError(f"model.head_init={mode!r} is not one of {HEAD_INITS}")
    if mode == "prototypes":
        scale = float(model_cfg.get("head_scale", 10.0))
        if not scale > 0:
            raise ValueError(f"model.head_scale={scale} is invalid: must be > 0")
        model.init_head_from_texts(tokenizer, descriptions, scale)


def count_parameters(model: nn.Module) -> tuple[int, int]:
    params = list(model.parameters())
    return sum(p.numel() for p in params), sum(p.numel() for p in params if p.requires_grad)
