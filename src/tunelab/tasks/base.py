"""The Task interface the trainer talks to.

A task turns a batch into model outputs (`forward`), gives the *sum* of per-target losses and the number
of targets separately (so gradient accumulation can normalise by the total count of targets across all
micro-batches, not average the per-batch means), and keeps streaming metrics that never hold all logits.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

from tunelab.config import LossSection, check_kwargs
from tunelab.registry import TASKS

Batch = dict[str, Any]


def model_outputs(out: Any) -> torch.Tensor:
    """Logits from a tensor, a Hugging Face ModelOutput or a (logits, ...) tuple."""
    if isinstance(out, torch.Tensor):
        return out
    if hasattr(out, "logits"):
        return out.logits
    if isinstance(out, (tuple, list)):
        return out[0]
    raise TypeError(f"cannot find logits in model output of type {type(out).__name__}")


class Task:
    name = "task"
    default_monitor = "loss"
    # Keys of the batch that are passed to the model as keyword arguments (`inputs` is passed positionally).
    model_input_keys: tuple[str, ...] = ("input_ids", "attention_mask", "token_type_ids", "position_ids")

    def __init__(self, loss: LossSection | None = None):
        self.loss_cfg = loss or LossSection()

    # -- forward and loss -------------------------------------------------------------------------
    def forward(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        if "inputs" in batch:
            return model_outputs(model(batch["inputs"]))
        kwargs = {k: batch[k] for k in self.model_input_keys if k in batch}
        return model_outputs(model(**kwargs))

    def shard_refusal(self, model: nn.Module) -> str | None:
        """Why this task's forward cannot run on shards of a batch in several threads at once
        (`train.batch_threads`), or None: the loss must be a sum over the batch's rows, and the forward
        must leave the shared model alone."""
        return None

    def count_targets(self, batch: Batch) -> torch.Tensor:
        """How many targets this batch contributes to the loss normaliser (a float tensor)."""
        return torch.tensor(float(len(batch["labels"])))

    def loss_sum(self, outputs: torch.Tensor, batch: Batch) -> torch.Tensor:
        raise NotImplementedError

    def count_tokens(self, batch: Batch) -> int | None:
        """Non-padding tokens in the batch, for tokens/s; None where there are no tokens."""
        mask = batch.get("attention_mask")
        if mask is not None:
            return int(mask.sum())
        ids = batch.get("input_ids")
        return int(ids.numel()) if ids is not None else None

    def batch_size(self, batch: Batch) -> int:
        for v in batch.values():
            if isinstance(v, torch.Tensor) and v.dim() > 0:
                return v.shape[0]
        return 0

    # -- evaluation --------------------------------------------------------------------------------
    def metrics(self) -> MetricSet:
        return MetricSet()

    def monitor_mode(self, metric: str) -> str:
        return "min" if any(s in metric for s in ("loss", "mse", "mae", "perplexity", "error")) else "max"

    # -- data checks ---------------------------------------------------------------------------------
    def check_dataset(self, dataset: Any, split: str) -> None:
        """Raise a DataError for data this task cannot train on (labels out of range, ...)."""


class MetricSet:
    """Streaming loss average plus an optional torchmetrics collection, updated batch by batch."""

    def __init__(self, collection: Any = None):
        self.collection = collection
        self.loss_total = 0.0
        self.target_total = 0.0

    def to(self, device: torch.device) -> MetricSet:
        if self.collection is not None:
            self.collection = self.collection.to(device)
        return self

    def update(self, outputs: torch.Tensor, batch: Batch, loss_sum: torch.Tensor, n_targets: torch.Tensor):
        self.loss_total += float(loss_sum)
        self.target_total += float(n_targets)
        if self.collection is not None:
            self.update_collection(outputs, batch)

    def update_collection(self, outputs: torch.Tensor, batch: Batch) -> None:
        self.collection.update(outputs, batch["labels"])

    def compute(self) -> dict[str, Any]:
        out: dict[str, Any] = {"loss": self.loss_total / max(self.target_total, 1e-12)}
        if self.collection is not None:
            for k, v in self.collection.compute().items():
                out[k] = v.item() if v.numel() == 1 else v.tolist()
        return out

    def sync(self) -> None:
        """All-reduce the loss totals across ranks (torchmetrics syncs its own states in compute)."""
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            t = torch.tensor([self.loss_total, self.target_total], dtype=torch.float64)
            torch.distributed.all_reduce(t)
            self.loss_total, self.target_total = t.tolist()


def register_task(name: str):
    return TASKS.register(name)


TASKS.accepts = lambda obj: isinstance(obj, type) and issubclass(obj, Task)


def build_task(name: str, loss: LossSection | None = None, **kwargs: Any) -> Task:
    """The task registered as `name` (or the Task subclass at import path `pkg.module:Class`)."""
    cls = TASKS.resolve(name)
    check_kwargs(cls.__init__, kwargs, "task", internal=("loss",))
    return cls(loss=loss, **kwargs)
