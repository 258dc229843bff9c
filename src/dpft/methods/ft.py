"""FT: non-private first-order fine-tuning with AdamW (backprop on the mean per-example loss)."""

from __future__ import annotations

from typing import Any

import torch

from dpft.distributed import all_reduce_sum, world_size
from dpft.methods.base import MethodModule


class FineTune(MethodModule):
    name = "ft"

    def __init__(self, *args: Any, lr_schedule: str = "linear", warmup_steps: int = 0, **kwargs: Any):
        super().__init__(*args, **kwargs)
        if lr_schedule not in ("linear", "constant"):
            raise ValueError(f"method.lr_schedule={lr_schedule!r} is not one of ('linear', 'constant')")
        self.lr_schedule, self.warmup_steps = lr_schedule, warmup_steps

    def configure_optimizers(self):
        optimizer = torch.optim.AdamW(self.param_groups(), lr=self.lr)
        total = max(int(self.trainer.max_steps), 1)

        def factor(step: int) -> float:
            if step < self.warmup_steps:
                return (step + 1) / self.warmup_steps
            if self.lr_schedule == "constant":
                return 1.0
            return max(0.0, (total - step) / max(total - self.warmup_steps, 1))

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        return [optimizer], [{"scheduler": scheduler, "interval": "step"}]

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        optimizer, scheduler = self.optimizers(), self.lr_schedulers()
        loss = self.per_example_losses(batch).mean()
        self.check_finite(loss, self.global_step)
        optimizer.zero_grad(set_to_none=True)
        self.manual_backward(loss)
        if world_size() > 1:  # data parallel: the mean gradient over the global batch (equal shares)
            for p in self.trainable_parameters():
                all_reduce_sum(p.grad).div_(world_size())
        optimizer.step()
        scheduler.step()
        self.log("train/loss", loss.detach(), prog_bar=True, batch_size=len(batch["examples"]))
        return loss.detach()

    def hyperparameters(self) -> dict[str, Any]:
        return {**super().hyperparameters(), "optimizer": "adamw", "lr_schedule": self.lr_schedule,
                "warmup_steps": self.warmup_steps}
