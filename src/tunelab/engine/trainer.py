"""Steps 5 and 6: the training loop and streaming evaluation.

`Trainer.fit` is the whole life of a run on one screen: claim the run folder, build the optimizer and the
schedule, resume, then for every optimizer step take a window of micro-batches, step (`engine.step`), and
let the follow-ups run on their schedules: log, evaluate, checkpoint. Everything else is a collaborator
(the `Meter`, the `Progress` display, the checkpoint functions) or a callback (early stopping here; the
doctor, the report and sample generations from the insight layer; artefact writers from data sources).
"""

from __future__ import annotations

import contextlib
import json
import math
import resource
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from torch.utils.data import DataLoader, Dataset

from tunelab import allocator
from tunelab.callbacks import Callback
from tunelab.config import (
    EarlyStoppingSection,
    EvalSection,
    OptimSection,
    RunConfig,
    ScheduleSection,
    TrainSection,
)
from tunelab.data.base import (
    LengthGroupedBatchSampler,
    ResumableBatchSampler,
    SortedEvalBatchSampler,
    collate_dicts,
)
from tunelab.engine.batches import FixedBatches, Window, Windows, make_loader
from tunelab.engine.callbacks import EarlyStopping, is_better
from tunelab.engine.checkpoint import CheckpointManager, non_finite, resume_newest, save_checkpoint
from tunelab.engine.distributed import DistInfo, all_reduce_sum, init_distributed
from tunelab.engine.meter import Meter
from tunelab.engine.progress import Progress
from tunelab.engine.rundir import claim_run_dir
from tunelab.engine.step import StepResult, TrainStep, pick_device, resolve_batch_threads, to_device
from tunelab.errors import ConfigError, DataError, TrainingDiverged, TunelabError
from tunelab.io import atomic_write_text, write_dir_atomically
from tunelab.models import keeps_adapters, save_model_folder
from tunelab.models.dropout import use_fast_dropout
from tunelab.optim import build_optimizer, build_scheduler
from tunelab.strategies import Full, Strategy
from tunelab.tasks.base import Task
from tunelab.weights import save_state_dict

__all__ = ["Trainer"]


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def _memory_error(e: BaseException, step: int, cfg: TrainSection) -> BaseException:
    """A one-line error for a batch that does not fit in memory (CPU allocator or CUDA OOM); other errors
    are returned unchanged."""
    text = str(e)
    if not (isinstance(e, (MemoryError, torch.OutOfMemoryError)) or "can't allocate memory" in text
            or "out of memory" in text.lower()):
        return e
    first = (text.strip().splitlines() or [type(e).__name__])[0][:160]
    return TunelabError(
        f"step {step}: a micro-batch of {cfg.batch_size} does not fit in memory ({first}); lower "
        f"train.batch_size and raise train.grad_accum to keep the effective batch (now {cfg.batch_size} x "
        f"{cfg.grad_accum}), or set train.auto_batch=true on a GPU"
    )


class Terminated(KeyboardInterrupt):
    """SIGTERM (what `kill`, schedulers and torchrun send) during a run: handled like Ctrl-C."""


