"""The learning-rate range test (Smith 2015, fastai's `lr_find`): train for a few steps while the LR grows
exponentially, smooth the loss, stop when it diverges, restore the model, and suggest an LR.

    tunelab lr-find recipes/digits-cnn.yaml        # writes lr_finder.png / lr_finder.json to output.dir
    optim: {lr: auto}                              # `tunelab train` runs the finder first

The suggestion is the LR of steepest descent of the smoothed loss (before its minimum), cross-checked
against the `valley` rule (fastai) and `min/10` (the LR at the minimum divided by ten): when steepest lies
more than 10x from either, min/10 is suggested instead (`--rule` picks one rule outright). Heavy imports live inside functions: this module is imported to build the CLI.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import math
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tunelab.errors import ConfigError, TunelabError

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
    autocast_dtype: torch.dtype | None = None,
    seed: int = 0,
    rule: str = "checked",
    optimizer: torch.optim.Optimizer | None = None,
) -> LRFinderResult:
    """Run the range test on `model` with a fresh optimizer built like training's (same parameter groups,
    LR scales and weight decay); the model's weights, train/eval mode, trainable flags, the RNG state and
    `optimizer` (when one is given) are restored afterwards, so training starts exactly as without it."""
    import torch
    from torch.utils.data import DataLoader

    from tunelab.data.base import ResumableBatchSampler, collate_dicts
    from tunelab.engine.trainer import to_device
    from tunelab.optim import build_optimizer

    if not 0 < start_lr < end_lr:
        raise ConfigError(f"lr-find: need 0 < start_lr < end_lr, got {start_lr} and {end_lr}")
    if num_steps < 5:
        raise ConfigError(f"lr-find: `steps` = {num_steps} is too few; use at least 5 (default 100)")
    if rule not in RULES:
        raise ConfigError(f"lr-find: unknown rule {rule!r}; choose one of {', '.join(RULES)}")
    if dataset is None or len(dataset) == 0:
        raise TunelabError("lr-find: the training dataset is empty")
    device = torch.device(device) if device is not None else next(model.parameters()).device
    saved_model = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
    saved_flags = {n: p.requires_grad for n, p in model.named_parameters()}
    saved_opt = copy.deepcopy(optimizer.state_dict()) if optimizer is not None else None
    saved_rng = torch.get_rng_state()
    was_training = model.training

    opt = build_optimizer(model, optim.model_copy(update={"lr": 1.0}), lr_scales, device)
    scales = [g["lr"] for g in opt.param_groups]  # per-group multipliers of the swept base LR
    sampler = ResumableBatchSampler(len(dataset), batch_size, shuffle=True, seed=seed)
    loader = DataLoader(dataset, batch_sampler=sampler, collate_fn=collate_fn or collate_dicts)
    params = [p for p in model.parameters() if p.requires_grad]
    ratio = end_lr / start_lr
    lrs: list[float] = []
    losses: list[float] = []
    smoothed: list[float] = []
    avg, best, diverged = 0.0, math.inf, False
    epoch, it = 0, iter(loader)
    torch.manual_seed(seed)
    model.train()
    try:
        for i in range(num_steps):
            lr = start_lr * ratio ** (i / (num_steps - 1))
            for g, s in zip(opt.param_groups, scales):
                g["lr"] = s * lr
            try:
                batch = next(it)
            except StopIteration:
                epoch += 1
                sampler.set_epoch(epoch)
                it = iter(loader)
                batch = next(it)
            batch = to_device(batch, device)
            with (
                torch.autocast(device.type, dtype=autocast_dtype)
                if autocast_dtype is not None
                else torch.enable_grad()
            ):
                out = task.forward(model, batch)
                loss = task.loss_sum(out, batch) / task.count_targets(batch).to(device).clamp(min=1e-12)
            value = float(loss.detach())
            if not math.isfinite(value):
                diverged = True
                break
            loss.backward()
            if clip_grad_norm:
                torch.nn.utils.clip_grad_norm_(params, clip_grad_norm)
            opt.step()
            opt.zero_grad(set_to_none=True)
            avg = beta * avg + (1 - beta) * value
            smooth = avg / (1 - beta ** (i + 1))
            lrs.append(lr)
            losses.append(value)
            smoothed.append(smooth)
            best = min(best, smooth)
            if i > 0 and smooth > diverge_factor * best:
                diverged = True
                break
    finally:
        model.load_state_dict(saved_model)
        for n, p in model.named_parameters():
            p.requires_grad_(saved_flags[n])
        if optimizer is not None:
            optimizer.load_state_dict(saved_opt)
        torch.set_rng_state(saved_rng)
        model.train(was_training)
        del opt
    if len(lrs) < 5:
        raise TunelabError(
            f"lr-find: the loss diverged after {len(lrs)} steps, already at lr {start_lr:g}; lower the start "
            f"(--start-lr) or check the data and the model's initialisation"
        )
    skip = max(1, len(lrs) // 10)
    steep = steepest_lr(lrs, smoothed, skip)
    valley = valley_lr(lrs, smoothed)
    mind = min_div10_lr(lrs, smoothed)
    picks = {"steepest": steep, "valley": valley, "min_div10": mind}
    if rule == "checked":
        # steepest descent, cross-checked: when it lies more than 10x from valley or min/10, it is usually
        # sitting on the divergence cliff (SST-2/AdamW: steepest 1.1e-3 trained to chance, min/10 to the
        # best of the grid), so min/10 is taken instead
        trial = LRFinderResult(
            [], [], [], 0.0, rule, steep, valley, mind, diverged, start_lr, end_lr, num_steps
        )
        suggestion = steep if steep and trial.agree else (mind or valley)
    else:
        suggestion = picks[rule] or valley or mind
    return LRFinderResult(
        lrs,
        losses,
        smoothed,
        float(suggestion),
        rule,
        steep,
        valley,
        mind,
        diverged,
        start_lr,
        end_lr,
        num_steps,
    )


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
    from tunelab.engine.trainer import pick_device, resolve_precision
    from tunelab.run import build_run

    run = build_run(cfg, log=log)
    device = pick_device(cfg.train.device)
    model = run.model.to(device)
    run.strategy.on_epoch_start(model, 0)  # what trains in the first epoch (freeze/finetune strategies)
    if hasattr(run.strategy, "on_train_mode"):
        model.train()
        run.strategy.on_train_mode(model)
    result = lr_range_test(
        model,
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
        device=device,
        autocast_dtype=resolve_precision(cfg.train.precision, device),
        seed=cfg.train.seed,
        rule=rule,
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


def _describe(result: LRFinderResult) -> str:
    def f(v: float | None) -> str:
        return f"{v:.2e}" if v else "n/a"

    note = "" if result.agree else " (steepest is more than 10x from a cross-check: see lr_finder.png)"
    return (
        f"lr-find: suggested lr {result.suggestion:.2e} ({result.rule}); steepest {f(result.steepest)}, "
        f"valley {f(result.valley)}, min/10 {f(result.min_div10)}{note}"
    )


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
        log(_describe(result))
        suggestion = result.suggestion
    new = cfg.model_copy(deep=True)
    new.optim.lr = float(suggestion)
    return new


# -- CLI -------------------------------------------------------------------------------------------------


def cmd_lr_find(args: argparse.Namespace) -> int:
    from tunelab.config import load_config

    cfg = load_config(args.config, args.overrides)
    if cfg.optim.lr == "auto":
        cfg.optim.lr = 1e-3  # the value is not used: the test sweeps it
    result = find_lr(
        cfg,
        args.start_lr,
        args.end_lr,
        args.steps,
        args.rule,
        args.output,
        log=lambda m: print(m, file=sys.stderr),
    )
    out = Path(args.output) if args.output else cfg.output_dir
    print(_describe(result), file=sys.stderr)
    print(f"wrote {out / 'lr_finder.png'} and {out / 'lr_finder.json'}", file=sys.stderr)
    print(
        json.dumps(
            {
                "suggestion": result.suggestion,
                "rule": result.rule,
                "steepest": result.steepest,
                "valley": result.valley,
                "min_div10": result.min_div10,
                "diverged": result.diverged,
                "steps": len(result.lrs),
            }
        )
    )
    return 0


def add_parser(sub: Any) -> None:
    p = sub.add_parser("lr-find", help="LR range test: suggest a learning rate, plot the curve")
    p.add_argument("config")
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides")
    p.add_argument("--start-lr", type=float, default=1e-7)
    p.add_argument("--end-lr", type=float, default=10.0)
    p.add_argument("--steps", type=int, default=100, help="number of LR values tried (default 100)")
    p.add_argument(
        "--rule",
        choices=RULES,
        default="checked",
        help="checked (default): steepest unless 10x from valley or min/10, then min/10",
    )
    p.add_argument("--output", help="folder for lr_finder.png/json (default: the config's output.dir)")
    p.set_defaults(func=cmd_lr_find)
