"""Automatic batch size: on a GPU, the largest micro-batch that fits, with gradient accumulation keeping
the effective batch (micro-batch x accumulation) what the recipe asked for.

The search tries divisors of the effective batch (so the effective batch stays exact), binary-searching
on real training steps (forward, backward, optimizer step, so optimizer states are allocated) on copies of
the longest training example. A size fits when it raises no out-of-memory error and its peak stays under
`headroom` of the device memory (room for fragmentation and evaluation).

    tunelab plan CONFIG --auto-batch               # prints the overrides to use
    resolve_auto_batch(cfg) -> RunConfig            # Python: a copy of cfg with them applied
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from tunelab.errors import TunelabError
from tunelab.insight.plan import longest_example_batch
from tunelab.registry import RESOLVERS

if TYPE_CHECKING:
    from tunelab.config import RunConfig


@dataclass
class AutoBatchResult:
    micro_batch: int
    grad_accum: int
    effective_batch: int
    tried: list[tuple[int, bool]] = field(default_factory=list)

    def overrides(self) -> list[str]:
        return [f"train.batch_size={self.micro_batch}", f"train.grad_accum={self.grad_accum}"]

    def describe(self) -> str:
        tried = ", ".join(f"{m}:{'ok' if ok else 'OOM'}" for m, ok in self.tried)
        return (
            f"micro-batch {self.micro_batch} x accumulation {self.grad_accum} = effective "
            f"{self.effective_batch} (tried {tried}); use: {' '.join(self.overrides())}"
        )


def search_micro_batch(fits: Callable[[int], bool], effective: int) -> AutoBatchResult:
    """Largest divisor m of `effective` with fits(m) True, by binary search (fitting is monotone in m)."""
    sizes = [d for d in range(1, effective + 1) if effective % d == 0]
    tried: list[tuple[int, bool]] = []
    lo, hi = -1, len(sizes)  # sizes[lo] fits (-1: none known), sizes[hi] does not (len: none known)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        ok = fits(sizes[mid])
        tried.append((sizes[mid], ok))
        if ok:
            lo = mid
        else:
            hi = mid
    if lo < 0:
        raise TunelabError(
            "auto batch size: even a micro-batch of 1 does not fit in GPU memory; see "
            "`tunelab plan CONFIG` for LoRA, QLoRA, checkpointing or FSDP"
        )
    m = sizes[lo]
    return AutoBatchResult(m, effective // m, effective, tried)


def gpu_step_fits(cfg: RunConfig, run: Any, device: Any, headroom: float = 0.9) -> Callable[[int], bool]:
    """A `fits(m)` that runs one real training step (`engine.step.TrainStep`) at micro-batch m on the GPU;
    the trial steps leave the weights and the RNG as they were."""
    import torch

    from tunelab.engine.step import TrainStep, restored
    from tunelab.optim import build_optimizer

    model = run.model.to(device)
    run.strategy.on_epoch_start(model, 0)
    limit = headroom * torch.cuda.get_device_properties(device).total_memory

    def fits(m: int) -> bool:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        step = TrainStep.for_run(model, run.task, cfg.train, device,
                                 optimizer=build_optimizer(model, cfg.optim, run.lr_scales, device))
        try:
            with restored(model):
                model.train()
                step([longest_example_batch(run.data, run.data.collate_fn, m)])
                torch.cuda.synchronize(device)
            return torch.cuda.max_memory_allocated(device) <= limit
        except torch.cuda.OutOfMemoryError:
            return False
        finally:
            del step
            torch.cuda.empty_cache()

    return fits


def find_micro_batch_for_config(cfg: RunConfig, log=print, headroom: float = 0.9) -> AutoBatchResult:
    """Build the run and search its micro-batch on the GPU (a TunelabError on a machine without one)."""
    import torch

    from tunelab.engine.step import pick_device
    from tunelab.run import build_run

    device = pick_device(cfg.train.device)
    if device.type != "cuda" or not torch.cuda.is_available():
        raise TunelabError(
            f"auto batch size searches GPU memory, but this run's device is {device}; on CPU use "
            f"`tunelab plan CONFIG --budget SIZE` to see what fits"
        )
    if cfg.optim.lr == "auto":
        cfg = cfg.model_copy(deep=True)
        cfg.optim.lr = 1e-3
    run = build_run(cfg, log=log)
    effective = cfg.train.batch_size * cfg.train.grad_accum
    result = search_micro_batch(gpu_step_fits(cfg, run, device, headroom), effective)
    log(f"auto batch: {result.describe()}")
    return result


@RESOLVERS.register("train.auto_batch")
def resolve_auto_batch(cfg: RunConfig, log=print) -> RunConfig:
    """`train.auto_batch: true`: a copy of `cfg` with the largest micro-batch that fits on the GPU and the
    accumulation that keeps the effective batch; on other devices the recipe's sizes. config.yaml records
    the resolved sizes (`auto_batch` off), so a resume reuses them."""
    import torch

    from tunelab.engine.step import pick_device

    device = pick_device(cfg.train.device)
    new = cfg.model_copy(deep=True)
    if device.type == "cuda" and torch.cuda.is_available():
        result = find_micro_batch_for_config(cfg, log=log)
        new.train.batch_size, new.train.grad_accum = result.micro_batch, result.grad_accum
    else:
        log(f"auto batch: searches GPU memory; on {device} the recipe's micro-batch "
            f"{cfg.train.batch_size} x accumulation {cfg.train.grad_accum} is kept")
    new.train.auto_batch = False
    return new
