"""One training step, written once: the Trainer, the LR finder, auto batch size and the plan's measuring
probe all call it.

Forward each micro-batch of the accumulation window under the run's precision, take the *summed* loss
over its targets, divide by the number of targets in the whole window across all ranks (so `batch 4 x
accumulation 2` gives the update of `batch 8` even when micro-batches hold different numbers of targets),
backward, then unscale (fp16), clip, step the optimizer and the schedule, and say whether the loss was
finite.
"""

from __future__ import annotations

import contextlib
import os
import threading
import weakref
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn

from tunelab.config import TrainSection
from tunelab.engine.distributed import all_reduce_sum
from tunelab.errors import ConfigError, DataError
from tunelab.models.dropout import has_dropout, mask_generator, shared_generator_dropout
from tunelab.weights import unwrap_model

Batch = dict[str, Any]


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


def to_device(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    return batch


def resolve_batch_threads(setting: int | str, model: nn.Module, task: Any, device: torch.device, *, compiled: bool,
                          distributed: bool, fast_dropout: bool = True) -> int:
    """`train.batch_threads` for this run: `auto` resolved, and a number above 1 refused where sharding the
    micro-batch over threads would change the math or cannot work (ConfigError naming the key).
    `fast_dropout`: whether the run will swap in tunelab's dropout (`train.fast_dropout` on CPU), whose
    masks each shard thread draws from its own generator."""
    if setting == 1:
        return 1
    refused = None
    if device.type != "cpu":
        refused = f"it is for CPU training (this run is on {device.type})"
    elif distributed:
        refused = "it is for one process without DDP or FSDP (under torchrun each rank trains its own shard)"
    elif compiled:
        refused = "a torch.compile'd model runs in one thread (set train.compile=false)"
    elif any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()):
        refused = "the model has BatchNorm, which would normalise each thread's shard on its own"
    elif shared := shared_generator_dropout(model, fast_dropout):
        refused = (f"{shared}, so masks would depend on thread timing and activation checkpointing could "
                   "recompute with another thread's masks (train.fast_dropout=true, or p=0, lifts it)")
    else:
        refused = task.shard_refusal(model)
    if setting == "auto":
        # a model of the user's own may checkpoint without `replaying_masks`; with dropout only known ones
        known = type(unwrap_model(model)).__module__.split(".")[0] in ("tunelab", "transformers", "peft")
        return 1 if refused or (has_dropout(model) and not known) else max(1, min(torch.get_num_threads(), 8))
    if refused:
        raise ConfigError(f"`train.batch_threads` = {setting} cannot be used here: {refused}; set it to 1 or auto")
    return int(setting)


def _cuttable(v: Any) -> bool:
    return isinstance(v, list) or (isinstance(v, torch.Tensor) and v.dim() > 0)