@contextlib.contextmanager
def terminate_as_interrupt() -> Iterator[None]:
    """While training, SIGTERM raises `Terminated` in the main thread, so the run ends as `interrupted`
    (summary.json written, checkpoints consistent) instead of dying mid-step."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: Any) -> None:
        raise Terminated(f"signal {signum} (SIGTERM)")

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


class Trainer:
    """Train `model` on `train_data` for `task`; the sections are the recipe's (or their defaults), or
    taken from `config`. `output_dir=None` makes an ephemeral run that writes nothing (the LR finder)."""

    def __init__(
        self,
        model: nn.Module,
        task: Task,
        train_data: Dataset | None,
        eval_data: Dataset | None = None,
        *,
        optim: OptimSection | None = None,
        schedule: ScheduleSection | None = None,
        train: TrainSection | None = None,
        eval: EvalSection | None = None,
        early_stopping: EarlyStoppingSection | None = None,
        output_dir: str | Path | None = None,
        callbacks: Sequence[Callback] = (),
        collate_fn: Any = None,
        lr_scales: dict[str, float] | None = None,
        train_lengths: Sequence[int] | None = None,
        eval_lengths: Sequence[int] | None = None,
        strategy: Strategy | None = None,
        config: RunConfig | None = None,
        model_spec: dict[str, Any] | None = None,
    ):
        # Stays whole (over 60 lines): every attribute of a run is set here, so none first appears inside fit().
        def section(value: Any, name: str, default: type) -> Any:
            return value if value is not None else (getattr(config, name) if config else default())

        self.config = config
        self.optim_cfg, self.schedule_cfg = section(optim, "optim", OptimSection), section(schedule, "schedule", ScheduleSection)
        self.train_cfg, self.eval_cfg = section(train, "train", TrainSection), section(eval, "eval", EvalSection)
        self.output_dir = Path(output_dir) if output_dir else (config.output_dir if config else None)
        self.task, self.train_data, self.eval_data = task, train_data, eval_data
        self.collate_fn = collate_fn or collate_dicts
        self.lr_scales, self.train_lengths, self.eval_lengths = lr_scales, train_lengths, eval_lengths
        self.strategy: Strategy = strategy or Full()
        self.model_spec = model_spec
        self.dist: DistInfo = init_distributed(one_rank=self.train_cfg.distributed.strategy == "fsdp",
                                                timeout_s=self.train_cfg.distributed.timeout_s)
        self.device = pick_device(self.train_cfg.device)
        meta = any(p.is_meta for p in model.parameters())  # FSDP materialises it after sharding
        self.raw_model = model if meta else model.to(self.device)
        self.model: nn.Module = self.raw_model  # compiled and/or DDP-wrapped in fit
        self.step = TrainStep.for_run(self.model, task, self.train_cfg, self.device, world_size=self.dist.world_size)
        self.batch_threads = resolve_batch_threads(self.train_cfg.batch_threads, model, task, self.device,
                                                   compiled=self.train_cfg.compile, distributed=self.dist.initialized,
                                                   fast_dropout=self._fast_dropout)
        self.callbacks: list[Callback] = list(callbacks)
        self.monitor = self.eval_cfg.monitor
        self.monitor_mode = self.eval_cfg.mode or (task.monitor_mode(self.monitor) if self.monitor else "max")
        self._add_early_stopping(section(early_stopping, "early_stopping", EarlyStoppingSection))
        # the run's position and record (all restored on resume)
        self.global_step, self.epoch, self.batch_in_epoch = 0, 0, 0
        self.should_stop, self.stop_reason, self.diverged = False, None, False
        self.stop_status: str | None = None  # summary status of a stop a callback asks for (a sweep: `pruned`)
        self.best: dict[str, Any] | None = None
        self.last_eval: dict[str, Any] | None = None
        self.optimizer: torch.optim.Optimizer | None = None
        self.scheduler: Any = None
        self.total_steps = 0
        self.meter = Meter()
        self.progress: Progress | None = None
        self.checkpoints: CheckpointManager | None = None
        self._eval_loader: DataLoader | None = None
        self._metrics_file = None
        self._tb = None
        self.log_on_start: dict[str, Any] = {}
        self.log_on_resume: dict[str, Any] = {}  # e.g. the settings a resume changed (run.fit_run)
        # What the training data was (file sizes and hashes, row counts): saved in checkpoints; a resume on
        # changed data is refused unless `allow_data_change` (then the resume event says what changed).
        self.data_fingerprint: dict[str, Any] = {"rows": {"train": len(train_data) if train_data is not None else 0,
                                                          "eval": len(eval_data) if eval_data is not None else 0}}
        self.allow_data_change = False
        # FSDP with a model built on the meta device: fills the shards once they exist (run.fit_run sets it)
        self.load_after_sharding: Callable[[nn.Module], None] | None = None

    def _add_early_stopping(self, es: EarlyStoppingSection) -> None:
        if not es.enabled:
            return
        if self.eval_data is None:
            raise ConfigError("`early_stopping.enabled` = true needs evaluation data (an eval split)")
        monitor = es.monitor or self.monitor or self.task.default_monitor
        mode = es.mode or self.task.monitor_mode(monitor)
        self.callbacks.append(EarlyStopping(monitor, mode, es.patience, es.min_delta, es.restore_best))

    @property
    def is_main(self) -> bool:
        return self.dist.is_main

    @property
    def autocast_dtype(self) -> torch.dtype | None:
        return self.step.autocast_dtype

    # -- the run ----------------------------------------------------------------------------------------------
    def fit(self, resume: bool = False) -> dict[str, Any]:
        """Train to `train.max_steps` (or `epochs`), evaluating and checkpointing on their schedules; returns
        summary.json's content. `resume`: continue from the newest valid checkpoint in output_dir."""
        self._check_inputs()
        with self._run_folder(resume), terminate_as_interrupt():
            self._setup(resume)  # optimizer, schedule, checkpoints, resume, log; an error here writes nothing
            with self._outcome() as outcome:  # from here on, any end writes summary.json
                windows = self._windows()
                self._emit("on_fit_start")
                if self.eval_cfg.at_start and self.global_step == 0:
                    self.evaluate_and_track()  # the untrained model: step 0 of the curves
                while not self._done():
                    window = next(windows)
                    if window.starts_epoch:
                        self._start_epoch()
                    result = self._step(window)
                    self._after_step(result)
                    if window.ends_epoch:
                        self._end_epoch()
                self._end()
        return outcome.summary

    def _step(self, window: Window) -> StepResult:
        """One optimizer step; a non-finite loss stops the run (nothing from that step is saved)."""
        t0 = time.perf_counter()
        try:
            result = self.step(window.batches, want_grad_norm=self._due(self.train_cfg.log_every, self.global_step + 1),
                               timed=self.meter.timed)
        except (RuntimeError, MemoryError) as e:
            err = _memory_error(e, self.global_step + 1, self.train_cfg)
            if err is e:
                raise
            raise err from e
        self.global_step += 1
        self.batch_in_epoch += len(window.batches)
        if not result.finite:
            raise TrainingDiverged(self._divergence_message(result), self.global_step)
        self.meter.add(float(result.loss_sum), float(result.targets), result.samples, result.tokens,
                       time.perf_counter() - t0 + window.data_s, window.data_s)
        return result

    def _after_step(self, result: StepResult) -> None:
        """The follow-ups of a step, each on its own schedule: progress, the train log, eval, checkpoint."""
        cfg = self.train_cfg
        self.progress.step()
        self._emit("on_optimizer_step")
        if self._due(cfg.log_every, self.global_step):
            self._log_train(result)
        if self.eval_data is not None and self.eval_cfg.every and self.global_step % self.eval_cfg.every == 0:
            self.evaluate_and_track()
        if cfg.checkpoints and cfg.checkpoint_every and self.global_step % cfg.checkpoint_every == 0 \
                and not self._done():  # the last step's checkpoint follows the final eval
            self.save_checkpoint()

    def _start_epoch(self) -> None:
        self.strategy.on_epoch_start(self.raw_model, self.epoch)
        self._set_train_mode()
        self._emit("on_epoch_start", self.epoch)

    def _end_epoch(self) -> None:
        self.epoch, self.batch_in_epoch = self.epoch + 1, 0
        if self._done():
            return
        if self.eval_data is not None and self.eval_cfg.every is None:
            self.evaluate_and_track()
        if self.train_cfg.checkpoints and not self.train_cfg.checkpoint_every:
            self.save_checkpoint()  # after the epoch's eval, so a resume keeps its best/ tracking

    def _end(self) -> None:
        """The end of training: the final eval, then the end checkpoint (`--resume` with a larger max_steps
        extends the run from it)."""
        if self.eval_data is not None and (self.last_eval is None or self.last_eval["step"] != self.global_step):
            self.evaluate_and_track()
        if self.train_cfg.checkpoints and self.checkpoints.steps()[-1:] != [self.global_step]:
            self.save_checkpoint()

    def _done(self) -> bool:
        cfg = self.train_cfg
        if self.should_stop:
            return True
        if cfg.max_steps is not None:
            return self.global_step >= cfg.max_steps
        return self.epoch >= cfg.epochs

    def _due(self, every: int, step: int) -> bool:
        return step % every == 0 or step == self.total_steps

    # -- setting the run up -----------------------------------------------------------------------------------
    def _check_inputs(self) -> None:
        if self.train_data is None or len(self.train_data) == 0:
            raise DataError("the training dataset is empty")
        for split, ds in (("train", self.train_data), ("eval", self.eval_data)):
            if ds is not None:
                self.task.check_dataset(ds, split)  # labels outside the task's classes: one clear error
        if self.eval_cfg.at_start and self.eval_data is None:
            raise ConfigError("`eval.at_start` = true needs evaluation data (an eval split)")

    def _run_folder(self, resume: bool) -> contextlib.AbstractContextManager:
        """The run folder is locked for the whole run (a second process on it gets a clear error), and a
        folder tunelab did not make, or that holds a run while resume is off, is refused."""
        if self.output_dir is None:
            return contextlib.nullcontext()
        return claim_run_dir(self.output_dir, resume=resume, main=self.is_main)

    def _setup(self, resume: bool) -> None:
        cfg = self.train_cfg
        torch.manual_seed(cfg.seed)
        if self.sharded:
            self._shard()  # before the optimizer: FSDP replaces the parameters by their shards
        self.optimizer = build_optimizer(self.raw_model, self.optim_cfg, self.lr_scales, self.device)
        self.sampler = self._train_sampler()
        if len(self.sampler) == 0:
            raise DataError(f"the training set ({len(self.train_data)} examples) gives no batch on this rank")
        self.total_steps = cfg.max_steps or math.ceil(len(self.sampler) / cfg.grad_accum) * cfg.epochs
        self.scheduler = build_scheduler(self.optimizer, self.schedule_cfg, self.total_steps)
        self.step.optimizer, self.step.scheduler = self.optimizer, self.scheduler
        if self.output_dir is not None:
            self.checkpoints = CheckpointManager(self.output_dir / "checkpoints", cfg.keep_last)
        if resume:
            path = resume_newest(self, self.checkpoints)
            if self.is_main:
                self._truncate_metrics()
                print(f"resumed from {path} (step {self.global_step})", file=sys.stderr)
        self._wrap_model()
        self._open_log(resume)
        self.progress = Progress(self._progress_mode(), self.total_steps, self.global_step)

    @property
    def _fast_dropout(self) -> bool:
        """tunelab's dropout takes the model's `nn.Dropout`s (`train.fast_dropout`, eager CPU runs)."""
        return self.train_cfg.fast_dropout and self.device.type == "cpu" and not self.train_cfg.compile

    @property
    def sharded(self) -> bool:
        """Parameters, gradients and optimizer state sharded over the ranks (`train.distributed.strategy: fsdp`)."""
        return self.dist.initialized and self.train_cfg.distributed.strategy == "fsdp"

    def _shard(self) -> None:
        """FSDP2 per transformer block and at the root (engine.fsdp); a model built on the meta device is
        materialised here and gets its weights shard by shard (`load_after_sharding`)."""
        from tunelab.engine import fsdp

        if hasattr(self.raw_model, "peft_config") and self.model_spec and not keeps_adapters(self.model_spec):
            raise ConfigError("LoRA on this model saves a merged model, which FSDP cannot gather yet; use "
                              "train.distributed.strategy=ddp, or full fine-tuning with fsdp")
        mesh = fsdp.device_mesh(self.dist, self.train_cfg.distributed, self.device)
        fsdp.shard(self.raw_model, mesh, self.train_cfg.distributed, self.autocast_dtype, self.train_cfg.compile)
        if any(p.is_meta for p in self.raw_model.parameters()):
            fsdp.materialize(self.raw_model, self.device)
            if self.load_after_sharding is not None:
                self.load_after_sharding(self.raw_model)
        self.log_on_start["fsdp"] = {"ranks": self.dist.world_size, "param_bytes_rank": fsdp.local_bytes(self.raw_model),
                                     "param_bytes_model": fsdp.param_bytes_full(self.raw_model)}

    def _wrap_model(self) -> None:
        if self._fast_dropout:
            swapped = use_fast_dropout(self.raw_model)
            if swapped:
                self.log_on_start["fast_dropout"] = swapped
        if self.sharded:
            self.step.model = self.model  # sharded (and compiled per block) in _shard
            return
        if self.train_cfg.compile:
            self.model = torch.compile(self.raw_model)
        if self.dist.enabled:
            self.model = nn.parallel.DistributedDataParallel(
                self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None
            )
        self.step.model = self.model
        self.step.use_threads(self.batch_threads)
        if self.batch_threads > 1:
            self.log_on_start["batch_threads"] = self.batch_threads

    def _train_sampler(self) -> ResumableBatchSampler:
        kw = dict(seed=self.train_cfg.seed, rank=self.dist.rank, world_size=self.dist.world_size)
        bs = self.train_cfg.batch_size
        if self.train_cfg.group_by_length:
            if self.train_lengths is None:
                raise ConfigError("`train.group_by_length` needs a data source that reports example lengths")
            return LengthGroupedBatchSampler(self.train_lengths, bs, **kw)
        return ResumableBatchSampler(len(self.train_data), bs, shuffle=True, **kw)

    def _windows(self) -> Windows:
        if self.batch_in_epoch >= len(self.sampler):  # a checkpoint taken after an epoch's last step
            self.epoch, self.batch_in_epoch = self.epoch + 1, 0
        loader = make_loader(self.train_data, self.sampler, self.collate_fn, self.train_cfg.seed,
                             self.train_cfg.num_workers, self.device.type == "cuda",
                             run_from=(self.epoch, self.batch_in_epoch),
                             worker_nice=self.train_cfg.resolved_worker_nice(self.device.type))
        return Windows(loader, len(self.sampler), self.train_cfg.grad_accum, self.batch_in_epoch)

    def _set_train_mode(self) -> None:
        self.model.train()
        self.strategy.on_train_mode(self.raw_model)

    def _progress_mode(self) -> str | bool:
        if not self.is_main or self.output_dir is None:
            return "off"
        return self.config.output.progress if self.config else "auto"

    # -- the outcome ------------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def _outcome(self) -> Iterator[_Outcome]:
        """Turns how the loop ended into summary.json: completed / stopped_early (or the `stop_status` a
        callback set) / diverged (the doctor) / failed / interrupted. Any error or Ctrl-C still writes the
        summary, then propagates."""
        outcome = _Outcome(time.perf_counter())
        try:
            yield outcome
        except TrainingDiverged as e:
            self.diverged = True
            self.log("diverged", message=str(e))
            outcome.summary = self._finish("failed", str(e), outcome.start)
            raise
        except (Exception, KeyboardInterrupt) as e:
            status = "interrupted" if isinstance(e, KeyboardInterrupt) else "failed"
            try:
                outcome.summary = self._finish(status, str(e) or type(e).__name__, outcome.start)
            except Exception as inner:  # never hide the original error behind a reporting one
                print(f"warning: could not write the run summary: {inner}", file=sys.stderr)
            raise
        else:
            status = (self.stop_status or "stopped_early") if self.should_stop else "completed"
            outcome.summary = self._finish(status, None, outcome.start)

    def _finish(self, status: str, error: str | None, start: float) -> dict[str, Any]:
        import signal
        import threading

        if threading.current_thread() is threading.main_thread():
            # the run is ending anyway: a SIGTERM now (torchrun stopping the ranks after one failed) must not
            # cut the summary's write short; terminate_as_interrupt restores the handler afterwards
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
        if self.progress is not None:
            self.progress.close()
        if status not in ("failed", "interrupted"):
            restored = any([bool(cb.on_train_end(self)) for cb in self.callbacks])  # e.g. early stopping
            if restored and self.eval_data is not None:
                self.last_eval = {"step": self.global_step, **self.evaluate()}
                self.log("eval", restored_best=True, **{k: v for k, v in self.last_eval.items() if k != "step"})
        summary: dict[str, Any] = {
            "status": status,
            "global_step": self.global_step,
            "epoch": self.epoch,
            "metrics": {k: v for k, v in (self.last_eval or {}).items() if k != "step"},
            "best": self.best,
            **self.meter.totals(),
            "wall_s": time.perf_counter() - start,
            "peak_rss_mb": peak_rss_mb(),
        }
        summary["time_breakdown"] = self.meter.breakdown(summary["wall_s"])
        if self.device.type == "cuda":
            summary["peak_gpu_mb"] = torch.cuda.max_memory_allocated(self.device) / 2**20
        if error:
            summary["error"] = error
        if self.stop_reason:
            summary["stop_reason"] = self.stop_reason
        if self.output_dir is not None and status not in ("failed", "interrupted"):
            self.save_model("final")  # before on_fit_end: trackers upload it there
        self._emit("on_fit_end", summary)  # the doctor may turn `completed` into `diverged`
        if self.is_main and self.output_dir is not None:
            self.log("end", **{k: v for k, v in summary.items() if k not in ("metrics", "best")})
            atomic_write_text(self.output_dir / "summary.json", json.dumps(summary, indent=2, default=float))
        self._close_log()
        return summary

    def _divergence_message(self, result: StepResult) -> str:
        steps = self.checkpoints.steps() if self.checkpoints is not None else []
        kept = [f"the last checkpoint (checkpoints/step-{steps[-1]})"] if steps else []
        if self.output_dir is not None and (self.output_dir / "best").is_dir():
            kept.append("best/")
        return (f"loss became {float(result.loss_sum)} at step {self.global_step}: the learning rate is likely "
                f"too high (lower optim.lr, add warmup or train.clip_grad_norm)"
                + (f"; {' and '.join(kept)} {'are' if len(kept) > 1 else 'is'} kept" if kept else ""))

    # -- logging ----------------------------------------------------------------------------------------------
    def log(self, event: str, **fields: Any) -> None:
        """Append one JSON object to metrics.jsonl (and scalars to TensorBoard), rank 0 only."""
        if not self.is_main or self._metrics_file is None:
            return
        record = {"event": event, "step": self.global_step, "epoch": self.epoch, "time": time.time(), **fields}
        self._metrics_file.write(json.dumps(record, default=float) + "\n")
        self._metrics_file.flush()
        if self._tb is not None:
            for k, v in fields.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
                    self._tb.add_scalar(f"{event}/{k}", v, self.global_step)

    def _log_train(self, result: StepResult) -> None:
        fields = self.meter.window_fields()
        if fields is None:
            return
        fields = {"loss": fields.pop("loss"), "lr": self.scheduler.get_last_lr()[0],
                  "grad_norm": float(result.grad_norm) if result.grad_norm is not None else float("nan"), **fields}
        self._emit("on_step_end", fields)
        self.log("train", **fields)
        self.progress.train(self.global_step, fields)

    def _open_log(self, resume: bool) -> None:
        if not self.is_main or self.output_dir is None:
            return
        # a fresh run starts its own log (a folder reused after a start that never trained keeps nothing)
        self._metrics_file = open(self.output_dir / "metrics.jsonl", "a" if resume else "w")
        self._tb = self._tensorboard()
        if resume:
            self.log("resume", **self.log_on_resume)
            if self.global_step >= self.total_steps:
                print(f"warning: nothing left to train: the checkpoint is at step {self.global_step} and "
                      f"the run has {self.total_steps} steps", file=sys.stderr)
        else:
            self.log("start", total_steps=self.total_steps, steps_per_epoch=math.ceil(len(self.sampler) / self.train_cfg.grad_accum),
                     train_examples=len(self.train_data), device=str(self.device),
                     precision=str(self.autocast_dtype or "fp32"), malloc=allocator.active(), **self.log_on_start)

    def _close_log(self) -> None:
        if self._metrics_file is not None:
            self._metrics_file.close()
            self._metrics_file = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None

    def _tensorboard(self):
        want = self.config.output.tensorboard if self.config else None
        if want is False:
            return None
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as e:
            if want:
                raise ConfigError("`output.tensorboard` = true needs tensorboard: pip install 'tunelab[tb]'") from e
            return None
        return SummaryWriter(str(self.output_dir / "tb"))

    def _truncate_metrics(self) -> None:
        """On resume, drop metrics.jsonl lines logged after the checkpoint (they will be logged again) and a
        line torn by a kill mid-write."""
        path = self.output_dir / "metrics.jsonl"
        if not path.is_file():
            return
        keep = []
        for line in path.read_text(errors="replace").splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue  # a torn or garbled line
            if isinstance(record, dict) and record.get("step", 0) <= self.global_step:
                keep.append(line)
        atomic_write_text(path, "".join(line + "\n" for line in keep))

    def _emit(self, hook: str, *args: Any) -> None:
        for cb in self.callbacks:
            getattr(cb, hook)(self, *args)

    # -- evaluation -------------------------------------------------------------------------------------------
    def evaluate(self, dataset: Dataset | None = None, max_batches: int | None = None) -> dict[str, Any]:
        """Streaming evaluation: metrics are updated batch by batch; no logits are kept."""
        dataset = dataset if dataset is not None else self.eval_data
        if dataset is None:
            raise TunelabError("no evaluation data: configure an eval split")
        loader = self._eval_loader if dataset is self.eval_data and self._eval_loader is not None else None
        if loader is None:
            loader = self._make_eval_loader(dataset)
        max_batches = max_batches or self.eval_cfg.max_batches
        metrics = self.task.metrics().to(self.device)
        was_training = self.model.training
        self.model.eval()
        real = getattr(loader, "real_batches", None)  # sharded: the batches past it only keep ranks in step
        with torch.inference_mode():
            for i, batch in enumerate(loader):
                if max_batches is not None and i >= max_batches:
                    break
                batch = to_device(batch, self.device)
                out, loss_sum = self.step.forward(batch)
                if real is None or i < real:
                    metrics.update(out, batch, loss_sum, self.task.count_targets(batch))
        metrics.sync()
        if was_training:
            self._set_train_mode()
        return metrics.compute()

    def _make_eval_loader(self, dataset: Dataset) -> DataLoader:
        bs = self.eval_cfg.batch_size or self.train_cfg.batch_size
        lengths = self.eval_lengths if dataset is self.eval_data else None
        sampler = (SortedEvalBatchSampler(lengths, bs) if lengths is not None
                   else ResumableBatchSampler(len(dataset), bs, shuffle=False))
        real = None
        if self.dist.enabled:  # each rank takes every world_size-th batch; metrics are all-reduced
            batches = sampler.epoch_batches()
            mine = batches[self.dist.rank :: self.dist.world_size]
            if self.sharded:  # every rank runs as many forwards (FSDP gathers weights in each): pad, uncounted
                real, want = len(mine), math.ceil(len(batches) / self.dist.world_size)
                mine += [batches[0]] * (want - real)
            sampler = FixedBatches(mine)
        loader = make_loader(dataset, sampler, self.collate_fn, seed=0, workers=self.train_cfg.num_workers,
                             pin_memory=self.device.type == "cuda",
                             worker_nice=self.train_cfg.resolved_worker_nice(self.device.type))
        loader.real_batches = real
        if dataset is self.eval_data:
            self._eval_loader = loader
        return loader

    def evaluate_and_track(self) -> dict[str, Any]:
        """Evaluate, log, keep best/ by `eval.monitor`, and tell the callbacks."""
        with self.meter.timed("eval"):
            metrics = self.evaluate()
        self.last_eval = {"step": self.global_step, **metrics}
        self.log("eval", **metrics)
        if self.progress is not None:
            self.progress.eval(self.global_step, metrics)
        if self.monitor:
            if self.monitor not in metrics:
                raise ConfigError(f"`eval.monitor` = {self.monitor!r} is not an eval metric; available: "
                                  f"{', '.join(k for k, v in metrics.items() if isinstance(v, (int, float)))}")
            value = float(metrics[self.monitor])
            if is_better(value, self.best["value"] if self.best else None, self.monitor_mode):
                self.best = {"metric": self.monitor, "value": value, "step": self.global_step}
                if self.output_dir is not None:
                    self.save_model("best")
                self.log("best", **self.best)
        self._emit("on_eval_end", metrics)
        return metrics

    # -- saving -----------------------------------------------------------------------------------------------
    def _poisoned(self, what: str) -> bool:
        """True (with a warning) when a weight, buffer or optimizer state holds a NaN/inf: such a state is
        never saved as a checkpoint or best/ (a BatchNorm running_var can overflow while the loss is finite).
        Sharded: every rank checks its shards and all agree."""
        state = dict(self.raw_model.state_dict())
        if self.optimizer is not None:
            for i, st in enumerate(self.optimizer.state.values()):
                state.update({f"optimizer.state[{i}].{k}": v for k, v in st.items() if isinstance(v, torch.Tensor)})
        bad = non_finite(state)
        if self.sharded:
            bad = bad if all_reduce_sum(torch.tensor(float(len(bad)))).item() == 0 else (bad or ["(on another rank)"])
        if bad and self.is_main:
            print(f"warning: step {self.global_step}: not saving {what}: {len(bad)} tensors hold NaN/inf "
                  f"(e.g. {bad[0]}); the earlier ones are kept", file=sys.stderr)
            self.log("skipped_save", what=what, non_finite=bad[:10])
        return bool(bad)

    def save_checkpoint(self) -> Path | None:
        """Write `checkpoints/step-N/` (the full training state) unless the state holds NaN/inf. Sharded runs
        write from every rank (DCP); others from rank 0."""
        if self.checkpoints is None or self.optimizer is None:
            raise TunelabError("save_checkpoint() needs a started run with an output_dir: call fit() "
                               "(checkpoints are written during it)")
        if (not self.sharded and not self.is_main) or self._poisoned("a checkpoint"):
            return None
        with self.meter.timed("checkpoint"):
            path = save_checkpoint(self, self.checkpoints)
        self.log("checkpoint", path=str(path))
        return path

    def _save_model_folder(self, folder: Path, state_dict: dict[str, torch.Tensor] | None = None) -> None:
        spec = self.model_spec
        if spec is None or spec.get("name") is None:  # a model of the user's own, built outside the registry
            folder.mkdir(parents=True, exist_ok=True)
            save_state_dict(state_dict if state_dict is not None else self.raw_model.state_dict(),
                            folder / "model.safetensors")
            spec = {"name": None, "class": type(self.raw_model).__qualname__}
            (folder / "tunelab_model.json").write_text(json.dumps(spec, indent=2))
            return
        model = self.strategy.model_to_save(self.raw_model, keeps_adapters(spec))
        save_model_folder(model, folder, spec, state_dict=state_dict)

    def save_model(self, name: str) -> Path | None:
        """Write `final/` or `best/` atomically (temporary folder, then rename); `best/` only from finite
        weights. Sharded: every rank sends its shards, rank 0 writes the ordinary folder every tool loads."""
        if name == "best" and self._poisoned("best/"):
            return None
        full = None
        if self.sharded:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

            full = get_model_state_dict(self.raw_model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
            first: dict[int, str] = {}  # tied weights gathered as copies: share them again, as savers expect
            for key, value in self.raw_model.state_dict(keep_vars=True).items():
                if key in full:
                    full[key] = full[first.setdefault(id(value), key)]
        if not self.is_main or self.output_dir is None:
            return None
        final = self.output_dir / name
        write_dir_atomically(final, lambda folder: self._save_model_folder(folder, full))
        return final


class _Outcome:
    def __init__(self, start: float):
        self.start = start
        self.summary: dict[str, Any] = {}
