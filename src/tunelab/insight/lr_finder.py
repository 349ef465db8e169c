"""The learning-rate range test (Smith 2015, fastai's `lr_find`): train for a few steps while the LR grows
exponentially, smooth the loss, stop when it diverges, restore the model, and suggest an LR.

    tunelab lr-find recipes/digits-cnn.yaml        # writes lr_finder.png / lr_finder.json to output.dir
    optim: {lr: auto}                              # `tunelab train` runs the finder first

The suggestion is the LR of steepest descent of the smoothed loss (before its minimum), cross-checked
against the `valley` rule (fastai) and `min/10` (the LR at the minimum divided by ten): when steepest lies
more than 10x from either, min/10 is suggested instead (`--rule` picks one rule outright). Heavy imports live inside functions: this module is imported to build the CLI.
"""

from __future__ import annotations

import hashlib
import json
import math
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tunelab.callbacks import Callback
from tunelab.errors import ConfigError, TunelabError
from tunelab.registry import RESOLVERS

if TYPE_CHECKING:
    import torch

    from tunelab.config import OptimSection, RunConfig
    from tunelab.tasks.base import Task

RULES = ("checked", "steepest", "valley", "min_div10")


@dataclass
class LRFinderResult:
    lrs: list[float]
    losses: list[float]
    smoothed: list[float]
    suggestion: float
    rule: str
    steepest: float | None
    valley: float | None
    min_div10: float | None
    diverged: bool
    start_lr: float
    end_lr: float
    num_steps: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def agree(self) -> bool:
        """Whether the steepest-descent LR lies within 10x of both cross-checks."""
        checks = [v for v in (self.valley, self.min_div10) if v]
        return bool(self.steepest) and all(0.1 <= self.steepest / v <= 10 for v in checks)


# -- suggestion rules on a smoothed curve ----------------------------------------------------------------


def steepest_lr(lrs: list[float], smoothed: list[float], skip_start: int = 0) -> float | None:
    """LR where the smoothed loss falls fastest per decade, searched before the loss minimum."""
    import numpy as np

    low = int(np.argmin(smoothed))
    lo = min(skip_start, max(low - 1, 0))
    if low - lo < 2:
        return None
    x = np.log10(np.asarray(lrs[lo : low + 1]))
    y = np.asarray(smoothed[lo : low + 1])
    grad = np.gradient(y, x)
    return float(lrs[lo + int(np.argmin(grad))])


def valley_lr(lrs: list[float], losses: list[float]) -> float | None:
    """fastai's `valley` rule: find the longest strictly decreasing run of the curve (as a subsequence) and
    take the LR at the index fastai uses, start + section + section/2 with section = length / 3."""
    n = len(losses)
    if n < 3:
        return None
    lds = [1] * n
    max_start = max_end = 0
    for i in range(1, n):
        for j in range(i):
            if losses[i] < losses[j] and lds[i] < lds[j] + 1:
                lds[i] = lds[j] + 1
            if lds[max_end] < lds[i]:
                max_end = i
                max_start = max_end - lds[max_end]
    sections = (max_end - max_start) / 3
    idx = max_start + int(sections) + int(sections / 2)
    return float(lrs[min(max(idx, 0), n - 1)])


def min_div10_lr(lrs: list[float], smoothed: list[float]) -> float | None:
    if not smoothed:
        return None
    i = min(range(len(smoothed)), key=lambda k: smoothed[k])
    return float(lrs[i] / 10)


# -- the range test -------------------------------------------------------------------------------------


