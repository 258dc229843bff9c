"""Parameter-efficient variants (LoRA, prefix tuning) through `peft`."""

from __future__ import annotations

from typing import Any

from torch import nn

PEFT_MODES = ("none", "lora", "prefix")


def apply_peft(model: nn.Module, cfg: Any) -> nn.Module:
    """Wrap `model` per `cfg.mode`; a classifier keeps its head fully trainable."""
    mode = cfg.get("mode", "none") if cfg else "none"
    if mode not in PEFT_MODES:
        raise ValueError(f"method.peft.mode={mode!r} is not one of {PEFT_MODES}")
    if mode == "none":
        return model
    import peft

    if mode == "lora":
        peft_config = peft.LoraConfig(
            r=int(cfg.r),
            lora_alpha=int(cfg.alpha),
            lora_dropout=float(cfg.get("dropout", 0.0)),
            target_modules=list(cfg.target_modules) if cfg.get("target_modules") else None,
        )
    else:
        peft_config = peft.PrefixTuningConfig(num_virtual_tokens=int(cfg.num_virtual_tokens),
                                              task_type=_prefix_task_type(model))
    if hasattr(model, "head") and hasattr(model, "encoder"):  # MeanPoolClassifier
        if mode == "prefix":
            raise ValueError("method.peft.mode=prefix is not supported for model.kind=classifier; use lora")
        model.encoder = peft.get_peft_model(model.encoder, peft_config)
        return model
    return peft.get_peft_model(model, peft_config)


def _prefix_task_type(model: nn.Module) -> str:
    return "CAUSAL_LM" if model.__class__.__name__.endswith("ForCausalLM") else "FEATURE_EXTRACTION"
