"""The `image_classification` task: classification with optional mixup / cutmix soft targets (torchvision's
v2 transforms), used with the image data sources."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from tunelab.config import LossSection
from tunelab.errors import ConfigError
from tunelab.tasks.base import Batch, model_outputs, register_task
from tunelab.tasks.classification import ClassificationTask


@register_task("image_classification")
class ImageClassificationTask(ClassificationTask):
    """`classification` plus mixup/cutmix: in training, each batch is mixed on the device with probability
    `mix_prob` (one of mixup or cutmix, chosen at random when both are on), and the loss takes the soft
    targets. Evaluation is unchanged."""

    name = "image_classification"

    def __init__(
        self,
        loss: LossSection | None = None,
        num_classes: int = 2,
        labels: list[str] | None = None,
        mixup_alpha: float = 0.0,
        cutmix_alpha: float = 0.0,
        mix_prob: float = 1.0,
    ):
        super().__init__(loss, num_classes, labels)
        if mixup_alpha < 0 or cutmix_alpha < 0 or not 0 <= mix_prob <= 1:
            raise ConfigError(
                "`task.mixup_alpha` / `task.cutmix_alpha` must be >= 0 and `task.mix_prob` in [0, 1]"
            )
        if (mixup_alpha or cutmix_alpha) and self.class_weights is not None:
            raise ConfigError(
                "`loss.class_weights` cannot be combined with mixup/cutmix soft targets; drop one"
            )
        self.mix_prob = mix_prob
        self.mixer = None
        if mixup_alpha or cutmix_alpha:
            from torchvision.transforms import v2 as T

            ops = []
            if mixup_alpha:
                ops.append(T.MixUp(alpha=mixup_alpha, num_classes=num_classes))
            if cutmix_alpha:
                ops.append(T.CutMix(alpha=cutmix_alpha, num_classes=num_classes))
            self.mixer = ops[0] if len(ops) == 1 else T.RandomChoice(ops)

    def forward(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        batch.pop("soft_labels", None)
        if self.mixer is not None and model.training and float(torch.rand(())) < self.mix_prob:
            inputs, soft = self.mixer(batch["inputs"], batch["labels"])
            batch["soft_labels"] = soft
            return model_outputs(model(inputs))
        return super().forward(model, batch)

    def count_targets(self, batch: Batch) -> torch.Tensor:
        if "soft_labels" in batch:
            return torch.tensor(float(len(batch["soft_labels"])))
        return super().count_targets(batch)

    def loss_sum(self, outputs: torch.Tensor, batch: Batch) -> torch.Tensor:
        soft = batch.get("soft_labels")
        if soft is None:
            return super().loss_sum(outputs, batch)
        return F.cross_entropy(
            outputs.float(), soft.float(), label_smoothing=self.loss_cfg.label_smoothing, reduction="sum"
        )
