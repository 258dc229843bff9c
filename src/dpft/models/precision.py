"""Which dtype each weight is stored, updated and computed in: one place for the trainer precision and the model's
dtypes.

A trained weight is kept in `model.trainable_dtype` (float32 by default) while the frozen ones stay in `model.dtype`
(bfloat16 on the GPU configurations, for memory), and the forwards compute under `bf16-mixed` autocast. The reason
is the zeroth-order step: it perturbs the weights in place (θ ± φz) and restores them by subtraction, and its
updates (lr·g·z ~ 1e-5) are far below bfloat16's spacing at |θ| ~ 0.03 (1.2e-4). In bfloat16 the restore drifts by
~5e-2 of the weights over 200 steps and ~90 % of an update rounds away; in float32 both vanish
(`dpft-bench --only precision` measures them). A first-order method gets fp32 master weights, AdamW states and noise
the same way. The cost: 4 bytes per trained weight, 2 per frozen one (all of them trained: twice bf16 inference).

A Lightning "-true" precision casts every weight to its dtype (bf16-true, 16-true, 64-true); training in a half
dtype is refused by validation unless `model.trainable_dtype` names that dtype, as MeZO's fp16 protocol does
(`model.dtype=float16 model.trainable_dtype=float16 trainer.precision=16-true`).
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import nn

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
HALF = (torch.bfloat16, torch.float16)
# Lightning precisions that cast the whole module (and every batch) to one dtype
CASTING = {"bf16-true": torch.bfloat16, "16-true": torch.float16, "64-true": torch.float64}
AUTOCAST = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}


def unified_precision(value: Any) -> str:
    """Lightning's own spelling of a trainer precision (16 → 16-mixed, "bf16" → bf16-mixed, 32 → 32-true, …)."""
    from lightning.fabric.connector import _convert_precision_to_unified_args

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "bf16 is supported for historical reasons"
        return str(_convert_precision_to_unified_args(value))


def model_dtype(model_cfg: Any) -> torch.dtype:
    return DTYPES[str(model_cfg.get("dtype", "float32"))]


def trained_dtype(model_cfg: Any, precision: Any) -> torch.dtype:
    """The dtype the trained weights are stored and updated in under this trainer precision."""
    cast = CASTING.get(unified_precision(precision))
    return cast if cast is not None else DTYPES[str(model_cfg.get("trainable_dtype", "float32"))]


def cast_trainable(model: nn.Module, model_cfg: Any) -> nn.Module:
    """Store the weights that train in `model.trainable_dtype` (after peft and `select_trainable`)."""
    dtype = DTYPES[str(model_cfg.get("trainable_dtype", "float32"))]
    for p in model.parameters():
        if p.requires_grad and p.is_floating_point() and p.dtype != dtype:
            p.data = p.data.to(dtype)
    return model
