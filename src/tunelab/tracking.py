"""Experiment tracking with MLflow: `output: {mlflow: {tracking_uri: ..., experiment: ...}}`.

`MlflowTracker` is a callback (every run with `output.mlflow` set gets one through the CALLBACKS registry)
that logs a run's resolved config as params, every train/eval event as metrics at its optimizer step, the
run doctor's diagnoses as tags, and report.html, config.yaml and final/ as artifacts. Sweeps log each
trial as a child run of the sweep's own run (`child_runs_of`).

Tracking must never cost the training run anything: every MLflow call runs in order on one background
thread; the first failure (server down, wrong URI, a store that refuses a value) prints one warning and
ends tracking for the process, while training goes on and metrics.jsonl keeps every event. An HTTP server
is probed with a short timeout before anything is queued and MLflow's request retries are cut to 2 (unless
MLFLOW_HTTP_REQUEST_MAX_RETRIES is set); the end of the run waits at most `output.mlflow.flush_timeout`
seconds for uploads still pending. Resumed runs continue their MLflow run
(its id travels in the checkpoint).

mlflow is imported only here, and only when a run is tracked (`pip install 'tunelab[mlflow]'`).
"""

from __future__ import annotations

import contextlib
import contextvars
import math
import os
import queue
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tunelab.callbacks import Callback
from tunelab.registry import CALLBACKS

if TYPE_CHECKING:
    from tunelab.config import MlflowSection, RunConfig
    from tunelab.engine.trainer import Trainer

# Set by a sweep around each trial: the MLflow run that the trial's run is logged under.
_PARENT_RUN: contextvars.ContextVar[str | None] = contextvars.ContextVar("tunelab_mlflow_parent", default=None)
_FAILED: set[str] = set()  # tracking URIs that failed in this process: warned about once, then skipped


@contextlib.contextmanager
def child_runs_of(parent_run_id: str | None) -> Iterator[None]:
    """Runs tracked inside this block are logged as children of MLflow run `parent_run_id`."""
    token = _PARENT_RUN.set(parent_run_id)
    try:
        yield
    finally:
        _PARENT_RUN.reset(token)


def _warn_once(uri: str, what: str) -> None:
    if uri in _FAILED:
        return
    _FAILED.add(uri)
    print(f"warning: MLflow tracking is off ({what}); training goes on and metrics.jsonl keeps every event",
          file=sys.stderr)


def _uri_label(uri: str | None) -> str:
    return uri or "MLflow's default tracking URI"


def open_client(tracking_uri: str | None) -> Any:
    """An MlflowClient for `tracking_uri`, or None (after one warning) when MLflow cannot be used there.
    HTTP servers are probed first (`/health`, 3 s), so a server that is down costs seconds, not retries."""
    label = _uri_label(tracking_uri)
    if label in _FAILED:
        return None
    try:
        from mlflow import MlflowClient
    except ImportError:
        _warn_once(label, "mlflow is not installed: pip install 'tunelab[mlflow]'")
        return None
    if tracking_uri and tracking_uri.startswith(("http://", "https://")):
        # MLflow retries a failed request 7 times with doubling waits (minutes); a server that goes away
        # mid-run should cost seconds. Settings the user made are kept.
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
        try:
            with urllib.request.urlopen(tracking_uri.rstrip("/") + "/health", timeout=3):
                pass
        except OSError as e:
            _warn_once(label, f"no MLflow server answers at {tracking_uri}: {getattr(e, 'reason', e)}")
            return None
    try:
        client = MlflowClient(tracking_uri=tracking_uri)
        client.search_experiments(max_results=1)  # opens the store now: a bad URI fails here
    except Exception as e:
        reason = _one_line(e)
        if "MLFLOW_ALLOW_FILE_STORE" in str(e):  # MLflow 3 keeps the mlruns/ file store behind a switch
            reason = "MLflow opens a file store only with MLFLOW_ALLOW_FILE_STORE=true (or use sqlite:///mlflow.db)"
        _warn_once(label, f"{label}: {reason}")
        return None
    return client


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"[:300]


def experiment_id(client: Any, name: str) -> str:
    """The id of experiment `name`, created if missing (another process may create it at the same time)."""
    found = client.get_experiment_by_name(name)
    if found is not None:
        return found.experiment_id
    try:
        return client.create_experiment(name)
    except Exception:
        found = client.get_experiment_by_name(name)
        if found is None:
            raise
        return found.experiment_id


MAX_PARAM_LENGTH = 6000  # MLflow's limit on a param value (since 2.x)


