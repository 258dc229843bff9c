"""Which weights are tested: the last (`select=last`, default) or those of the best validation (`select=best_val`).

`best_val` is MeZO's and DPZero's protocol on OPT: evaluate every `trainer.val_check_interval` steps and test the
weights of the evaluation with the best main validation metric (accuracy, F1 for generation). The trained weights
of that step are kept in `checkpoints/best_trainable.pt` (written atomically; the frozen ones do not change) and
loaded back before the test; a resumed run keeps its best so far (the callback's state is in the checkpoint).

Privacy: the choice reads the validation split, which is treated as public: choosing among a private run's own
releases by public data is post-processing and costs no budget. It is not free when the validation examples are
private (e.g. drawn from the same pool as another run's training set); results.json says which rule ran
(`selection`), and the privacy block records `validation_treated_as_public`.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import lightning as L
import torch

SELECTIONS = ("last", "best_val")
BEST = "best_trainable.pt"


def main_validation_metric(task_kind: str) -> str:
    return "val/f1" if task_kind == "generation" else "val/acc"


class BestValidation(L.Callback):
    def __init__(self, directory: Path, metric: str):
        self.path, self.metric = Path(directory) / BEST, metric
        self.best, self.best_step, self.history = -math.inf, None, []

    @property
    def state_key(self) -> str:
        return "BestValidation"

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or trainer.state.fn != "fit":
            return
        value = trainer.callback_metrics.get(self.metric)
        if value is None:
            raise RuntimeError(f"select=best_val: the validation logged no {self.metric}")
        step, value = int(trainer.global_step), float(value)
        self.history.append([step, value])
        if value > self.best:  # the first of equal values is kept
            self.best, self.best_step = value, step
            if trainer.is_global_zero:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                trained = {n: p.detach().cpu() for n, p in pl_module.named_parameters() if p.requires_grad}
                torch.save(trained, self.path.with_suffix(".tmp"))
                os.replace(self.path.with_suffix(".tmp"), self.path)
            trainer.strategy.barrier()

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.best_step is None:
            raise RuntimeError("select=best_val: no validation ran during training (validate=true and "
                               "trainer.val_check_interval at most trainer.max_steps)")
        saved = torch.load(self.path, map_location="cpu", weights_only=True)
        with torch.no_grad():
            for name, p in pl_module.named_parameters():
                if name in saved:
                    p.copy_(saved[name].to(p.device))

    def summary(self) -> dict[str, Any]:
        return {"rule": "best_val", "metric": self.metric, "step": self.best_step, "value": self.best,
                "evaluations": self.history}

    def state_dict(self) -> dict[str, Any]:
        return {"best": self.best, "best_step": self.best_step, "history": self.history}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best, self.best_step, self.history = state["best"], state["best_step"], list(state["history"])
