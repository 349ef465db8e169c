"""Causal language modelling: next-token cross-entropy.

Convention: `batch["labels"][b, t]` is the target for the logits at position t (already shifted by the
data pipeline), with `ignore_index` (-100) for positions that carry no loss: prompt tokens, padding, and
the first position of each packed document. The task never shifts, so packed and plain batches, native
and Hugging Face models all share one loss.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F

from tunelab.tasks.base import Batch, MetricSet, Task, register_task


class _LMMetrics(MetricSet):
    def compute(self) -> dict[str, Any]:
        out = super().compute()
        out["perplexity"] = math.exp(min(out["loss"], 50.0))
        return out


@register_task("causal_lm")
class CausalLMTask(Task):
    name = "causal_lm"
    default_monitor = "loss"
    model_input_keys = ("input_ids", "attention_mask", "position_ids")

    def count_targets(self, batch: Batch) -> torch.Tensor:
        return (batch["labels"] != self.loss_cfg.ignore_index).sum().float()

    def loss_sum(self, outputs: torch.Tensor, batch: Batch) -> torch.Tensor:
        logits = outputs
        return F.cross_entropy(
            logits.reshape(-1, logits.size(-1)).float(),
            batch["labels"].reshape(-1),
            ignore_index=self.loss_cfg.ignore_index,
            label_smoothing=self.loss_cfg.label_smoothing,
            reduction="sum",
        )

    def count_tokens(self, batch: Batch) -> int | None:
        mask = batch.get("attention_mask")
        if mask is not None and mask.dim() == 2:
            return int(mask.sum())
        return int(batch["input_ids"].numel())

    def metrics(self) -> MetricSet:
        return _LMMetrics()