def flat_params(d: Any, prefix: str = "") -> dict[str, str]:
    """A nested config as dotted keys -> text values (MLflow params are strings of bounded length)."""
    if isinstance(d, dict) and d:
        out: dict[str, str] = {}
        for k, v in d.items():
            out.update(flat_params(v, f"{prefix}{k}."))
        return out
    return {prefix.rstrip("."): str(d)[:MAX_PARAM_LENGTH]}


def log_params(client: Any, run_id: str, params: dict[str, str]) -> None:
    from mlflow.entities import Param

    items = [Param(k, v) for k, v in params.items()]
    for i in range(0, len(items), 100):  # MLflow's limit per batch
        client.log_batch(run_id, params=items[i : i + 100])


def scalar_metrics(prefix: str, fields: dict[str, Any], step: int) -> list[Any]:
    """MLflow Metric entities for the numeric fields of one event (lists, bools and strings are skipped)."""
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    return [
        Metric(f"{prefix}/{k}", float(v), now, step)
        for k, v in fields.items()
        if isinstance(v, (int, float)) and not isinstance(v, bool) and not (isinstance(v, float) and math.isnan(v))
    ]


class _Uploader:
    """MLflow calls on one background thread, in order. The first failure prints one warning and drops the
    rest, so a tracking problem never reaches the training loop."""

    def __init__(self, label: str):
        self.label = label
        self.failed = label in _FAILED
        self._queue: queue.Queue[Callable[[], None] | None] = queue.Queue()
        self._thread = threading.Thread(target=self._loop, name="tunelab-mlflow", daemon=True)
        self._thread.start()

    def submit(self, call: Callable[[], None]) -> None:
        if not self.failed:
            self._queue.put(call)

    def _loop(self) -> None:
        while (call := self._queue.get()) is not None:
            if self.failed:
                continue
            try:
                call()
            except Exception as e:
                self.failed = True
                _warn_once(self.label, _one_line(e))

    def close(self, timeout: float) -> None:
        """Wait up to `timeout` seconds for the queued calls; what is left then is dropped."""
        self._queue.put(None)
        self._thread.join(timeout)
        if self._thread.is_alive():
            self.failed = True
            _warn_once(self.label, f"uploads still pending after {timeout:g} s (output.mlflow.flush_timeout) "
                                   "were left behind")


class MlflowTracker(Callback):
    """Logs one tunelab run to MLflow (see the module docstring). Rank 0 only."""

    def __init__(self, options: MlflowSection):
        self.options = options
        self.run_id: str | None = None  # restored from the checkpoint on resume
        self._resumed = False
        self._uploader: _Uploader | None = None
        self._client: Any = None

    # -- what travels in checkpoints: the MLflow run to continue on resume
    def state_dict(self) -> dict[str, Any]:
        return {"run_id": self.run_id}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.run_id = state.get("run_id")
        self._resumed = self.run_id is not None

    def _submit(self, call: Callable[[Any], None]) -> None:
        if self._uploader is not None:
            self._uploader.submit(lambda: call(self._client) if self.run_id else None)

    def on_fit_start(self, trainer: Trainer) -> None:
        if not trainer.is_main:
            return
        uri = self.options.tracking_uri
        self._uploader = _Uploader(_uri_label(uri))
        cfg = trainer.config
        name = cfg.name if cfg is not None else (trainer.output_dir.name if trainer.output_dir else "run")
        experiment = self.options.experiment or name
        parent = _PARENT_RUN.get()
        changed = dict(trainer.log_on_resume.get("changed") or {})
        run_dir = str(Path(trainer.output_dir).resolve()) if trainer.output_dir else ""
        params = flat_params(cfg.to_dict()) if cfg is not None else {}

        def start() -> None:
            client = open_client(uri)
            if client is None:
                self._uploader.failed = True
                return
            self._client = client
            if self.run_id and self._resumed:  # a resumed tunelab run continues its MLflow run
                client.update_run(self.run_id, status="RUNNING")
                for key, (old, new) in changed.items():
                    client.set_tag(self.run_id, f"tunelab.resume_changed.{key}"[:250], f"{old!r} -> {new!r}")
                return
            tags = {"mlflow.runName": name, "tunelab.run_dir": run_dir}
            if parent:
                tags["mlflow.parentRunId"] = parent
            run = client.create_run(experiment_id(client, experiment), tags=tags, run_name=name)
            self.run_id = run.info.run_id
            log_params(client, self.run_id, params)

        self._uploader.submit(start)

    def _metrics(self, prefix: str, fields: dict[str, Any], step: int) -> None:
        if self._uploader is None:
            return
        metrics = scalar_metrics(prefix, fields, step)
        if metrics:
            self._submit(lambda client: client.log_batch(self.run_id, metrics=metrics))

    def on_step_end(self, trainer: Trainer, logs: dict[str, Any]) -> None:
        self._metrics("train", logs, trainer.global_step)

    def on_eval_end(self, trainer: Trainer, metrics: dict[str, Any]) -> None:
        self._metrics("eval", metrics, trainer.global_step)

    def on_fit_end(self, trainer: Trainer, summary: dict[str, Any]) -> None:
        if self._uploader is None:
            return
        out = Path(trainer.output_dir)
        status = str(summary.get("status", "?"))
        tags = {"tunelab.status": status}
        for d in summary.get("diagnoses") or []:
            tags[f"doctor.{d.get('kind')}"] = f"step {d.get('step')}: {d.get('evidence')}"[:5000]
        if summary.get("error"):
            tags["tunelab.error"] = str(summary["error"])[:5000]
        final_metrics = scalar_metrics("final", summary.get("metrics") or {}, trainer.global_step)
        files = [out / name for name in ("config.yaml", "report.html") if (out / name).is_file()]
        weights = out / "final" if self.options.log_weights and (out / "final").is_dir() else None

        def finish(client: Any) -> None:
            from mlflow.entities import RunTag

            client.log_batch(self.run_id, metrics=final_metrics, tags=[RunTag(k, v) for k, v in tags.items()])
            for f in files:
                client.log_artifact(self.run_id, str(f))
            if weights is not None:
                client.log_artifacts(self.run_id, str(weights), artifact_path="final")
            ended = {"failed": "FAILED", "diverged": "FAILED", "interrupted": "KILLED"}.get(status, "FINISHED")
            client.set_terminated(self.run_id, ended)

        self._submit(finish)
        # an interrupted run (Ctrl-C) should stop promptly: it waits less for its uploads
        self._uploader.close(self.options.flush_timeout if status != "interrupted" else min(self.options.flush_timeout, 5))
        if self.run_id:
            summary["mlflow_run_id"] = self.run_id
            trainer.log("mlflow", run_id=self.run_id, uploaded=not self._uploader.failed)


