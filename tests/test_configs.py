"""Every option of every config group composes, and the ones that can be built here instantiate."""

from __future__ import annotations

import math

import hydra
import lightning as L
import pytest
import torch
from omegaconf import OmegaConf

from dpft.config import CONFIG_DIR
from dpft.models.loading import load_model, load_tokenizer
from tests.conftest import compose_config, requires_data


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONFIG_DIR / group).glob("*.yaml"))


def test_every_group_has_its_options():
    assert {"opt-125m", "opt-350m", "opt-1.3b", "opt-2.7b", "opt-6.7b", "opt-13b", "opt-30b", "opt-66b",
            "roberta-base", "roberta-large", "minilm-l6", "opt-tiny", "roberta-tiny"} <= set(options("model"))
    assert {"zero_shot", "ft", "mezo"} <= set(options("method"))
    assert {"cpu", "gpu"} <= set(options("trainer"))
    assert {"wandb", "csv", "none"} <= set(options("logger"))
    assert {"sst2", "rte", "cb", "boolq", "wsc", "wic", "multirc", "copa", "record", "squad", "drop"} <= set(
        options("task"))
    for name in ("sst2", "sst5", "snli", "mnli", "rte", "trec"):
        assert {f"{name}-k16", f"{name}-k512"} <= set(options("task"))


@pytest.mark.parametrize("group", ["model", "task", "method", "privacy", "trainer", "logger", "experiment"])
def test_every_option_composes_and_resolves(group, tmp_path):
    for option in options(group):
        cfg = compose_config([f"{group}={option}"], tmp_path, shrink=False)
        container = OmegaConf.to_container(cfg, resolve=True)  # every interpolation resolves
        if group in ("model", "task", "method"):
            assert container[group]["name"] == option


# Parameter counts of the real architectures (random init on the meta device: no weights needed).
PARAMS = {"opt-125m": 125.2e6, "opt-350m": 331.2e6, "opt-1.3b": 1.316e9, "opt-2.7b": 2.652e9,
          "opt-6.7b": 6.658e9, "opt-13b": 12.85e9, "opt-30b": 29.97e9, "opt-66b": 65.7e9,
          "roberta-base": 124.6e6, "roberta-large": 355.3e6}
# today's families: the published counts exactly (their model cards / safetensors index)
EXACT_PARAMS = {"llama-3.2-1b": 1_235_814_400, "qwen2.5-0.5b": 494_032_768, "qwen2.5-1.5b": 1_543_714_304,
                "mistral-7b": 7_241_732_096, "llama-125m": 123_562_752, "phi-2": 2_779_683_840}


@pytest.mark.parametrize("name", sorted(PARAMS))
def test_real_model_shapes_instantiate(name, tmp_path):
    cfg = compose_config([f"model={name}", "model.pretrained=null", "model.dtype=float32"], tmp_path)
    with torch.device("meta"):
        model = load_model(cfg.model)
    n = sum(p.numel() for p in model.parameters())
    assert math.isclose(n, PARAMS[name], rel_tol=0.01), n


@pytest.mark.parametrize("name", sorted(EXACT_PARAMS))
def test_todays_families_instantiate_with_their_published_parameter_counts(name, tmp_path):
    cfg = compose_config([f"model={name}", "model.pretrained=null", "model.dtype=float32"], tmp_path)
    with torch.device("meta"):
        model = load_model(cfg.model)
    assert sum(p.numel() for p in model.parameters()) == EXACT_PARAMS[name]


@requires_data
@pytest.mark.parametrize("name", ["opt-tiny", "roberta-tiny", "minilm-l6", "llama-tiny", "qwen2-tiny", "gpt-neox-tiny",
                                  "gemma-tiny", "phi-tiny"])
def test_offline_models_instantiate_with_tokenizer(name, tmp_path):
    cfg = compose_config([f"model={name}"], tmp_path)
    tokenizer = load_tokenizer(cfg.model)
    model = load_model(cfg.model, num_labels=2)
    ids = tokenizer("It was great.", return_tensors="pt")
    with torch.no_grad():
        out = model(input_ids=ids["input_ids"], attention_mask=ids["attention_mask"])
    assert torch.isfinite(out if torch.is_tensor(out) else out.logits).all()


@requires_data
@pytest.mark.parametrize("method", options("method"))
def test_every_method_instantiates(method, tmp_path):
    from dpft.models.peft import apply_peft, select_trainable
    from dpft.models.scoring import build_scorer
    from dpft.train import build_method, build_task_from_config, calibrate

    private = bool(compose_config([f"method={method}"], tmp_path).method.get("private"))
    privacy = "pure_eps4" if method.endswith("laplace") else "eps8" if private else "none"
    cfg = compose_config(["model=opt-tiny", "task=sst2", f"method={method}", f"privacy={privacy}"], tmp_path)
    task = build_task_from_config(cfg.task)
    scorer = build_scorer(cfg.model.kind, task, load_tokenizer(cfg.model), max_length=64)
    model = select_trainable(apply_peft(load_model(cfg.model), cfg.method.peft), cfg.method.get("trainable", "all"))
    extra = {"privacy": calibrate(cfg, dataset_size=1000)} if private else {}
    module = build_method(cfg, model, scorer, **extra)
    assert isinstance(module, L.LightningModule) and module.name.startswith(method.split("_")[0])


@pytest.mark.parametrize("logger", ["wandb", "csv"])
def test_loggers_instantiate(logger, tmp_path):
    cfg = compose_config([f"logger={logger}"], tmp_path)
    assert hydra.utils.instantiate(cfg.logger) is not None
    assert not compose_config(["logger=none"], tmp_path).logger


def test_cpu_trainer_instantiates(tmp_path):
    cfg = compose_config(["trainer=cpu"], tmp_path)
    trainer = L.Trainer(**OmegaConf.to_container(cfg.trainer, resolve=True), logger=False)
    assert trainer.max_steps == 3


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_gpu_trainer_instantiates(tmp_path):
    cfg = compose_config(["trainer=gpu"], tmp_path)
    L.Trainer(**OmegaConf.to_container(cfg.trainer, resolve=True), logger=False)


def test_unknown_option_lists_the_valid_ones(tmp_path):
    from hydra.errors import MissingConfigException

    with pytest.raises(MissingConfigException) as err:
        compose_config(["model=gpt-5"], tmp_path)
    assert "opt-tiny" in str(err.value) and "Available options" in str(err.value)