class RangeTest(Callback):
    """The range test as a callback on the ordinary training loop: the schedule grows the LR exponentially
    from `start_lr` to `end_lr` over `num_steps`; each step's loss is recorded and smoothed, and the run
    stops once the smoothed loss exceeds `diverge_factor` x its minimum."""

    def __init__(self, start_lr: float, end_lr: float, num_steps: int, beta: float, diverge_factor: float):
        self.start_lr, self.ratio, self.num_steps = start_lr, end_lr / start_lr, num_steps
        self.beta, self.diverge_factor = beta, diverge_factor
        self.lrs: list[float] = []
        self.losses: list[float] = []
        self.smoothed: list[float] = []
        self.diverged = False
        self._avg, self._best = 0.0, math.inf

    def lr_at(self, i: int) -> float:
        return self.start_lr * self.ratio ** (i / (self.num_steps - 1))

    def on_fit_start(self, trainer: Any) -> None:
        import torch

        trainer.scheduler = torch.optim.lr_scheduler.LambdaLR(
            trainer.optimizer, lambda i: self.ratio ** (min(i, self.num_steps - 1) / (self.num_steps - 1)))
        trainer.step.scheduler = trainer.scheduler

    def on_step_end(self, trainer: Any, logs: dict[str, Any]) -> None:
        i = trainer.global_step - 1
        value = float(logs["loss"])
        self._avg = self.beta * self._avg + (1 - self.beta) * value
        smooth = self._avg / (1 - self.beta ** (i + 1))
        self.lrs.append(self.lr_at(i))
        self.losses.append(value)
        self.smoothed.append(smooth)
        self._best = min(self._best, smooth)
        if i > 0 and smooth > self.diverge_factor * self._best:
            self.diverged, trainer.should_stop = True, True


