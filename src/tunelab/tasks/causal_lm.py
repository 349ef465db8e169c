"""Causal language modelling: next-token cross-entropy.

Convention: `batch["labels"][b, t]` is the target for the logits at position t (already shifted by the
data pipeline), with `ignore_index` (-100) for positions that carry no loss: prompt tokens, padding, and
the first position of each packed document. The task never shifts, so packed and plain batches, native
and Hugging Face models all share one loss.

Logits only where there is a target (`target_logits: true`, the default): when some positions carry no
loss (SFT masks the prompt), the output head of a Hugging Face-style model (`get_output_embeddings()`)
is applied to the hidden states of the target positions only, so the model returns logits of shape
(targets, vocab) instead of (batch, length, vocab). With a 49k vocabulary the head is ~20% of a small
LLM's FLOPs and its logits are the largest activation; skipping the prompt and padding positions saves
both, and the loss is the same sum over the same targets.

Head and loss fused (`fused_loss: true`, the default, with `target_logits`): when the head is a plain
`nn.Linear`, it is swapped for `linear_ce.linear_cross_entropy` during the task's forward, which returns
the summed loss instead of logits, working through the target rows in chunks: the (targets, vocab) logits,
their log-softmax and their gradient never exist (SmolLM2 SFT recipe: the plan's estimate fell by 488 MiB).
A model that post-processes its head's output (logit soft-capping, scaling) is detected on the first
batch, and the task falls back to target-only logits for it.
"""

from __future__ import annotations

import contextlib
import functools
import math
import threading
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from tunelab.tasks.base import Batch, MetricSet, Task, register_task
from tunelab.tasks.linear_ce import linear_cross_entropy

# Per thread, the heads narrowed (rows) or replaced (compute) by the block running in that thread: shard
# threads (`train.batch_threads`) run forwards through one head at once, each with its own batch's rows.
_local = threading.local()
_lock = threading.Lock()  # hooking a head, and installing or removing its replaced forward


def _mine(name: str) -> dict[int, Any]:
    table = getattr(_local, name, None)
    if table is None:
        table = {}
        setattr(_local, name, table)
    return table


@contextlib.contextmanager
def _entry(name: str, head: nn.Module, value: Any) -> Iterator[None]:
    table = _mine(name)
    before = table.get(id(head))
    table[id(head)] = value
    try:
        yield
    finally:
        if before is None:
            del table[id(head)]
        else:
            table[id(head)] = before


class _LMMetrics(MetricSet):
    def compute(self) -> dict[str, Any]:
        out = super().compute()
        out["perplexity"] = math.exp(min(out["loss"], 50.0))
        return out


def _select_rows(module: nn.Module, args: tuple) -> tuple | None:
    rows = _mine("rows").get(id(module))
    if rows is None:
        return None
    hidden = args[0][rows] if rows.dtype == torch.bool else args[0].flatten(0, -2)[rows]
    return (hidden, *args[1:])


def output_head(model: nn.Module) -> nn.Module | None:
    """The output projection of a Hugging Face-style model (through PEFT and DDP wrappers), or None.
    Compiled models are left alone: a hook that reads Python state would break the graph."""
    while isinstance(model, nn.parallel.DistributedDataParallel):
        model = model.module
    if hasattr(model, "_orig_mod"):
        return None
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    return head if isinstance(head, nn.Module) else None


@contextlib.contextmanager
def target_rows(head: nn.Module, rows: torch.Tensor) -> Iterator[None]:
    """While active in this thread, `head` sees only the hidden states at `rows`: a bool mask over batch x
    length, or indices into the flattened batch x length positions (a position may repeat). Other threads
    see the head as it was."""
    with _lock:
        if not getattr(head, "_tunelab_hooked", False):
            head.register_forward_pre_hook(_select_rows)
            head._tunelab_hooked = True
    with _entry("rows", head, rows):
        yield


def _replaced_forward(head: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    compute = _mine("compute").get(id(head))
    return type(head).forward(head, hidden) if compute is None else compute(hidden)


@contextlib.contextmanager
def replaced_head(head: nn.Module, rows: torch.Tensor, compute: Callable[..., torch.Tensor]):
    """While active in this thread, `head(hidden)` returns `compute(hidden_rows, head.weight, head.bias)` for
    the hidden states at `rows` instead of logits; the result is also left in the yielded dict under "out",
    so the caller can check that the model returned it unchanged. The head's forward is swapped while any
    thread replaces it; a thread that does not runs the class's own forward."""
    box: dict[str, torch.Tensor] = {}

    def forward(hidden: torch.Tensor) -> torch.Tensor:
        box["out"] = compute(hidden, head.weight, head.bias)
        return box["out"]

    with target_rows(head, rows), _entry("compute", head, forward):
        with _lock:
            users = head.__dict__.get("_tunelab_replaced", 0)
            if users == 0:
                head.forward = functools.partial(_replaced_forward, head)  # shadows the class's forward
            head.__dict__["_tunelab_replaced"] = users + 1
        try:
            yield box
        finally:
            with _lock:
                head.__dict__["_tunelab_replaced"] -= 1
                if head.__dict__["_tunelab_replaced"] == 0:
                    del head.forward


def fused_head(head: nn.Module, rows: torch.Tensor, targets: torch.Tensor, label_smoothing: float):
    """While active, `head(hidden)` returns the summed cross-entropy of the target rows (a 0-d fp32
    tensor) instead of logits."""
    return replaced_head(head, rows, lambda h, w, b: linear_cross_entropy(h, w, b, targets, label_smoothing))


@register_task("causal_lm")
class CausalLMTask(Task):
    name = "causal_lm"
    default_monitor = "loss"
    model_input_keys = ("input_ids", "attention_mask", "position_ids")

    def __init__(self, loss: Any = None, target_logits: bool = True, fused_loss: bool = True):
        super().__init__(loss)
        self.target_logits = target_logits
        self.fused_loss = fused_loss and target_logits

    def forward(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        """Logits (full or target rows), or with the fused head the summed loss itself (0-d)."""
        labels = batch.get("labels")
        head = output_head(model) if self.target_logits and isinstance(labels, torch.Tensor) else None
        if head is None or labels.dim() != 2:
            return super().forward(model, batch)
        rows = labels != self.loss_cfg.ignore_index
        if self.fused_loss and type(head) is nn.Linear:  # not a LoRA-wrapped or quantised head
            with fused_head(head, rows, labels[rows], self.loss_cfg.label_smoothing) as box:
                out = super().forward(model, batch)
            if out is box.get("out"):
                return out
            self.fused_loss = False  # the model changed the head's output: use target-only logits
        with target_rows(head, rows):
            return super().forward(model, batch)

    def count_targets(self, batch: Batch) -> torch.Tensor:
        return (batch["labels"] != self.loss_cfg.ignore_index).sum().float()

    def loss_sum(self, outputs: torch.Tensor, batch: Batch) -> torch.Tensor:
        logits, labels = outputs, batch["labels"]
        if logits.dim() == 0:  # the fused head already returned the summed loss
            return logits
        if logits.dim() == 2 and labels.dim() == 2:  # target-only logits: (targets, vocab)
            labels = labels[labels != self.loss_cfg.ignore_index]
        return F.cross_entropy(
            logits.reshape(-1, logits.size(-1)).float(),
            labels.reshape(-1),
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
