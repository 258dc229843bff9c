"""Parameter-efficient variants (LoRA, prefix tuning) through `peft`."""

from __future__ import annotations

import warnings
from typing import Any

from torch import nn

PEFT_MODES = ("none", "lora", "prefix")
# LoRA target presets (`method.peft.target_modules`), found by the leaf names each architecture gives its linear
# layers, not by one family's: OPT/Llama/Qwen2/Mistral/Gemma/Phi `q_proj k_proj v_proj o_proj|out_proj|dense`,
# GPT-NeoX `query_key_value dense`, RoBERTa/BERT `query key value` + `attention.output.dense`; the MLP's
# `gate_proj up_proj down_proj`, `fc1 fc2`, `dense_h_to_4h dense_4h_to_h`, `intermediate.dense output.dense`.
# null keeps peft's default for the architecture (q and v projections; GPT-NeoX its fused QKV, Phi also fc1 fc2).
ATTENTION = {"q_proj", "k_proj", "v_proj", "o_proj", "out_proj", "query_key_value", "query", "key", "value"}
ATTENTION_OUTPUT = ("attention.dense", "self_attn.dense", "attention.output.dense")
MLP = {"gate_proj", "up_proj", "down_proj", "fc1", "fc2", "dense_h_to_4h", "dense_4h_to_h"}
MLP_DENSE = ("intermediate.dense", "output.dense")
LORA_PRESETS = ("attention", "attention_mlp")


def lora_targets(model: nn.Module, preset: str) -> list[str]:
    """The names of `model`'s linear layers a preset covers: `attention` (query, key, value and output
    projections) or `attention_mlp` (and the MLP's matrices)."""
    if preset not in LORA_PRESETS:
        raise ValueError(f"method.peft.target_modules={preset!r} is not one of {LORA_PRESETS} or a list of names")
    names = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear):
            continue
        leaf = name.rsplit(".", 1)[-1]
        attention = leaf in ATTENTION or name.endswith(ATTENTION_OUTPUT)
        mlp = leaf in MLP or (name.endswith(MLP_DENSE) and not name.endswith("attention.output.dense"))
        if attention or (preset == "attention_mlp" and mlp):
            names.append(name)
    if not names:
        raise ValueError(f"method.peft.target_modules={preset}: no attention projection found in "
                         f"{type(model).__name__}; list the modules by name")
    return names


def apply_peft(model: nn.Module, cfg: Any) -> nn.Module:
    """Wrap `model` per `cfg.mode`; a classifier keeps its head fully trainable."""
    mode = cfg.get("mode", "none") if cfg else "none"
    if mode not in PEFT_MODES:
        raise ValueError(f"method.peft.mode={mode!r} is not one of {PEFT_MODES}")
    if mode == "none":
        return model
    import peft

    if mode == "lora":
        targets = cfg.get("target_modules")
        if isinstance(targets, str):
            targets = lora_targets(getattr(model, "encoder", model), targets)
        peft_config = peft.LoraConfig(
            r=int(cfg.r),
            lora_alpha=int(cfg.alpha),
            lora_dropout=float(cfg.get("dropout", 0.0)),
            target_modules=list(targets) if targets else None,
        )
    else:
        peft_config = peft.PrefixTuningConfig(num_virtual_tokens=int(cfg.num_virtual_tokens),
                                              task_type=_prefix_task_type(model))
    if hasattr(model, "head") and hasattr(model, "encoder"):  # MeanPoolClassifier
        if mode == "prefix":
            raise ValueError("method.peft.mode=prefix is not supported for model.kind=classifier; use lora")
        model.encoder = _peft_model(model.encoder, peft_config)
        return model
    return _peft_model(model, peft_config)


def _peft_model(model: nn.Module, peft_config: Any) -> nn.Module:
    import peft

    with warnings.catch_warnings():  # peft reads a property transformers has renamed: nothing a user can change
        warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
        return peft.get_peft_model(model, peft_config)


def _prefix_task_type(model: nn.Module) -> str:
    return "CAUSAL_LM" if model.__class__.__name__.endswith("ForCausalLM") else "FEATURE_EXTRACTION"


TRAINABLE_MODES = ("all", "no_embeddings", "head")


def select_trainable(model: nn.Module, mode: str) -> nn.Module:
    """Which weights train (applied after peft, which has already frozen all but its adapters).

    all: everything peft left trainable; no_embeddings: also freeze embedding tables (and the LM
    head tied to them), the usual choice for DP full fine-tuning; head: only the classification head
    (classifier) or the last transformer block (language models).
    """
    if mode not in TRAINABLE_MODES:
        raise ValueError(f"method.trainable={mode!r} is not one of {TRAINABLE_MODES}")
    if mode == "no_embeddings":
        for module in model.modules():
            if isinstance(module, nn.Embedding):
                module.weight.requires_grad_(False)  # a tied LM head shares this Parameter
    elif mode == "head":
        head = getattr(model, "head", None) if hasattr(model, "encoder") else _last_block(model)
        model.requires_grad_(False)
        head.requires_grad_(True)
    return model


def _last_block(model: nn.Module) -> nn.Module:
    blocks = [m for name, m in model.named_modules()
              if isinstance(m, nn.ModuleList) and name.split(".")[-1] in ("layers", "layer") and len(m)]
    if not blocks:
        raise ValueError(f"method.trainable=head: no transformer block list found in {type(model).__name__}")
    return blocks[-1][-1]
