"""Regression with MSE, L1 or Huber loss."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torchmetrics import MeanAbsoluteError, MeanSquaredError, MetricCollection, R2Score

from tunelab.config import LossSection
from tunelab.errors import ConfigError
from tunelab.tasks.base import Batch, MetricSet, Task, register_task

LOSSES = {
    "mse": lambda o, t, d: F.mse_loss(o, t, reduction="sum"),
    "l1": lambda o, t, d: F.l1_loss(o, t, reduction="sum"),
    "huber": lambda o, t, d: F.huber_loss(o, t, reduction="sum", delta=d),
}


@register_task("regression")
class RegressionTask(Task):
    name = "regression"
    default_monitor = "mse"

    def __init__(self, loss: LossSection | None = None, num_outputs: int = 1):
        super().__init__(loss)
        self.loss_name = self.loss_cfg.name or "mse"
        if self.loss_name not in LOSSES:
            raise ConfigError(f"`loss.name` = {self.loss_name!r}: regression losses are {', '.join(LOSSES)}")
        self.num_outputs = num_outputs

    def _shape(self, outputs: torch.Tensor, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        target = batch["labels"].float()
        if outputs.numel() != target.numel():
            raise ConfigError(
                f"the model outputs shape {tuple(outputs.shape)} but the regression targets are "
                f"{tuple(target.shape)}: one output per target value (task.num_outputs = {self.num_outputs})"
            )
        return outputs.float().reshape(target.shape), target

    def count_targets(self, batch: Batch) -> torch.Tensor:
        return torch.tensor(float(batch["labels"].numel()))

    def loss_sum(self, outputs: torch.Tensor, batch: Batch) -> torch.Tensor:
        o, t = self._shape(outputs, batch)
        return LOSSES[self.loss_name](o, t, self.loss_cfg.huber_delta)

    def metrics(self) -> MetricSet:
        collection = MetricCollection(
            {"mse": MeanSquaredError(), "mae": MeanAbsoluteError(), "r2": R2Score(self.num_outputs)}
        )
        shape = self._shape

        class _Set(MetricSet):
            def update_collection(self, outputs, batch):
                o, t = shape(outputs, batch)
                self.collection.update(o, t)

        return _Set(collection)
