"""Step 4 (optimizer half): parameter groups, optimizers and learning-rate schedules."""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Callable

import torch
import torch.nn as nn

from tunelab.config import OptimSection, ScheduleSection
from tunelab.errors import ConfigError

_NORM_TYPES = (nn.LayerNorm, nn.GroupNorm, nn.modules.batchnorm._BatchNorm, nn.RMSNorm)


def _no_decay_names(model: nn.Module, kinds: list[str]) -> set[str]:
    """Names of parameters exempt from weight decay: biases, norm weights, embeddings (configurable)."""
    names: set[str] = set()
    for mod_name, module in model.named_modules():
        is_norm = isinstance(module, _NORM_TYPES) or "norm" in type(module).__name__.lower()
        is_emb = isinstance(module, nn.Embedding)
        for p_name, _ in module.named_parameters(recurse=False):
            full = f"{mod_name}.{p_name}" if mod_name else p_name
            if ("bias" in kinds and p_name == "bias") or ("norm" in kinds and is_norm) or (
                "embedding" in kinds and is_emb
            ):
                names.add(full)
    return names


def param_groups(
    model: nn.Module, cfg: OptimSection, lr: float, lr_scales: dict[str, float] | None = None
) -> list[dict]:
    """Group parameters by (weight decay, learning rate). All parameters are included, frozen ones too,
    so that a strategy can unfreeze them later (optimizers skip parameters whose grad is None)."""
    no_decay = _no_decay_names(model, cfg.no_decay)
    groups: dict[tuple[float, float], dict] = {}
    seen: set[int] = set()
    used_rules = [False] * len(cfg.param_groups)
    for name, p in model.named_parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        p_lr = lr * (lr_scales or {}).get(name, 1.0)
        wd = 0.0 if name in no_decay else cfg.weight_decay
        for i, rule in enumerate(cfg.param_groups):
            if fnmatch.fnmatch(name, rule.pattern):
                used_rules[i] = True
                if rule.lr is not None:
                    p_lr = rule.lr
                if rule.lr_scale is not None:
                    p_lr = p_lr * rule.lr_scale
                if rule.weight_decay is not None:
                    wd = rule.weight_decay
                break
        key = (wd, p_lr)
        group = groups.setdefault(key, {"params": [], "names": [], "weight_decay": wd, "lr": p_lr})
        group["params"].append(p)
        group["names"].append(name)
    for i, used in enumerate(used_rules):
        if not used:
            raise ConfigError(
                f"`optim.param_groups[{i}].pattern` = {cfg.param_groups[i].pattern!r} matches no parameter"
            )
    return list(groups.values())


def build_optimizer(
    model: nn.Module, cfg: OptimSection, lr_scales: dict[str, float] | None = None,
    device: torch.device | None = None,
) -> torch.optim.Optimizer:
    if cfg.lr == "auto":
        raise ConfigError("`optim.lr` = 'auto' must be resolved by the LR finder before building the optimizer")
    lr = float(cfg.lr)
    groups = param_groups(model, cfg, lr, lr_scales)
    for g in groups:
        g.pop("names")
    device = device or next(model.parameters()).device
    # fused kernels where the device has them (CUDA, and CPU for Adam/AdamW in torch >= 2.4), else foreach
    fused = cfg.fused
    if fused is None:
        fused = device.type in ("cuda", "cpu") and cfg.name in ("adam", "adamw")
    extra = {"fused": True} if fused else {"foreach": True}
    if cfg.name == "sgd":
        if cfg.nesterov and cfg.momentum <= 0:
            raise ConfigError("`optim.nesterov` = true needs `optim.momentum` > 0")
        return torch.optim.SGD(groups, lr=lr, momentum=cfg.momentum, nesterov=cfg.nesterov, **extra)
    cls = torch.optim.AdamW if cfg.name == "adamw" else torch.optim.Adam
    return cls(groups, lr=lr, betas=cfg.betas, eps=cfg.eps, **extra)


def lr_lambda(cfg: ScheduleSection, total_steps: int) -> Callable[[int], float]:
    """Multiplier of the base LR at optimizer step `s` (0-based), warmup included."""
    warmup = cfg.warmup_steps or int(round(cfg.warmup_ratio * total_steps))
    if warmup >= total_steps:
        import sys

        print(f"warning: the warm-up ({warmup} steps) covers the whole run ({total_steps} steps): the learning "
              "rate never reaches optim.lr; lower schedule.warmup_steps", file=sys.stderr)
    floor = cfg.min_lr_ratio
    decay_steps = max(1, total_steps - warmup)

    def warm(s: int) -> float | None:
        if warmup and s < warmup:
            return (s + 1) / (warmup + 1)
        return None

    if cfg.name == "constant":
        return lambda s: warm(s) or 1.0
    if cfg.name == "linear":
        return lambda s: warm(s) or floor + (1 - floor) * max(0.0, 1 - (s - warmup) / decay_steps)
    if cfg.name == "cosine":
        return lambda s: warm(s) or floor + (1 - floor) * 0.5 * (
            1 + math.cos(math.pi * min(1.0, (s - warmup) / decay_steps))
        )
    if cfg.name == "step":
        return lambda s: warm(s) or cfg.gamma ** ((s - warmup) // cfg.step_size)
    if cfg.name == "onecycle":
        # cosine up from lr/25 over pct_start, then cosine down to lr/1e4 (torch's OneCycleLR shape)
        up = max(1, int(cfg.pct_start * total_steps))
        start, end = 1 / 25, 1 / 25 / 1e4

        def one(s: int) -> float:
            if s < up:
                return start + (1 - start) * 0.5 * (1 - math.cos(math.pi * s / up))
            t = min(1.0, (s - up) / max(1, total_steps - up))
            return end + (1 - end) * 0.5 * (1 + math.cos(math.pi * t))

        return one
    raise ConfigError(f"unknown schedule {cfg.name!r}")


def build_scheduler(
    optimizer: torch.optim.Optimizer, cfg: ScheduleSection, total_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg, total_steps))
