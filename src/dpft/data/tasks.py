"""Tasks: loading real files (local mirror or Hub), the papers' split protocols, and prompt templates.

A task turns raw rows into `Example`s and knows how to render them for each kind of model:

- causal LM (OPT, MeZO templates): ``causal_prompt(ex)`` + one of ``causal_continuations(ex)``
  (``causal_parts(ex)``: MeZO's encode, separator and options, with the example's text marked);
- masked LM (RoBERTa, LM-BFF templates): ``masked_prompt(ex)`` -> (left, right) around ``<mask>``,
  scored on ``label_words`` (first sub-token of " " + word);
- classification head (MiniLM): ``text_pair(ex)`` -> (text_a, text_b or None).

Two task families register themselves in ``TASKS`` when this module is imported:
``dpft.data.mezo`` (MeZO/OPT protocol: sst2, rte, cb, boolq, wsc, wic, multirc, copa, record, squad,
drop) and ``dpft.data.kshot`` (LM-BFF k-shot splits: sst2-k16 ... qqp-k512). Use ``build_task(name)``.

``task.protocol`` (``dpft``, the default, or ``paper``) picks whose inputs a run feeds the model: ``paper``
gives the token ids of the papers' reference code (docs/protocols.md).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

# the families register their tasks in TASKS when imported
from dpft.data import kshot, mezo  # noqa: F401
from dpft.data.task_base import (  # noqa: F401  (re-exported: the names users import from here)
    DATA_ENV,
    PROTOCOLS,
    TASKS,
    Example,
    ExampleBatch,
    MissingDataError,
    Split,
    Task,
    data_dir,
)


def build_task(name: str, data_seed: int | None = None, protocol: str = "dpft", **options: Any) -> Task:
    """The registered task ``name``; ``data_seed=None`` keeps the family default (MeZO 0, k-shot 42)."""
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; valid tasks: {', '.join(sorted(TASKS))}")
    cls = TASKS[name]
    seed = {} if data_seed is None else {"data_seed": int(data_seed)}
    return cls(options=options, protocol=protocol, **seed)


# task-config keys a run reads itself; the others (num_train, ...) are options of the task's protocol
TASK_RUN_KEYS = ("name", "data_seed", "max_length", "max_new_tokens", "protocol")


def build_task_from_config(task_cfg: Mapping[str, Any]) -> Task:
    """The task of a run's `task` config (a DictConfig, or the dict stored in its results.json; one written before
    `task.protocol` existed ran the dpft protocol)."""
    options = {k: v for k, v in task_cfg.items() if k not in TASK_RUN_KEYS}
    return build_task(task_cfg["name"], task_cfg.get("data_seed"), task_cfg.get("protocol") or "dpft", **options)
