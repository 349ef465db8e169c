"""The engine's own callbacks: early stopping, the test split at the end (more live beside the features they
serve)."""

from __future__ import annotations

import copy
import math
from typing import TYPE_CHECKING, Any

import torch

from tunelab.callbacks import Callback

if TYPE_CHECKING:
    from tunelab.engine.trainer import Trainer


def is_better(value: float, best: float | None, mode: str, min_delta: float = 0.0) -> bool:
    if best is None or math.isnan(best):
        return not math.isnan(value)
    return value < best - min_delta if mode == "min" else value > best + min_delta


class EarlyStopping(Callback):
    """Stop when `monitor` has not improved by `min_delta` for `patience` evaluations; at the end,
    restore the best weights (kept in memory, so it works without checkpoints too)."""

    def __init__(self, monitor: str, mode: str, patience: int = 3, min_delta: float = 0.0,
                 restore_best: bool = True):
        self.monitor, self.mode, self.patience = monitor, mode, patience
        self.min_delta, self.restore_best = min_delta, restore_best
        self.best: float | None = None
        self.best_step: int | None = None
        self.bad_evals = 0
        self.stopped_step: int | None = None
        self._best_weights: dict[str, torch.Tensor] | None = None

    def on_eval_end(self, trainer: Trainer, metrics: dict[str, Any]) -> None:
        if self.monitor not in metrics:
            from tunelab.errors import ConfigError

            raise ConfigError(
                f"`early_stopping.monitor` = {self.monitor!r} is not an eval metric; "
                f"available: {', '.join(k for k, v in metrics.items() if isinstance(v, (int, float)))}"
            )
        value = float(metrics[self.monitor])
        if is_better(value, self.best, self.mode, self.min_delta):
            self.best, self.best_step, self.bad_evals = value, trainer.global_step, 0
            if self.restore_best:
                self._best_weights = copy.deepcopy(
                    {k: v.detach().cpu() for k, v in trainer.raw_model.state_dict().items()}
                )
        else:
            self.bad_evals += 1
            if self.bad_evals >= self.patience:
                self.stopped_step = trainer.global_step
                trainer.should_stop = True
                trainer.stop_reason = (
                    f"early stopping: {self.monitor} did not improve for {self.patience} evaluations "
                    f"(best {self.best:.4g} at step {self.best_step})"
                )
                trainer.log("early_stop", monitor=self.monitor, best=self.best, best_step=self.best_step)

    def on_train_end(self, trainer: Trainer) -> bool:
        if self.restore_best and self._best_weights is not None and self.best_step != trainer.global_step:
            trainer.raw_model.load_state_dict(self._best_weights)
            trainer.log("restored_best", step_restored=self.best_step, monitor=self.monitor, value=self.best)
            return True
        return False

    def on_fit_end(self, trainer: Trainer, summary: dict[str, Any]) -> None:
        if self.stopped_step is not None or self.best_step != trainer.global_step:
            summary["early_stopping"] = {"monitor": self.monitor, "best": self.best, "best_step": self.best_step,
                                         "stopped_step": self.stopped_step}

    def state_dict(self) -> dict[str, Any]:
        return {"best": self.best, "best_step": self.best_step, "bad_evals": self.bad_evals,
                "best_weights": self._best_weights}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best, self.best_step = state["best"], state["best_step"]
        self.bad_evals = state["bad_evals"]
        self._best_weights = state.get("best_weights")


class TestSetEval(Callback):
    """A labelled test split, scored once by the trained model at the end of a run that finished (HF's
    `trainer.evaluate(test_dataset)` habit): a `test` event in metrics.jsonl and summary.json's
    `test_metrics` (and so the report)."""

    def __init__(self, dataset: Any):
        self.dataset = dataset

    def on_fit_end(self, trainer: Trainer, summary: dict[str, Any]) -> None:
        if summary["status"] not in ("completed", "stopped_early"):
            return
        metrics = trainer.evaluate(self.dataset)
        summary["test_metrics"] = metrics
        trainer.log("test", **metrics)
