"""Shared LightningModule: evaluation, logging and cost accounting. Methods override the training step."""

from __future__ import annotations

import math
import time
from typing import Any

import lightning as L
import torch
from torch import nn

from dpft.data.metrics import squad_em, squad_f1
from dpft.data.tasks import Task
from dpft.distributed import all_reduce_sum, union
from dpft.models.scoring import Scorer
from dpft.privacy.ledger import PrivacyLedger


class NonFiniteLossError(FloatingPointError):
    pass


class MethodModule(L.LightningModule):
    """Holds the model, the task and its scorer. Subclasses implement `training_step` (manual optimisation).

    Metrics are percentages (accuracy, or SQuAD F1/EM), as the papers report them. A method with
    `method.steps=0` is evaluated only. `forward_passes` counts training forwards
    (one per batch forward, whatever its size) so ZO and first-order costs compare.
    """

    name = "base"
    dropout_in_training = True  # zeroth-order methods turn it off: they estimate a deterministic loss
    # noise mechanisms whose sensitivity analysis this method implements (validation refuses the others)
    noise_mechanisms: tuple[str, ...] = ()
    ledger: PrivacyLedger | None = None  # private methods: the run's privacy ledger
    diagnostics = False  # privacy.diagnostics: a private run also releases raw training statistics

    def __init__(self, model: nn.Module, scorer: Scorer, lr: float = 0.0, weight_decay: float = 0.0):
        super().__init__()
        self.automatic_optimization = False
        self.model, self.scorer = model, scorer
        self.lr, self.weight_decay = lr, weight_decay
        self.forward_passes = 0
        self.train_seconds = 0.0
        self._t0: float | None = None
        self._eval: dict[str, list[float]] = {}
        self.final_metrics: dict[str, float] = {}
        self.raw_logged: set[str] = set()

    @classmethod
    def check_mechanism(cls, mechanism: str) -> None:
        if mechanism not in cls.noise_mechanisms:
            raise ValueError(f"{cls.__name__} has no sensitivity analysis for {mechanism} noise "
                             f"(it implements {cls.noise_mechanisms or 'none'})")

    @property
    def task(self) -> Task:
        return self.scorer.task

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad]

    def param_groups(self) -> list[dict[str, Any]]:
        """Weight decay on matrices only (no decay for biases and norms), without matching names."""
        params = self.trainable_parameters()
        groups = [{"params": [p for p in params if p.ndim >= 2], "weight_decay": self.weight_decay},
                  {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]
        return [g for g in groups if g["params"]]

    # --- what a run releases ------------------------------------------------------------------------
    @property
    def releases_raw(self) -> bool:
        """Whether raw statistics of the training data may be logged and written: in non-private runs, and in
        private ones only with privacy.diagnostics=true (ε does not cover them)."""
        return self.ledger is None or self.diagnostics

    def log_raw(self, name: str, value: Any, **kwargs: Any) -> None:
        """Log a raw statistic of the training data (a loss, a norm, a sampled count): see `releases_raw`."""
        if not self.releases_raw:
            return
        if self.ledger is not None:
            self.raw_logged.add(name)
        self.log(name, value, **kwargs)

    def raw_statistics(self) -> dict[str, Any]:
        """Raw end-of-run statistics (e.g. counts of dropped examples) that ε does not cover."""
        return {}

    def per_example_losses(self, batch: dict[str, Any]) -> torch.Tensor:
        self.forward_passes += 1
        return self.scorer.losses(self.model, batch)

    @staticmethod
    def check_finite(loss: torch.Tensor, step: int) -> None:
        if not torch.isfinite(loss).all():
            raise NonFiniteLossError(
                f"non-finite training loss at step {step} ({loss.detach().flatten()[:4].tolist()}); "
                "lower method.lr, or use model.dtype=float32 if training in half precision")

    def on_fit_start(self) -> None:
        # from_pretrained leaves models in eval mode and Lightning keeps module modes as they are
        self.model.train(self.dropout_in_training)

    def on_validation_end(self) -> None:
        self.model.train(self.dropout_in_training and self.trainer.training)

    # --- timing of training steps ------------------------------------------------------------
    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        self._t0 = time.perf_counter()

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        self._stop_clock()  # the step's timing ends before the accounting below
        ledger = getattr(self, "ledger", None)  # private methods: ε spent at ~50 points of the run and at its end
        if ledger is not None:
            done, every = ledger.steps, max(1, ledger.spec.steps // 50)
            if done % every == 0 or done == ledger.spec.steps:
                self.log("privacy/epsilon_spent", ledger.epsilon_spent(), prog_bar=True, batch_size=1)

    def _stop_clock(self) -> None:
        if self._t0 is not None:
            self.train_seconds += time.perf_counter() - self._t0
            self._t0 = None

    def on_train_end(self) -> None:
        """A run whose weights diverged fails (its cell is recorded as failed), even where private steps bounded
        every non-finite loss on the way."""
        bad = [name for name, p in self.model.named_parameters() if p.requires_grad and not torch.isfinite(p).all()]
        if bad:
            raise NonFiniteLossError(f"training diverged: {len(bad)} trainable tensor(s) hold NaN or inf at step "
                                     f"{self.steps_done} (e.g. {bad[0]}); lower method.lr")

    @property
    def steps_done(self) -> int:
        """Optimisation steps taken, over the whole run (a resumed run included)."""
        return self.trainer.global_step if self._trainer is not None else 0

    # --- checkpoints: a resumed run's counters cover the whole run --------------------------------
    COUNTERS = ("forward_passes", "train_seconds")

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # written at the end of a step, before this module's own end-of-step hook: count the step now
        self._stop_clock()
        checkpoint["method_counters"] = {k: getattr(self, k) for k in self.COUNTERS}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        for key, value in checkpoint["method_counters"].items():
            setattr(self, key, value)

    # --- evaluation -------------------------------------------------------------------------
    def _eval_step(self, batch: dict[str, Any]) -> None:
        losses, predictions = self.scorer.predict(self.model, batch)
        acc = self._eval
        if losses is not None:
            acc.setdefault("loss", []).extend(losses.float().tolist())
        for ex, pred in zip(batch["examples"], predictions):
            if self.task.kind == "generation":
                acc.setdefault("f1", []).append(100.0 * squad_f1(pred, list(ex.answers)))
                acc.setdefault("em", []).append(100.0 * squad_em(pred, list(ex.answers)))
            else:
                gold = pred == ex.label or (bool(ex.answers) and ex.candidates[pred] in ex.answers)
                acc.setdefault("acc", []).append(100.0 * gold)

    def _eval_end(self, stage: str) -> None:
        for key in union(set(self._eval)):  # every process reduces the same keys in the same order
            values = self._eval.get(key, [])
            total = all_reduce_sum(torch.tensor([math.fsum(values), len(values)], dtype=torch.float64,
                                                device=self.device))
            value = float(total[0] / total[1]) if total[1] else math.nan
            self.log(f"{stage}/{key}", value, prog_bar=key != "loss", batch_size=int(total[1]))
            self.final_metrics[f"{stage}/{key}"] = value
        self._eval = {}

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._eval_step(batch)

    def on_validation_epoch_end(self) -> None:
        self._eval_end("val")

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._eval_step(batch)

    def on_test_epoch_end(self) -> None:
        self._eval_end("test")

    # --- results ------------------------------------------------------------------------------
    def privacy_block(self) -> dict[str, Any]:
        """Non-private methods; private methods override with their accountant's statement."""
        return {"target_epsilon": math.inf, "target_delta": 0.0, "epsilon_spent": 0.0, "noise_multiplier": 0.0,
                "sample_rate": None, "expected_batch_size": None, "steps": self.steps_done, "clip": None,
                "mechanism": "none", "accountant": None, "adjacency": None, "sampling": "shuffled fixed-size batches"}

    def hyperparameters(self) -> dict[str, Any]:
        return {"lr": self.lr, "weight_decay": self.weight_decay}

    def extra_results(self) -> dict[str, Any]:
        """Blocks of results.json that only some methods have (e.g. federated `communication`)."""
        return {}


class ZeroShot(MethodModule):
    """Evaluation of the pretrained model with the task's prompt; no training."""

    name = "zero_shot"

    def configure_optimizers(self):
        return None

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        raise RuntimeError("zero_shot does not train")