@CALLBACKS.register("mlflow")
def mlflow_callbacks(cfg: RunConfig, data: Any) -> list[Callback]:
    """MLflow tracking for a run whose recipe sets `output.mlflow` (last: it uploads the report and the
    doctor's diagnoses, which the callbacks before it write)."""
    return [MlflowTracker(cfg.output.mlflow)] if cfg.output.mlflow is not None else []


# -- sweeps: one parent run, the trials as its children ----------------------------------------------------


def _options(options: MlflowSection | dict[str, Any]) -> MlflowSection:
    from tunelab.config import MlflowSection

    return options if isinstance(options, MlflowSection) else MlflowSection(**options)


def start_sweep_run(options: MlflowSection | dict[str, Any], name: str, params: dict[str, str]) -> str | None:
    """The sweep's MLflow run (its search space and settings as params); None when tracking is off."""
    options = _options(options)
    client = open_client(options.tracking_uri)
    if client is None:
        return None
    try:
        run = client.create_run(experiment_id(client, options.experiment or name), run_name=f"{name}-sweep",
                                tags={"mlflow.runName": f"{name}-sweep", "tunelab.kind": "sweep"})
        log_params(client, run.info.run_id, params)
        return run.info.run_id
    except Exception as e:
        _warn_once(_uri_label(options.tracking_uri), _one_line(e))
        return None


def finish_sweep_run(options: MlflowSection | dict[str, Any], run_id: str, results: dict[str, Any],
                     files: list[Path], done: bool) -> None:
    """The sweep's outcome on its MLflow run: the best value and trial counts, sweep.json and the report;
    the run ends when every trial has."""
    options = _options(options)
    client = open_client(options.tracking_uri)
    if client is None:
        return
    try:
        from mlflow.entities import RunTag

        best = results.get("best") or {}
        fields = {f"trials_{k}": v for k, v in results.get("counts", {}).items()}
        if best:
            fields["best_value"] = best["value"]
        tags = [RunTag("tunelab.best_trial", str(best.get("number")))] if best else []
        client.log_batch(run_id, metrics=scalar_metrics("sweep", fields, len(results.get("trials", []))), tags=tags)
        for f in files:
            if f.is_file():
                client.log_artifact(run_id, str(f))
        if done:
            client.set_terminated(run_id, "FINISHED")
    except Exception as e:
        _warn_once(_uri_label(options.tracking_uri), _one_line(e))
