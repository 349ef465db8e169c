"""The Callback base: what a run's features attach to instead of flags threaded through the loop.

It sits below the data sources, models and engine so that any of them can contribute one (a data source's
artefact writer, the engine's early stopping, the insight layer's doctor and report) without importing
the trainer. Hooks receive the trainer; see docs/ARCHITECTURE.md for the order they run in.
"""

from __future__ import annotations

from typing import Any


class Callback:
    """Override any hook. `state_dict` is saved in checkpoints so resumed runs continue exactly."""

    def on_fit_start(self, trainer: Any) -> None:
        """Once the optimizer exists and a resume (if any) has restored the state, before the first step."""

    def on_epoch_start(self, trainer: Any, epoch: int) -> None:
        """Before the first step of each epoch (also of the epoch a resume lands in)."""

    def on_optimizer_step(self, trainer: Any) -> None:
        """After every optimizer step (keep it cheap: it runs in the loop's hot path)."""

    def on_step_end(self, trainer: Any, logs: dict[str, Any]) -> None:
        """At each logging step (every `train.log_every` optimizer steps) with the window's averaged metrics;
        fields a callback adds to `logs` are logged with them."""

    def on_eval_end(self, trainer: Any, metrics: dict[str, Any]) -> None:
        """After each evaluation, with its metrics."""

    def on_train_end(self, trainer: Any) -> bool | None:
        """After the last step and its evaluation. Return True if the weights were changed (early stopping
        restoring the best ones): the run is then evaluated again."""

    def on_fit_end(self, trainer: Any, summary: dict[str, Any]) -> None:
        """Last, with the summary about to be written (fields a callback adds are written with it)."""

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what `state_dict` returned (on resume)."""
