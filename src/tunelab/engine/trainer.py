"""Step 5 and 6: the training loop and streaming evaluation.

One loop for every job. It reads top to bottom: build loaders -> (resume) -> for each optimizer step:
fetch the micro-batches of one accumulation window, count their targets, forward/backward each with the
loss divided by that total (so accumulation equals one big batch), clip, step, log, evaluate, checkpoint.
Features hang off callbacks; the loop itself stays short.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import resource
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from torch.utils.data import DataLoader, Dataset, Sampler

from tunelab import allocator
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
from tunelab.engine.callbacks import Callback, EarlyStopping, is_better
from tunelab.engine.checkpoint import (
    CheckpointManager,
    non_finite,
    rng_state,
    set_rng_state,
    torch_load,
    torch_save,
)
from tunelab.engine.distributed import DistInfo, all_reduce_sum, init_distributed
from tunelab.engine.rundir import claim_run_dir
from tunelab.errors import CheckpointError, ConfigError, DataError, TrainingDiverged, TunelabError
from tunelab.io import atomic_write_text, verify_folder, write_dir_atomically
from tunelab.models import save_model_folder
from tunelab.optim import build_optimizer, build_scheduler
from tunelab.tasks.base import Task
from tunelab.weights import load_state_dict_file, save_state_dict


def pick_device(name: str = "auto") -> torch.device:
    if name != "auto":
        return torch.device(name)
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def resolve_precision(precision: str, device: torch.device) -> torch.dtype | None:
    """Autocast dtype, or None for fp32. `auto`: bf16 on GPUs that support it, fp32 elsewhere."""
    if precision == "fp32" or (precision == "auto" and device.type != "cuda"):
        return None
    if precision == "auto":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if precision == "fp16" and device.type == "cpu":
        raise ConfigError("`train.precision` = 'fp16' is not supported on CPU; use bf16 or fp32")
    return torch.bfloat16 if precision == "bf16" else torch.float16


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def to_device(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    return batch


class _SeededSamples(Dataset):
    """Seeds the RNGs before each sample from (seed, epoch, index), so random augmentation in DataLoader
    workers is reproducible after a resume (worker RNG state cannot be checkpointed). The epoch travels
    inside the index (`epoch * len(dataset) + index`, see `_RunBatches`): workers live across epochs."""

    def __init__(self, dataset: Dataset, seed: int):
        self.dataset, self.seed, self.n = dataset, seed, len(dataset)

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, key: int) -> Any:
        import random

        import numpy as np

        epoch, index = divmod(key, self.n)
        s = (self.seed * 1_000_003 + epoch * 7_919 + index) % (2**31)
        # The CPU generator only: augmentation runs on CPU here. torch.manual_seed also seeds every
        # accelerator backend, ~60 us per call on a CUDA build, which cost ~8% of a ResNet-18 run's throughput.
        torch.default_generator.manual_seed(s)
        random.seed(s)
        np.random.seed(s)
        return self.dataset[index]


class _RunBatches(Sampler[list[int]]):
    """Every epoch's batches, one epoch after another, from (epoch, start) on: the one batch sampler of
    the training DataLoader, iterated once for the whole run. DataLoader workers therefore start once and
    keep prefetching across epoch boundaries (a loader iterated per epoch forks its workers again and
    waits for their first batch every epoch: ~3% of a ResNet-18 run on 2 CPU cores). With `tag`, each
    index carries its epoch (`epoch * n + index`) for `_SeededSamples`."""

    def __init__(self, sampler: ResumableBatchSampler, n: int, epoch: int, start: int, tag: bool):
        self.sampler, self.n, self.epoch, self.start, self.tag = sampler, n, epoch, start, tag

    def __iter__(self) -> Iterator[list[int]]:
        epoch, start = self.epoch, self.start
        while True:
            self.sampler.set_epoch(epoch, start=start)
            offset = epoch * self.n if self.tag else 0
            for batch in self.sampler:
                yield [offset + i for i in batch] if offset else batch
            epoch, start = epoch + 1, 0


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


def _seed_worker(worker_id: int) -> None:  # deterministic worker RNG before the per-sample reseed
    import random

    import numpy as np

    s = torch.initial_seed() % 2**31
    random.seed(s)
    np.random.seed(s)


class Trainer:
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
        strategy: Any = None,
        config: RunConfig | None = None,
        model_spec: dict[str, Any] | None = None,
    ):
        self.config = config
        self.optim_cfg = optim or (config.optim if config else OptimSection())
        self.schedule_cfg = schedule or (config.schedule if config else ScheduleSection())
        self.train_cfg = train or (config.train if config else TrainSection())
        self.eval_cfg = eval or (config.eval if config else EvalSection())
        es = early_stopping or (config.early_stopping if config else EarlyStoppingSection())
        self.output_dir = Path(output_dir) if output_dir else (config.output_dir if config else None)
        self.task = task
        self.train_data, self.eval_data = train_data, eval_data
        self.collate_fn = collate_fn or collate_dicts
        self.lr_scales = lr_scales
        self.train_lengths, self.eval_lengths = train_lengths, eval_lengths
        self.strategy = strategy
        self.model_spec = model_spec
        self.dist: DistInfo = init_distributed()
        self.device = pick_device(self.train_cfg.device)
        self.autocast_dtype = resolve_precision(self.train_cfg.precision, self.device)
        self.raw_model = model.to(self.device)
        self.model: nn.Module = self.raw_model
        self.callbacks: list[Callback] = list(callbacks)
        self.monitor = self.eval_cfg.monitor
        self.monitor_mode = self.eval_cfg.mode or (task.monitor_mode(self.monitor) if self.monitor else "max")
        if es.enabled:
            if eval_data is None:
                raise ConfigError("`early_stopping.enabled` = true needs evaluation data (an eval split)")
            monitor = es.monitor or self.monitor or task.default_monitor
            mode = es.mode or task.monitor_mode(monitor)
            self.callbacks.append(EarlyStopping(monitor, mode, es.patience, es.min_delta, es.restore_best))
        self.global_step = 0
        self.epoch = 0
        self.batch_in_epoch = 0
        self.should_stop = False
        self.stop_reason: str | None = None
        self.best: dict[str, Any] | None = None
        self.last_eval: dict[str, Any] | None = None
        self.optimizer: torch.optim.Optimizer | None = None
        self.scheduler: Any = None
        self._eval_loader: DataLoader | None = None
        self._metrics_file = None
        self._tb = None
        self.log_on_start: dict[str, Any] = {}
        self.log_on_resume: dict[str, Any] = {}  # e.g. the settings a resume changed (run.fit_run)
        self.diverged = False  # the run stopped on a non-finite loss (the doctor's divergence check)
        # What the training data was (file sizes and hashes, row counts): saved in checkpoints; a resume on
        # changed data is refused unless `allow_data_change` (then the resume event says what changed).
        self.data_fingerprint: dict[str, Any] = {"rows": {"train": len(train_data) if train_data is not None else 0,
                                                          "eval": len(eval_data) if eval_data is not None else 0}}
        self.allow_data_change = False
        self._ckpt: CheckpointManager | None = None
        self.scaler: torch.amp.GradScaler | None = None
        self._trainable_only = False
        self._window: dict[str, Any] = {}

    # -- small helpers ------------------------------------------------------------------------------------
    @property
    def is_main(self) -> bool:
        return self.dist.is_main

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

    def _autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def _set_train_mode(self) -> None:
        self.model.train()
        if self.strategy is not None and hasattr(self.strategy, "on_train_mode"):
            self.strategy.on_train_mode(self.raw_model)

    def _loader(self, dataset: Dataset, sampler: Sampler, seed: int, run_from: tuple[int, int] | None = None) -> DataLoader:
        """A DataLoader over `sampler`'s batches. With `run_from=(epoch, batch)`, the training loader: every
        epoch's batches from there on, one iterator for the run (`_RunBatches`). With workers, samples are
        reseeded from (seed, epoch, index) so augmentation resumes exactly (`_SeededSamples`)."""
        workers = self.train_cfg.num_workers
        if run_from is not None:
            sampler = _RunBatches(sampler, len(dataset), *run_from, tag=workers > 0)
        return DataLoader(
            _SeededSamples(dataset, seed) if workers > 0 else dataset,
            batch_sampler=sampler,
            collate_fn=self.collate_fn,
            num_workers=workers,
            pin_memory=self.device.type == "cuda",
            worker_init_fn=_seed_worker if workers > 0 else None,
            generator=torch.Generator().manual_seed(seed),  # keeps the global RNG untouched
        )

    def _train_sampler(self) -> ResumableBatchSampler:
        kw = dict(seed=self.train_cfg.seed, rank=self.dist.rank, world_size=self.dist.world_size)
        bs = self.train_cfg.batch_size
        if self.train_cfg.group_by_length:
            if self.train_lengths is None:
                raise ConfigError("`train.group_by_length` needs a data source that reports example lengths")
            return LengthGroupedBatchSampler(self.train_lengths, bs, **kw)
        return ResumableBatchSampler(len(self.train_data), bs, shuffle=True, **kw)

    def steps_per_epoch(self, sampler: ResumableBatchSampler) -> int:
        return math.ceil(len(sampler) / self.train_cfg.grad_accum)

    # -- evaluation -------------------------------------------------------------------------------------
    def evaluate(self, dataset: Dataset | None = None, max_batches: int | None = None) -> dict[str, Any]:
        """Streaming evaluation: metrics are updated batch by batch; no logits are kept."""
        dataset = dataset if dataset is not None else self.eval_data
        if dataset is None:
            raise TunelabError("no evaluation data: configure an eval split")
        if dataset is self.eval_data and self._eval_loader is not None:
            loader = self._eval_loader
        else:
            bs = self.eval_cfg.batch_size or self.train_cfg.batch_size
            kw = dict(rank=self.dist.rank, world_size=1)
            lengths = self.eval_lengths if dataset is self.eval_data else None
            sampler = (SortedEvalBatchSampler(lengths, bs, **kw) if lengths is not None
                       else ResumableBatchSampler(len(dataset), bs, shuffle=False, **kw))
            if self.dist.enabled:  # each rank takes every world_size-th batch; metrics are all-reduced
                batches = sampler.epoch_batches()[self.dist.rank :: self.dist.world_size]
                sampler = _FixedBatches(batches)
            loader = self._loader(dataset, sampler, seed=0)
            if dataset is self.eval_data:
                self._eval_loader = loader
        max_batches = max_batches or self.eval_cfg.max_batches
        metrics = self.task.metrics().to(self.device)
        was_training = self.model.training
        self.model.eval()
        with torch.inference_mode():
            for i, batch in enumerate(loader):
                if max_batches is not None and i >= max_batches:
                    break
                batch = to_device(batch, self.device)
                with self._autocast():
                    out = self.task.forward(self.model, batch)
                metrics.update(out, batch, self.task.loss_sum(out, batch), self.task.count_targets(batch))
        metrics.sync()
        if was_training:
            self._set_train_mode()
        return metrics.compute()

    # -- checkpoints ------------------------------------------------------------------------------------
    def _trainer_state(self) -> dict[str, Any]:
        return {
            "global_step": self.global_step,
            "epoch": self.epoch,
            "batch_in_epoch": self.batch_in_epoch,
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "rng": rng_state(),
            "best": json.dumps(self.best),
            "last_eval": json.dumps(self.last_eval, default=float),
            "window": self._window,
            "callbacks": [cb.state_dict() for cb in self.callbacks],
            "trainable_only": self._trainable_only,
            "data": json.dumps(self.data_fingerprint),
        }

    def _frozen_params(self) -> set[str]:
        return {n for n, p in self.raw_model.named_parameters(remove_duplicate=False) if not p.requires_grad}

    def _poisoned(self, what: str) -> bool:
        """True (with a warning) when a weight, buffer or optimizer state holds a NaN/inf: such a state is
        never saved as a checkpoint or best/ (a BatchNorm running_var can overflow while the loss is finite)."""
        state = dict(self.raw_model.state_dict())
        if self.optimizer is not None:
            for i, st in enumerate(self.optimizer.state.values()):
                state.update({f"optimizer.state[{i}].{k}": v for k, v in st.items() if isinstance(v, torch.Tensor)})
        bad = non_finite(state)
        if bad:
            msg = (f"step {self.global_step}: not saving {what}: {len(bad)} tensors hold NaN/inf "
                   f"(e.g. {bad[0]}); the earlier ones are kept")
            print(f"warning: {msg}", file=sys.stderr)
            self.log("skipped_save", what=what, non_finite=bad[:10])
        return bool(bad)

    def save_checkpoint(self) -> Path | None:
        """Write `checkpoints/step-N/` (full training state) unless the state holds NaN/inf."""
        if self._ckpt is None or self.optimizer is None:
            raise TunelabError("save_checkpoint() needs a started run: call fit() (checkpoints are written during it)")
        if not self.is_main or self._poisoned("a checkpoint"):
            return None
        frozen = self._frozen_params() if self._trainable_only else set()
        state = {k: v.detach().cpu() for k, v in self.raw_model.state_dict().items() if k not in frozen}
        path = self._ckpt.save(
            self.global_step,
            {
                "model.safetensors": lambda p: save_state_dict(state, p),
                "optimizer.pt": torch_save(self.optimizer.state_dict()),
                "trainer_state.pt": torch_save(self._trainer_state()),
            },
        )
        self.log("checkpoint", path=str(path))
        return path

    def _resume_newest(self) -> Path:
        """Resume from the newest checkpoint that verifies and loads; a damaged one (truncated, tampered,
        a pickle that is not weights-only) is reported and an older one is tried."""
        for path in self._ckpt.candidates():
            try:
                verify_folder(path)
                files = (torch_load(path / "trainer_state.pt"), load_state_dict_file(path / "model.safetensors", verified=True),
                         torch_load(path / "optimizer.pt"))
                if not isinstance(files[0], dict) or "global_step" not in files[0]:
                    raise CheckpointError(f"{path / 'trainer_state.pt'}: not a tunelab training state")
            except CheckpointError as e:
                print(f"warning: checkpoint {path.name} refused: {e}; falling back to an older one", file=sys.stderr)
                continue
            self._resume_from(path, *files)
            return path
        raise TunelabError(
            f"{self.output_dir}: no valid checkpoint to resume from (checkpoints are written every "
            "train.checkpoint_every steps, else at each epoch end, and at the end of the run; this run stopped "
            "before its first one, its checkpoints are damaged, or it had train.checkpoints=false); "
            "start it afresh with --overwrite"
        )

    def _check_data(self, saved: dict[str, Any] | None) -> None:
        """Refuse to resume on data that changed since the checkpoint (or note it with allow_data_change)."""
        from tunelab.data.base import fingerprint_changes

        changes = fingerprint_changes(saved or {}, self.data_fingerprint)
        if not changes:
            return
        if not self.allow_data_change:
            raise DataError(f"{changes[0]}; resume on the data the run started with, or pass --allow-data-change "
                            "to continue on the new data")
        print("warning: resuming on changed data: " + "; ".join(changes), file=sys.stderr)
        self.log_on_resume = {**self.log_on_resume, "data_changed": changes}

    def _resume_from(self, path: Path, state: dict[str, Any], weights: dict[str, torch.Tensor],
                     optim_state: dict[str, Any]) -> None:
        self._check_data(json.loads(state["data"]) if "data" in state else None)
        if state.get("trainable_only"):
            # Frozen base weights were not saved: they come from the pretrained source the run was rebuilt
            # from. Everything else must be there, and nothing unknown.
            missing, unexpected = self.raw_model.load_state_dict(weights, strict=False)
            bad = sorted(set(missing) - self._frozen_params()) + sorted(unexpected)
            if bad:
                raise TunelabError(f"{path}: the checkpoint does not fit this model (e.g. {bad[0]!r}); was the "
                                   f"run's model or strategy changed since it was saved?")
        else:
            self.raw_model.load_state_dict(weights)
        # The optimizer's settings (lr, weight decay, betas, momentum) are this run's, not the checkpoint's:
        # a resume with optim.lr=X trains at X (and the changed setting is logged), never only reports it.
        fresh = [{k: v for k, v in g.items() if k != "params"} for g in self.optimizer.param_groups]
        saved_keys = [set(g) - {"params"} for g in optim_state.get("param_groups", [])]
        if len(saved_keys) != len(fresh) or any(k != set(f) for k, f in zip(saved_keys, fresh)):
            raise TunelabError(f"{path}: the checkpoint's optimizer does not fit this run's (optim.name, "
                               "param_groups or the strategy changed); resume with the run's own settings")
        self.optimizer.load_state_dict(optim_state)
        for group, settings in zip(self.optimizer.param_groups, fresh):
            group.update(settings)
        self.scheduler.load_state_dict(state["scheduler"])
        self.scheduler.base_lrs = [g["initial_lr"] for g in fresh]
        # The next step's learning rate on this run's schedule (also when --resume extends max_steps).
        step = self.scheduler.last_epoch
        for group, base, fn in zip(self.optimizer.param_groups, self.scheduler.base_lrs, self.scheduler.lr_lambdas):
            group["lr"] = base * fn(step)
        self.scheduler._last_lr = [g["lr"] for g in self.optimizer.param_groups]
        if self.scaler is not None and state["scaler"]:
            self.scaler.load_state_dict(state["scaler"])
        self.global_step, self.epoch = state["global_step"], state["epoch"]
        self.batch_in_epoch = state["batch_in_epoch"]
        self.best = json.loads(state["best"])
        self.last_eval = json.loads(state.get("last_eval", "null"))
        self._window = state["window"]
        for cb, cb_state in zip(self.callbacks, state["callbacks"]):
            cb.load_state_dict(cb_state)
        set_rng_state(state["rng"])

    def _save_model_folder(self, folder: Path) -> None:
        spec = self.model_spec or {"name": None, "class": type(self.raw_model).__qualname__}
        if spec.get("name") is None:
            folder.mkdir(parents=True, exist_ok=True)
            save_state_dict(self.raw_model.state_dict(), folder / "model.safetensors")
            (folder / "tunelab_model.json").write_text(json.dumps(spec, indent=2))
        else:
            save_model_folder(self.raw_model, folder, spec)

    def save_model(self, name: str) -> Path | None:
        """Write `final/` or `best/` atomically (temporary folder, then rename); `best/` only from finite weights."""
        if name == "best" and self._poisoned("best/"):
            return None
        final = self.output_dir / name
        write_dir_atomically(final, self._save_model_folder)
        return final

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

    # -- the loop -------------------------------------------------------------------------------------------
    def _micro_batches(self, it: Iterator, n: int) -> tuple[list[Any], float]:
        t0 = time.perf_counter()
        batches = [next(it) for _ in range(n)]
        return batches, time.perf_counter() - t0

    def _optimizer_step(self, micro: list[dict[str, Any]]) -> tuple[torch.Tensor, torch.Tensor]:
        """One optimizer step over an accumulation window. Returns (loss sum, target count)."""
        micro = [to_device(b, self.device) for b in micro]
        counts = [self.task.count_targets(b) for b in micro]
        total = all_reduce_sum(torch.stack(counts).sum().to(self.device).float())
        if total.item() <= 0:
            raise DataError(f"step {self.global_step + 1}: the batch has no targets (all labels ignored?)")
        # DDP averages gradients over ranks; multiplying by world size makes the result sum/total.
        scale = self.dist.world_size / total
        loss_sum = torch.zeros((), device=self.device)
        for i, batch in enumerate(micro):
            sync = i == len(micro) - 1 or not isinstance(self.model, nn.parallel.DistributedDataParallel)
            with (contextlib.nullcontext() if sync else self.model.no_sync()), self._autocast():
                out = self.task.forward(self.model, batch)
                part = self.task.loss_sum(out, batch)
            loss = part * scale
            (self.scaler.scale(loss) if self.scaler is not None else loss).backward()
            loss_sum += part.detach()
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        if self.train_cfg.clip_grad_norm:
            self._grad_norm = torch.nn.utils.clip_grad_norm_(self._params, self.train_cfg.clip_grad_norm)
        elif self._will_log(self.global_step + 1):  # only logged steps pay for the norm
            self._grad_norm = torch.nn.utils.get_total_norm([p.grad for p in self._params if p.grad is not None])
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        return loss_sum, total

    def fit(self, resume: bool = False) -> dict[str, Any]:
        if self.train_data is None or len(self.train_data) == 0:
            raise DataError("the training dataset is empty")
        if self.output_dir is None:
            raise ConfigError("the Trainer needs an output_dir")
        for split, ds in (("train", self.train_data), ("eval", self.eval_data)):
            if ds is not None:
                self.task.check_dataset(ds, split)  # labels outside the task's classes: one clear error
        # The run folder is locked for the whole run (a second process on it gets a clear error), and a folder
        # that tunelab did not make, or that holds a run while resume is off, is refused.
        with claim_run_dir(self.output_dir, resume=resume, main=self.is_main), terminate_as_interrupt():
            return self._fit(resume)

    def _fit(self, resume: bool) -> dict[str, Any]:
        cfg = self.train_cfg
        torch.manual_seed(cfg.seed)
        self._params = [p for p in self.raw_model.parameters()]
        self.optimizer = build_optimizer(self.raw_model, self.optim_cfg, self.lr_scales, self.device)
        sampler = self._train_sampler()
        if len(sampler) == 0:
            raise DataError(f"the training set ({len(self.train_data)} examples) gives no batch on this rank")
        steps_per_epoch = self.steps_per_epoch(sampler)
        self.total_steps = cfg.max_steps or steps_per_epoch * cfg.epochs
        self.scheduler = build_scheduler(self.optimizer, self.schedule_cfg, self.total_steps)
        self.scaler = torch.amp.GradScaler(self.device.type) if self.autocast_dtype == torch.float16 else None
        self._ckpt = CheckpointManager(self.output_dir / "checkpoints", cfg.keep_last)
        # LoRA-style strategies: checkpoints hold the trainable weights (and buffers), not the frozen base.
        self._trainable_only = bool(getattr(self.strategy, "checkpoint_trainable_only", False))
        self._grad_norm = torch.zeros(())
        self._window = {"loss": 0.0, "targets": 0.0, "samples": 0, "tokens": 0, "time": 0.0, "data": 0.0, "steps": 0}
        if resume:
            path = self._resume_newest()
            if self.is_main:
                self._truncate_metrics()
                print(f"resumed from {path} (step {self.global_step})", file=sys.stderr)
        if cfg.compile:
            self.model = torch.compile(self.raw_model)
        if self.dist.enabled:
            self.model = nn.parallel.DistributedDataParallel(
                self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None
            )
        if self.is_main:
            # a fresh run starts its own log (a folder reused after a start that never trained keeps nothing)
            self._metrics_file = open(self.output_dir / "metrics.jsonl", "a" if resume else "w")
            self._tb = self._tensorboard()
            if resume:
                self.log("resume", **self.log_on_resume)
                if self.global_step >= self.total_steps:
                    print(f"warning: nothing left to train: the checkpoint is at step {self.global_step} and "
                          f"the run has {self.total_steps} steps", file=sys.stderr)
        return self._run(sampler, steps_per_epoch)

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

    def _run(self, sampler: ResumableBatchSampler, steps_per_epoch: int) -> dict[str, Any]:
        cfg = self.train_cfg
        start_wall = time.perf_counter()
        train_time, samples, tokens, status, error = 0.0, 0, 0, "completed", None
        has_tokens = False
        eval_each_epoch = self.eval_cfg.every is None
        for cb in self.callbacks:
            cb.on_fit_start(self)
        if self.global_step == 0:
            self.log("start", total_steps=self.total_steps, steps_per_epoch=steps_per_epoch,
                     train_examples=len(self.train_data), device=str(self.device),
                     precision=str(self.autocast_dtype or "fp32"), malloc=allocator.active(),
                     **self.log_on_start)
        progress = self._progress_bar()
        loader = self._loader(self.train_data, sampler, seed=cfg.seed, run_from=(self.epoch, self.batch_in_epoch))
        it = iter(loader)  # one iterator for the run
        epoch_batches = len(sampler)
        self._set_train_mode()
        try:
            while not self._done():
                left = epoch_batches - self.batch_in_epoch  # batches still to come in this epoch
                if self.strategy is not None:
                    self.strategy.on_epoch_start(self.raw_model, self.epoch)
                    self._set_train_mode()
                for cb in self.callbacks:
                    cb.on_epoch_start(self, self.epoch)
                while not self._done() and left > 0:
                    t0 = time.perf_counter()
                    micro, data_s = self._micro_batches(it, min(left, cfg.grad_accum))
                    left -= len(micro)
                    self.batch_in_epoch += len(micro)
                    try:
                        loss_sum, n = self._optimizer_step(micro)
                    except (RuntimeError, MemoryError) as e:
                        err = _memory_error(e, self.global_step + 1, self.train_cfg)
                        if err is e:
                            raise
                        raise err from e
                    self.global_step += 1
                    if not torch.isfinite(loss_sum):
                        kept = [name for name, there in (
                            (f"the last checkpoint (checkpoints/step-{(self._ckpt.steps() or [0])[-1]})",
                             bool(self._ckpt.steps())),
                            ("best/", (self.output_dir / "best").is_dir())) if there]
                        raise TrainingDiverged(
                            f"loss became {float(loss_sum)} at step {self.global_step}: the learning rate is "
                            f"likely too high (lower optim.lr, add warmup or train.clip_grad_norm)"
                            + (f"; {' and '.join(kept)} {'are' if len(kept) > 1 else 'is'} kept" if kept else ""),
                            self.global_step)
                    n_samples = sum(self.task.batch_size(b) for b in micro)
                    n_tokens = [self.task.count_tokens(b) for b in micro]
                    has_tokens = has_tokens or n_tokens[0] is not None
                    step_s = time.perf_counter() - t0
                    train_time += step_s
                    samples += n_samples
                    tokens += sum(t or 0 for t in n_tokens)
                    self._accumulate(float(loss_sum), float(n), n_samples, sum(t or 0 for t in n_tokens),
                                     step_s, data_s)
                    if progress is not None:
                        progress.update(1)
                    if self._will_log(self.global_step):
                        self._log_train(progress, has_tokens)
                    if self.eval_data is not None and self.eval_cfg.every and (
                        self.global_step % self.eval_cfg.every == 0
                    ):
                        self._evaluate_and_track()
                    if (cfg.checkpoints and cfg.checkpoint_every and self.global_step % cfg.checkpoint_every == 0
                            and not self._done()):  # the last step's checkpoint follows the final eval
                        self.save_checkpoint()
                    if self.should_stop:
                        break
                if self._done():
                    break
                # end of the epoch
                self.epoch += 1
                self.batch_in_epoch = 0
                if self.eval_data is not None and eval_each_epoch and not self._done():
                    self._evaluate_and_track()
                if cfg.checkpoints and not cfg.checkpoint_every and not self._done():
                    self.save_checkpoint()  # after the epoch's eval, so a resume keeps its best/ tracking
            if self.eval_data is not None and (self.last_eval is None or self.last_eval["step"] != self.global_step):
                self._evaluate_and_track()  # the end-of-run eval, before the end checkpoint records it
            if cfg.checkpoints and self._ckpt.steps()[-1:] != [self.global_step]:
                self.save_checkpoint()  # the end state: `--resume` with a larger max_steps extends the run
        except TrainingDiverged as e:
            status, error = "failed", str(e)
            self.diverged = True
            self.log("diverged", message=str(e))
        except (Exception, KeyboardInterrupt) as e:
            # Any other stop: summary.json and the report still say how far the run got, then it propagates.
            if progress is not None:
                progress.close()
                progress = None
            status = "interrupted" if isinstance(e, KeyboardInterrupt) else "failed"
            try:
                self._finish(status, str(e) or type(e).__name__, start_wall, train_time, samples,
                             tokens if has_tokens else None)
            except Exception as inner:  # never hide the original error behind a reporting one
                print(f"warning: could not write the run summary: {inner}", file=sys.stderr)
            raise
        finally:
            if progress is not None:
                progress.close()
        if status == "completed" and self.should_stop:
            status = "stopped_early"
        summary = self._finish(status, error, start_wall, train_time, samples, tokens if has_tokens else None)
        if error is not None:
            raise TrainingDiverged(error, self.global_step)
        return summary

    def _will_log(self, step: int) -> bool:
        return step % self.train_cfg.log_every == 0 or step == self.total_steps

    def _done(self) -> bool:
        cfg = self.train_cfg
        if self.should_stop:
            return True
        if cfg.max_steps is not None:
            return self.global_step >= cfg.max_steps
        return self.epoch >= cfg.epochs

    def _progress_bar(self):
        show = self.is_main and (self.config.output.progress if self.config else True)
        if not show:
            return None
        from tqdm.auto import tqdm

        return tqdm(total=self.total_steps, initial=self.global_step, desc="train", unit="step",
                    dynamic_ncols=True, file=sys.stderr, disable=not sys.stderr.isatty())

    def _accumulate(self, loss: float, n: float, samples: int, tokens: int, step_s: float, data_s: float):
        w = self._window
        w["loss"] += loss
        w["targets"] += n
        w["samples"] += samples
        w["tokens"] += tokens
        w["time"] += step_s
        w["data"] += data_s
        w["steps"] += 1

    def _log_train(self, progress, has_tokens: bool) -> None:
        w = self._window
        if not w["steps"]:
            return
        loss = w["loss"] / max(w["targets"], 1e-12)
        lr = self.scheduler.get_last_lr()[0]
        fields = {
            "loss": loss,
            "lr": lr,
            "grad_norm": float(self._grad_norm),
            "samples_per_s": w["samples"] / max(w["time"], 1e-9),
            "step_time_s": w["time"] / w["steps"],
            "data_wait_frac": w["data"] / max(w["time"], 1e-9),
        }
        if has_tokens:
            fields["tokens_per_s"] = w["tokens"] / max(w["time"], 1e-9)
        for cb in self.callbacks:
            cb.on_step_end(self, fields)
        self.log("train", **fields)
        if progress is not None:
            progress.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}",
                                 sps=f"{fields['samples_per_s']:.0f}", refresh=False)
        self._window = {k: 0.0 if isinstance(v, float) else 0 for k, v in w.items()}

    def _evaluate_and_track(self) -> dict[str, Any]:
        metrics = self.evaluate()
        self.last_eval = {"step": self.global_step, **metrics}
        self.log("eval", **metrics)
        if self.monitor:
            if self.monitor not in metrics:
                raise ConfigError(f"`eval.monitor` = {self.monitor!r} is not an eval metric; available: "
                                  f"{', '.join(k for k, v in metrics.items() if isinstance(v, (int, float)))}")
            value = float(metrics[self.monitor])
            if is_better(value, self.best["value"] if self.best else None, self.monitor_mode):
                self.best = {"metric": self.monitor, "value": value, "step": self.global_step}
                if self.is_main:
                    self.save_model("best")
                self.log("best", **self.best)
        for cb in self.callbacks:
            cb.on_eval_end(self, metrics)
        return metrics

    def _finish(self, status: str, error: str | None, start_wall: float, train_time: float, samples: int,
                tokens: int | None) -> dict[str, Any]:
        restored = False
        for cb in self.callbacks:
            restored = bool(cb.on_train_end(self)) or restored  # e.g. early stopping restores best weights
        if status not in ("failed", "interrupted") and self.eval_data is not None:
            if restored:
                self.last_eval = {"step": self.global_step, **self.evaluate()}
                self.log("eval", restored_best=True, **{k: v for k, v in self.last_eval.items() if k != "step"})
            elif self.last_eval is None or self.last_eval["step"] != self.global_step:
                self._evaluate_and_track()
        summary: dict[str, Any] = {
            "status": status,
            "global_step": self.global_step,
            "epoch": self.epoch,
            "metrics": {k: v for k, v in (self.last_eval or {}).items() if k != "step"},
            "best": self.best,
            "train_samples_per_s": samples / train_time if train_time else None,
            "train_tokens_per_s": tokens / train_time if (tokens is not None and train_time) else None,
            "wall_s": time.perf_counter() - start_wall,
            "peak_rss_mb": peak_rss_mb(),
        }
        if self.device.type == "cuda":
            summary["peak_gpu_mb"] = torch.cuda.max_memory_allocated(self.device) / 2**20
        if error:
            summary["error"] = error
        if self.stop_reason:
            summary["stop_reason"] = self.stop_reason
        for cb in self.callbacks:
            cb.on_fit_end(self, summary)
        if self.is_main:
            if status not in ("failed", "interrupted"):
                self.save_model("final")
            self.log("end", **{k: v for k, v in summary.items() if k not in ("metrics", "best")})
            atomic_write_text(self.output_dir / "summary.json", json.dumps(summary, indent=2, default=float))
            if self._metrics_file is not None:
                self._metrics_file.close()
                self._metrics_file = None
            if self._tb is not None:
                self._tb.close()
        return summary


class _FixedBatches(ResumableBatchSampler):
    def __init__(self, batches: list[list[int]]):
        super().__init__(sum(map(len, batches)), 1, shuffle=False)
        self._batches = batches

    def epoch_batches(self) -> list[list[int]]:
        return self._batches