def split_batch(batch: Batch, n: int) -> list[Batch]:
    """`batch` cut into at most `n` shards along its first dimension (tensors and lists of the batch's
    length are cut, other values are shared); a batch of one example, or one it cannot cut, stays whole."""
    sizes = {len(v) for v in batch.values() if _cuttable(v)}
    if len(sizes) != 1 or (rows := sizes.pop()) < 2 or n < 2:
        return [batch]
    bounds = [rows * i // min(n, rows) for i in range(min(n, rows) + 1)]
    return [{k: v[a:b] if _cuttable(v) else v for k, v in batch.items()} for a, b in zip(bounds, bounds[1:])]


class ShardThreads:
    """`n` long-lived threads, each with one intra-op thread, that run forward and backward on one shard of a
    micro-batch each (`train.batch_threads`). The caller's own intra-op thread count is kept."""

    def __init__(self, n: int):
        self.n, self.pool = n, ThreadPoolExecutor(n, thread_name_prefix="tunelab-shard")
        weakref.finalize(self, self.pool.shutdown, wait=False)  # the threads end with the step that owns them
        ready, before = threading.Barrier(n + 1), torch.get_num_threads()

        def one_thread() -> None:
            torch.get_num_threads()  # ATen sets up this thread's OpenMP count now, not later from the restored one
            torch.set_num_threads(1)
            ready.wait()

        for _ in range(n):
            self.pool.submit(one_thread)
        ready.wait()
        torch.set_num_threads(before)  # set_num_threads also moved the process-wide default

    def map(self, fn: Callable[[Batch], Any], shards: list[Batch]) -> list[Any]:
        return [f.result() for f in [self.pool.submit(fn, b) for b in shards]]


@contextlib.contextmanager
def intra_op_threads(n: int) -> Iterator[None]:
    """This thread's intra-op thread count set to `n` for the block."""
    before = torch.get_num_threads()
    if before == n:
        yield
        return
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def add_grads(params: list[nn.Parameter], grads: tuple[torch.Tensor | None, ...]) -> None:
    """Add one shard's gradients into `.grad`, as backward's AccumulateGrad would. A gradient becomes a
    `.grad` as it is only when it has its parameter's layout and no other parameter's `.grad` shares its
    memory (`a + b` hands both the same tensor, and clipping and the next shard's add work in place);
    otherwise it is copied."""
    acc, new, taken = [], [], set()
    for p, g in zip(params, grads):
        if g is None:
            continue
        if p.grad is None:
            memory = g.untyped_storage().data_ptr()
            if g.stride() != p.stride() or memory in taken:
                g = torch.empty_like(p).copy_(g)
            taken.add(g.untyped_storage().data_ptr())
            p.grad = g
        else:
            acc.append(p.grad)
            new.append(g)
    if acc:
        torch._foreach_add_(acc, new)


@dataclass
class StepResult:
    loss_sum: torch.Tensor  # summed loss over the window's targets across all ranks (detached)
    targets: torch.Tensor  # targets in the window across all ranks
    grad_norm: torch.Tensor | None  # the total gradient norm (when clipping, or when asked for)
    samples: int = 0  # examples in the window across all ranks
    tokens: int | None = None  # non-padding tokens in the window across all ranks; None without tokens

    @property
    def finite(self) -> bool:
        return bool(torch.isfinite(self.loss_sum))


class TrainStep:
    """Forward/backward over an accumulation window and the optimizer update, for `model` (possibly
    compiled or DDP-wrapped) and `task`. Without an optimizer it still forwards (evaluation, probes)."""

    def __init__(self, model: nn.Module, task: Any, device: torch.device, *, autocast_dtype: torch.dtype | None = None,
                 optimizer: torch.optim.Optimizer | None = None, scheduler: Any = None,
                 clip_grad_norm: float | None = None, world_size: int = 1):
        self.model, self.task, self.device = model, task, device
        self.autocast_dtype, self.optimizer, self.scheduler = autocast_dtype, optimizer, scheduler
        self.clip_grad_norm, self.world_size = clip_grad_norm, world_size
        self.threads: ShardThreads | None = None  # `use_threads(n)`: each micro-batch in n shards at once
        self.mask_seeds = False  # each shard's dropout masks from its own generator (models/dropout.py)
        # fp16 needs loss scaling; bf16 and fp32 do not
        self.scaler = torch.amp.GradScaler(device.type) if autocast_dtype == torch.float16 else None

    @classmethod
    def for_run(cls, model: nn.Module, task: Any, train: TrainSection, device: torch.device | None = None,
                **kw: Any) -> TrainStep:
        """A step with a run's device and precision (`train.device`, `train.precision`, `clip_grad_norm`)."""
        device = device or pick_device(train.device)
        return cls(model, task, device, autocast_dtype=resolve_precision(train.precision, device),
                   clip_grad_norm=train.clip_grad_norm, **kw)

    def use_threads(self, n: int) -> None:
        """Run each micro-batch as `n` shards in `n` threads (`resolve_batch_threads` says where that is
        allowed); 1: the whole micro-batch in the calling thread. A model with dropout gets one mask seed
        per shard, drawn in shard order from torch's generator (so `train.seed` and resume replay them)."""
        if n <= 1:
            self.threads = None
        elif self.threads is None or self.threads.n != n:
            self.threads = ShardThreads(n)
        self.mask_seeds = n > 1 and has_dropout(self.model)

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def forward(self, batch: Batch) -> tuple[Any, torch.Tensor]:
        """(outputs, summed loss) of one micro-batch already on the device, under the run's precision."""
        with self.autocast():
            out = self.task.forward(self.model, batch)
            return out, self.task.loss_sum(out, batch)

    def _no_sync(self, last: bool) -> contextlib.AbstractContextManager:
        """DDP all-reduces (FSDP reduce-scatters) gradients only on the window's last backward."""
        if hasattr(self.model, "set_requires_gradient_sync"):  # an FSDP2 module
            self.model.set_requires_gradient_sync(last)
            return contextlib.nullcontext()
        if last or not isinstance(self.model, nn.parallel.DistributedDataParallel):
            return contextlib.nullcontext()
        return self.model.no_sync()

    def backward(self, micro: list[Batch]) -> tuple[torch.Tensor, torch.Tensor]:
        """Forward and backward over the window: the gradient is that of (summed loss) / (targets in the
        window across ranks). Returns (loss sum on this rank, total targets); `__call__` sums the loss
        over ranks."""
        micro = [to_device(b, self.device) for b in micro]
        counts = [self.task.count_targets(b) for b in micro]
        total = all_reduce_sum(torch.stack(counts).sum().to(self.device).float())
        if total.item() <= 0:
            raise DataError("a batch has no targets (are all its labels ignored?)")
        scale = self.world_size / total  # DDP and FSDP average gradients over ranks; this makes it sum / total
        loss_sum = torch.zeros((), device=self.device)
        if self.threads is not None:
            return self._backward_threaded(micro, scale, loss_sum), total
        for i, batch in enumerate(micro):
            with self._no_sync(i == len(micro) - 1):
                _, part = self.forward(batch)
                loss = part * scale
                (self.scaler.scale(loss) if self.scaler is not None else loss).backward()
            loss_sum += part.detach()
        return loss_sum, total

    def _backward_threaded(self, micro: list[Batch], scale: torch.Tensor, loss_sum: torch.Tensor) -> torch.Tensor:
        """`backward` with each micro-batch's shards in the shard threads. Each thread takes the gradient of its
        shard's loss with `autograd.grad`, and they are added into `.grad` in shard order, so the result does not
        depend on which thread finishes first."""
        params = [p for p in self.model.parameters() if p.requires_grad]

        def shard_grads(job: tuple[Batch, int | None]) -> tuple[torch.Tensor, tuple[torch.Tensor | None, ...]]:
            batch, seed = job
            with mask_generator(seed) if seed is not None else contextlib.nullcontext():
                _, part = self.forward(batch)
                return part.detach(), torch.autograd.grad(part * scale, params, allow_unused=True)

        for batch in micro:
            shards = split_batch(batch, self.threads.n)
            seeds = torch.randint(0, 2**63 - 1, (len(shards),)).tolist() if self.mask_seeds else [None] * len(shards)
            for part, grads in self.threads.map(shard_grads, list(zip(shards, seeds))):
                add_grads(params, grads)
                loss_sum += part
        return loss_sum

    def update(self, want_grad_norm: bool = False) -> torch.Tensor | None:
        """Unscale (fp16), clip, optimizer step, zero the gradients, schedule step. Returns the gradient
        norm when clipping or when asked for (it costs a pass over the gradients)."""
        params = [p for p in self.model.parameters() if p.grad is not None]
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        norm = None
        if self.clip_grad_norm:
            norm = torch.nn.utils.clip_grad_norm_(params, self.clip_grad_norm)
        elif want_grad_norm:
            norm = torch.nn.utils.get_total_norm([p.grad for p in params])
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.scheduler is not None:
            self.scheduler.step()
        if hasattr(norm, "full_tensor"):  # sharded parameters: the norm is a DTensor over all ranks
            norm = norm.full_tensor()
        return norm

    def __call__(self, micro: list[Batch], want_grad_norm: bool = False,
                 timed: Callable[[str], contextlib.AbstractContextManager] | None = None) -> StepResult:
        """One optimizer step over the window `micro`. `timed(phase)`, when given, times the two phases
        ("forward_backward", "optimizer"; the Trainer's Meter)."""
        timed = timed or (lambda phase: contextlib.nullcontext())
        # with shard threads this thread only waits, then updates: one intra-op thread here, so that no idle
        # OpenMP team of this thread spins on the cores the shard threads need (measured: ~15% of a step)
        with intra_op_threads(1) if self.threads is not None else contextlib.nullcontext():
            with timed("forward_backward"):
                loss_sum, total = self.backward(micro)
            with timed("optimizer"):
                norm = self.update(want_grad_norm)
        samples = sum(self.task.batch_size(b) for b in micro)
        tokens = [self.task.count_tokens(b) for b in micro]
        n_tokens = None if tokens[0] is None else sum(t or 0 for t in tokens)
        if self.world_size > 1:
            # one collective for the log's figures: this rank's loss sum over the targets of all ranks would
            # read as loss / world_size, and a loss that is non-finite on one rank must stop every rank
            figures = torch.stack([loss_sum.float(), torch.tensor(float(samples), device=loss_sum.device),
                                torch.tensor(float(n_tokens or 0), device=loss_sum.device)])
            reduced = all_reduce_sum(figures)
            loss_sum, (samples, all_tokens) = reduced[0], map(int, reduced[1:].tolist())  # one host sync
            n_tokens = None if n_tokens is None else all_tokens
        return StepResult(loss_sum, total, norm, samples, n_tokens)


@contextlib.contextmanager
def restored(model: nn.Module, *optimizers: torch.optim.Optimizer | None) -> Iterator[None]:
    """Trial steps that must leave no trace: the model's weights, train/eval mode and trainable flags, the
    optimizers' state and the CPU RNG are put back afterwards (the LR finder, auto batch size)."""
    import copy

    weights = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    states = [copy.deepcopy(o.state_dict()) if o is not None else None for o in optimizers]
    rng, training = torch.get_rng_state(), model.training
    try:
        yield
    finally:
        model.load_state_dict(weights)
        for n, p in model.named_parameters():
            p.requires_grad_(flags[n])
            p.grad = None
        for o, s in zip(optimizers, states):
            if o is not None:
                o.load_state_dict(s)
        torch.set_rng_state(rng)
        model.train(training)