def lr_range_test(
    model: torch.nn.Module,
    task: Task,
    dataset: Any,
    *,
    optim: OptimSection,
    collate_fn: Any = None,
    lr_scales: dict[str, float] | None = None,
    batch_size: int = 32,
    start_lr: float = 1e-7,
    end_lr: float = 10.0,
    num_steps: int = 100,
    beta: float = 0.98,
    diverge_factor: float = 4.0,
    clip_grad_norm: float | None = None,
    device: torch.device | str | None = None,
    precision: str = "fp32",
    seed: int = 0,
    rule: str = "checked",
    optimizer: torch.optim.Optimizer | None = None,
    strategy: Any = None,
) -> LRFinderResult:
    """Run the range test on `model`: a short run of the ordinary training loop (an optimizer built like
    training's: same parameter groups, LR scales and weight decay) driven by `RangeTest`. The model's
    weights, train/eval mode, trainable flags, the RNG state and `optimizer` (when one is given) are
    restored afterwards, so training starts exactly as without it."""
    # Stays whole (over 60 lines): the range test's knobs are its signature (as fastai's lr_find); the body is short.
    from tunelab.config import ScheduleSection, TrainSection
    from tunelab.engine.step import restored
    from tunelab.engine.trainer import Trainer
    from tunelab.errors import TrainingDiverged

    if not 0 < start_lr < end_lr:
        raise ConfigError(f"lr-find: need 0 < start_lr < end_lr, got {start_lr} and {end_lr}")
    if num_steps < 5:
        raise ConfigError(f"lr-find: `steps` = {num_steps} is too few; use at least 5 (default 100)")
    if rule not in RULES:
        raise ConfigError(f"lr-find: unknown rule {rule!r}; choose one of {', '.join(RULES)}")
    if dataset is None or len(dataset) == 0:
        raise TunelabError("lr-find: the training dataset is empty")
    device = str(device) if device is not None else str(next(model.parameters()).device)
    test = RangeTest(start_lr, end_lr, num_steps, beta, diverge_factor)
    train = TrainSection(max_steps=num_steps, batch_size=batch_size, log_every=1, checkpoints=False,
                         clip_grad_norm=clip_grad_norm, device=device, precision=precision, seed=seed)
    with restored(model, optimizer):
        trainer = Trainer(model, task, dataset, optim=optim.model_copy(update={"lr": start_lr}),
                          schedule=ScheduleSection(), train=train, callbacks=[test], collate_fn=collate_fn,
                          lr_scales=lr_scales, strategy=strategy)
        try:
            trainer.fit()
        except TrainingDiverged:  # a non-finite loss: the curve ends there
            test.diverged = True
    lrs, smoothed = test.lrs, test.smoothed
    if len(lrs) < 5:
        raise TunelabError(
            f"lr-find: the loss diverged after {len(lrs)} steps, already at lr {start_lr:g}; lower the start "
            f"(--start-lr) or check the data and the model's initialisation"
        )
    steep = steepest_lr(lrs, smoothed, max(1, len(lrs) // 10))
    valley, mind = valley_lr(lrs, smoothed), min_div10_lr(lrs, smoothed)
    result = LRFinderResult(lrs, test.losses, smoothed, 0.0, rule, steep, valley, mind, test.diverged, start_lr,
                            end_lr, num_steps)
    if rule == "checked":
        # steepest descent, cross-checked: when it lies more than 10x from valley or min/10, it is usually
        # sitting on the divergence cliff (SST-2/AdamW: steepest 1.1e-3 trained to chance, min/10 to the
        # best of the grid), so min/10 is taken instead
        result.suggestion = float(steep if steep and result.agree else (mind or valley))
    else:
        result.suggestion = float({"steepest": steep, "valley": valley, "min_div10": mind}[rule] or valley or mind)
    return result


# -- from a config ---------------------------------------------------------------------------------------


def _fingerprint(cfg: RunConfig) -> str:
    data = cfg.to_dict()
    data.pop("output", None)
    data["optim"].pop("lr", None)
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:16]


def find_lr(
    cfg: RunConfig,
    start_lr: float = 1e-7,
    end_lr: float = 10.0,
    num_steps: int = 100,
    rule: str = "checked",
    output_dir: str | Path | None = None,
    log=print,
) -> LRFinderResult:
    """Build the run described by `cfg`, run the range test on it, write lr_finder.json/.png into
    `output_dir` (default: the config's output.dir) and return the result."""
    from tunelab.engine.step import pick_device
    from tunelab.run import build_run

    run = build_run(cfg, log=log)
    result = lr_range_test(
        run.model,
        run.task,
        run.data.train,
        optim=cfg.optim,
        collate_fn=run.data.collate_fn,
        lr_scales=run.lr_scales,
        batch_size=cfg.train.batch_size,
        start_lr=start_lr,
        end_lr=end_lr,
        num_steps=num_steps,
        clip_grad_norm=cfg.train.clip_grad_norm,
        device=pick_device(cfg.train.device),
        precision=cfg.train.precision,
        seed=cfg.train.seed,
        rule=rule,
        strategy=run.strategy,
    )
    out = Path(output_dir) if output_dir is not None else cfg.output_dir
    write_result(result, out, _fingerprint(cfg))
    return result


def write_result(result: LRFinderResult, out: Path, fingerprint: str = "") -> None:
    """lr_finder.json (atomic) and, when matplotlib is installed, lr_finder.png."""
    from tunelab.engine.rundir import mark_run_dir
    from tunelab.io import atomic_write_bytes, atomic_write_text

    mark_run_dir(out)
    payload = {**result.to_dict(), "agree": result.agree, "config_fingerprint": fingerprint}
    atomic_write_text(out / "lr_finder.json", json.dumps(payload, indent=1))
    try:
        from tunelab.insight.report import figure_lr_finder
    except ImportError:
        return
    try:
        png = figure_lr_finder(payload, dpi=100)
    except ImportError:
        print("warning: matplotlib is not installed: no lr_finder.png", file=sys.stderr)
        return
    if png:
        import base64

        atomic_write_bytes(out / "lr_finder.png", base64.b64decode(png))


def describe(result: LRFinderResult) -> str:
    def f(v: float | None) -> str:
        return f"{v:.2e}" if v else "n/a"

    note = "" if result.agree else " (steepest is more than 10x from a cross-check: see lr_finder.png)"
    return (
        f"lr-find: suggested lr {result.suggestion:.2e} ({result.rule}); steepest {f(result.steepest)}, "
        f"valley {f(result.valley)}, min/10 {f(result.min_div10)}{note}"
    )


@RESOLVERS.register("optim.lr")
def resolve_auto_lr(cfg: RunConfig, log=print) -> RunConfig:
    """`optim.lr: auto`: run the range test (or reuse the one already in output.dir for this same config,
    e.g. when resuming) and return a copy of `cfg` with the suggested LR."""
    out = cfg.output_dir
    saved = out / "lr_finder.json"
    suggestion = None
    if saved.is_file():
        try:
            data = json.loads(saved.read_text())
            if data.get("config_fingerprint") == _fingerprint(cfg):
                suggestion = float(data["suggestion"])
                log(f"lr-find: reusing the suggestion in {saved}: lr {suggestion:.2e}")
        except (ValueError, KeyError, TypeError):
            suggestion = None
    if suggestion is None:
        result = find_lr(cfg, log=log)
        log(describe(result))
        suggestion = result.suggestion
    new = cfg.model_copy(deep=True)
    new.optim.lr = float(suggestion)
    return new
