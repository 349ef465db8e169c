"""Single-label (cross-entropy) and multi-label (BCE-with-logits) classification."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torchmetrics import MetricCollection
from torchmetrics.classification import (
    MulticlassAccuracy,
    MulticlassConfusionMatrix,
    MulticlassF1Score,
    MulticlassPrecision,
    MulticlassRecall,
    MultilabelAccuracy,
    MultilabelF1Score,
)

from tunelab.config import LossSection
from tunelab.errors import ConfigError, DataError
from tunelab.tasks.base import Batch, MetricSet, Task, register_task


def _dataset_labels(dataset: Any) -> torch.Tensor | None:
    labels = getattr(dataset, "labels", None)
    if labels is None:
        return None
    return torch.as_tensor(labels)


class _IgnoringMetricSet(MetricSet):
    def __init__(self, collection: Any, ignore_index: int):
        super().__init__(collection)
        self.ignore_index = ignore_index

    def update_collection(self, outputs: torch.Tensor, batch: Batch) -> None:
        labels = batch["labels"]
        keep = labels != self.ignore_index
        self.collection.update(outputs[keep].float(), labels[keep])


@register_task("classification")
class ClassificationTask(Task):
    name = "classification"
    default_monitor = "accuracy"

    def __init__(self, loss: LossSection | None = None, num_classes: int = 2, labels: list[str] | None = None):
        super().__init__(loss)
        if num_classes < 2:
            raise ConfigError(f"`task.num_classes` = {num_classes} is invalid: need at least 2 classes")
        if self.loss_cfg.name not in (None, "cross_entropy"):
            raise ConfigError(f"`loss.name` = {self.loss_cfg.name!r}: classification uses `cross_entropy`")
        self.num_classes = num_classes
        self.label_names = labels
        cw = self.loss_cfg.class_weights
        if cw is not None and len(cw) != num_classes:
            raise ConfigError(f"`loss.class_weights` has {len(cw)} values; task.num_classes is {num_classes}")
        self.class_weights = torch.tensor(cw, dtype=torch.float32) if cw is not None else None

    def _weights(self, device: torch.device) -> torch.Tensor | None:
        if self.class_weights is None:
            return None
        if self.class_weights.device != device:
            self.class_weights = self.class_weights.to(device)
        return self.class_weights

    def count_targets(self, batch: Batch) -> torch.Tensor:
        labels = batch["labels"]
        keep = labels != self.loss_cfg.ignore_index
        w = self._weights(labels.device)
        if w is None:
            return keep.sum().float()
        # weighted cross-entropy's mean divides by the summed weights of the targets
        return w[labels[keep]].sum()

    def loss_sum(self, outputs: torch.Tensor, batch: Batch) -> torch.Tensor:
        if outputs.shape[-1] != self.num_classes:
            raise ConfigError(
                f"the model outputs {outputs.shape[-1]} scores per example but the task has {self.num_classes} "
                f"classes: set model.num_classes (or num_labels) to {self.num_classes}, or leave it out to "
                "take it from the data (from Python: size the model's last layer, or build_task(num_classes=...))"
            )
        return F.cross_entropy(
            outputs.float(),
            batch["labels"],
            weight=self._weights(outputs.device),
            ignore_index=self.loss_cfg.ignore_index,
            label_smoothing=self.loss_cfg.label_smoothing,
            reduction="sum",
        )

    def metrics(self) -> MetricSet:
        n = self.num_classes
        ignore = self.loss_cfg.ignore_index
        collection = MetricCollection(
            {
                "accuracy": MulticlassAccuracy(n, average="micro"),
                "f1_macro": MulticlassF1Score(n, average="macro"),
                "precision_macro": MulticlassPrecision(n, average="macro"),
                "recall_macro": MulticlassRecall(n, average="macro"),
                "precision_per_class": MulticlassPrecision(n, average="none"),
                "recall_per_class": MulticlassRecall(n, average="none"),
                "confusion_matrix": MulticlassConfusionMatrix(n),
            },
            compute_groups=False,
        )
        return _IgnoringMetricSet(collection, ignore)

    def check_dataset(self, dataset: Any, split: str) -> None:
        labels = _dataset_labels(dataset)
        if labels is None or labels.numel() == 0:
            return
        labels = labels[labels != self.loss_cfg.ignore_index]
        bad = (labels < 0) | (labels >= self.num_classes)
        if bad.any():
            value = int(labels[bad][0])
            raise DataError(
                f"{split} data: label {value} is outside [0, {self.num_classes}); "
                f"set task.num_classes to at least {int(labels.max()) + 1} or fix the labels"
            )


@register_task("multilabel")
class MultilabelTask(Task):
    name = "multilabel"
    default_monitor = "f1_macro"

    def __init__(self, loss: LossSection | None = None, num_labels: int = 2, threshold: float = 0.5):
        super().__init__(loss)
        self.num_labels = num_labels
        self.threshold = threshold
        pw = self.loss_cfg.pos_weight
        self.pos_weight = torch.tensor(pw, dtype=torch.float32) if pw is not None else None

    def count_targets(self, batch: Batch) -> torch.Tensor:
        return torch.tensor(float(batch["labels"].numel()))

    def loss_sum(self, outputs: torch.Tensor, batch: Batch) -> torch.Tensor:
        if outputs.shape != batch["labels"].shape:
            raise ConfigError(
                f"the model outputs shape {tuple(outputs.shape)} but the multi-label targets are "
                f"{tuple(batch['labels'].shape)}: one score per label (task.num_labels = {self.num_labels})"
            )
        pw = self.pos_weight.to(outputs.device) if self.pos_weight is not None else None
        return F.binary_cross_entropy_with_logits(
            outputs.float(), batch["labels"].float(), pos_weight=pw, reduction="sum"
        )

    def metrics(self) -> MetricSet:
        n = self.num_labels
        collection = MetricCollection(
            {
                "accuracy": MultilabelAccuracy(n, threshold=self.threshold),
                "f1_macro": MultilabelF1Score(n, threshold=self.threshold, average="macro"),
            }
        )

        class _Set(MetricSet):
            def update_collection(self, outputs, batch):
                self.collection.update(torch.sigmoid(outputs.float()), batch["labels"].long())

        return _Set(collection)
