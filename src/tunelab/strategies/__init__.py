"""Fine-tuning strategies: what trains, and at which learning rate.

A strategy prepares the model before the optimizer is built (`setup` returns the model, possibly
wrapped, and per-parameter learning-rate scales) and may change what is trainable at each epoch
(`on_epoch_start`). All parameters are always in the optimizer, so unfreezing later just works.

- `full`: train everything.
- `freeze`: linear probe; only the head trains; BatchNorm statistics of the frozen body stay fixed.
- `finetune`: fastai's `fine_tune(freeze_epochs=N)`: `freeze` for N epochs, then everything with
  discriminative learning rates (each earlier layer group gets `lr_decay` times the next one's LR).
- `layerwise_lr`: LLRD: full fine-tuning with the LR decayed by `lr_decay` per layer group from the head.
- `gradual_unfreeze`: ULMFiT: the head first, then one more layer group (from the top) every `every` epochs.
- `lora`: low-rank adapters with peft (tunelab.strategies.lora).
"""

from __future__ import annotations

import fnmatch
from typing import Any, Protocol, runtime_checkable

import torch.nn as nn

from tunelab.config import RunConfig, check_kwargs
from tunelab.errors import ConfigError
from tunelab.registry import STRATEGIES

_DEFAULT_HEADS = ["fc.*", "head.*", "classifier.*", "lm_head.*", "score.*", "heads.*", "pre_classifier.*"]


def head_patterns(model: nn.Module, head: list[str] | None) -> list[str]:
    if head:
        return head
    return list(getattr(model, "tunelab_head_patterns", None) or _DEFAULT_HEADS)


def layer_groups(model: nn.Module, head: list[str] | None = None) -> list[list[str]]:
    """Parameter names grouped into layers, ordered from input to head. A model can define
    `tunelab_layer_groups()`; otherwise a block is the name up to its first numeric part
    (`bert.encoder.layer.3`, `layer2.0`, `features.4`), and every other parameter belongs to the first
    module on its path that holds no block (`bert.embeddings`, `bert.pooler`, `conv1`). Non-block groups
    before the first block merge into one stem group, those after the last block into one group under
    the head (timm's stem / neck grouping). The head is the last group."""
    if hasattr(model, "tunelab_layer_groups"):
        return model.tunelab_layer_groups()
    heads = head_patterns(model, head)
    keys: dict[str, tuple[str, bool]] = {}  # parameter name -> (group key, is a block)
    head_names: list[str] = []
    for name, _ in model.named_parameters():
        if any(fnmatch.fnmatch(name, p) for p in heads):
            head_names.append(name)
            continue
        parts = name.split(".")
        digit = next((i for i, part in enumerate(parts[:-1]) if part.isdigit()), None)
        keys[name] = (".".join(parts[: digit + 1]), True) if digit is not None else (name, False)
    holders = {  # modules that contain a block: never a group of their own
        ".".join(key.split(".")[:i]) for key, block in keys.values() if block for i in range(1, key.count(".") + 1)
    }
    groups: dict[tuple[str, bool], list[str]] = {}
    for name, (key, block) in keys.items():
        if not block:
            parts = name.split(".")
            i = next((i for i in range(1, len(parts)) if ".".join(parts[:i]) not in holders), len(parts))
            key = ".".join(parts[:i])
        groups.setdefault((key, block), []).append(name)
    ordered = list(groups.items())
    blocks = [i for i, ((_, block), _) in enumerate(ordered) if block]
    out: list[list[str]] = []
    if blocks:
        first, last = blocks[0], blocks[-1]
        stem = [n for _, names in ordered[:first] for n in names]
        neck = [n for _, names in ordered[last + 1 :] for n in names]
        out = [stem] + [names for _, names in ordered[first : last + 1]] + [neck]
    else:
        out = [names for _, names in ordered]
    out = [g for g in out if g]
    if head_names:
        out.append(head_names)
    return out


def set_trainable(model: nn.Module, names: set[str]) -> None:
    for name, p in model.named_parameters():
        p.requires_grad_(name in names)


def freeze_batchnorm_stats(model: nn.Module) -> None:
    """Put BatchNorm layers whose parameters are all frozen in eval mode (running stats stay fixed)."""
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            params = list(module.parameters(recurse=False))
            if params and not any(p.requires_grad for p in params):
                module.eval()


@runtime_checkable
class StrategyProtocol(Protocol):
    """What the engine calls on a strategy (an out-of-tree one may implement it without subclassing)."""

    name: str
    checkpoint_trainable_only: bool  # checkpoints hold only trainable weights (the base is rebuilt: LoRA)

    def setup(self, model: nn.Module) -> tuple[nn.Module, dict[str, float] | None]:
        """Prepare the model before the optimizer is built: (model, per-parameter LR scales or None)."""

    def on_epoch_start(self, model: nn.Module, epoch: int) -> None:
        """Change what trains at each epoch (freeze/unfreeze)."""

    def on_train_mode(self, model: nn.Module) -> None:
        """After model.train(): e.g. keep frozen BatchNorm layers in eval mode."""

    def model_to_save(self, model: nn.Module, keeps_adapters: bool) -> nn.Module:
        """The model final/ and best/ hold."""

    def describe(self, model: nn.Module) -> dict[str, Any]:
        """What it trains, for the logs."""


class Strategy:
    """The base strategy: everything trains (subclass it and override what changes)."""

    name = "full"
    checkpoint_trainable_only = False

    def setup(self, model: nn.Module) -> tuple[nn.Module, dict[str, float] | None]:
        return model, None

    def on_epoch_start(self, model: nn.Module, epoch: int) -> None: ...

    def on_train_mode(self, model: nn.Module) -> None:
        """Called after model.train(): keep frozen BatchNorm layers in eval mode."""
        freeze_batchnorm_stats(model)

    def model_to_save(self, model: nn.Module, keeps_adapters: bool) -> nn.Module:
        """The model final/ and best/ hold (the LoRA strategy merges its adapters for formats without them)."""
        return model

    def describe(self, model: nn.Module) -> dict[str, Any]:
        total = sum(p.numel() for p in model.parameters())
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        return {"strategy": self.name, "trainable_params": trainable, "total_params": total}


@STRATEGIES.register("full")
class Full(Strategy):
    name = "full"

    def __init__(self):
        pass


@STRATEGIES.register("freeze")
class Freeze(Strategy):
    """Linear probe: only parameters matching `head` (globs; default: the model's head) train."""

    name = "freeze"

    def __init__(self, head: list[str] | None = None, train: list[str] | None = None):
        self.head, self.extra = head, train or []

    def _head_names(self, model: nn.Module) -> set[str]:
        pats = head_patterns(model, self.head) + self.extra
        names = {n for n, _ in model.named_parameters() if any(fnmatch.fnmatch(n, p) for p in pats)}
        if not names:
            raise ConfigError(
                f"`strategy.head` patterns {pats} match no parameter; parameter names look like "
                f"{', '.join(n for n, _ in list(model.named_parameters())[-3:])}"
            )
        return names

    def setup(self, model: nn.Module) -> tuple[nn.Module, dict[str, float] | None]:
        set_trainable(model, self._head_names(model))
        return model, None


def _decayed_scales(groups: list[list[str]], decay: float) -> dict[str, float]:
    scales: dict[str, float] = {}
    for depth, names in enumerate(reversed(groups)):  # head: depth 0
        for n in names:
            scales[n] = decay**depth
    return scales


@STRATEGIES.register("layerwise_lr")
class LayerwiseLR(Strategy):
    name = "layerwise_lr"

    def __init__(self, lr_decay: float = 0.8, head: list[str] | None = None):
        if not 0 < lr_decay <= 1:
            raise ConfigError(f"`strategy.lr_decay` = {lr_decay} must be in (0, 1]")
        self.lr_decay, self.head = lr_decay, head

    def setup(self, model: nn.Module) -> tuple[nn.Module, dict[str, float] | None]:
        return model, _decayed_scales(layer_groups(model, self.head), self.lr_decay)


@STRATEGIES.register("finetune")
class FineTune(Freeze):
    """Linear probe for `freeze_epochs`, then everything with discriminative LRs (fastai fine_tune)."""

    name = "finetune"

    def __init__(self, freeze_epochs: int = 1, lr_decay: float = 0.5, head: list[str] | None = None):
        super().__init__(head)
        self.freeze_epochs, self.lr_decay = freeze_epochs, lr_decay

    def setup(self, model: nn.Module) -> tuple[nn.Module, dict[str, float] | None]:
        # head at full LR during and after the probe; the body gets decayed LRs once unfrozen
        return model, _decayed_scales(layer_groups(model, self.head), self.lr_decay)

    def on_epoch_start(self, model: nn.Module, epoch: int) -> None:
        if epoch < self.freeze_epochs:
            set_trainable(model, self._head_names(model))
        else:
            set_trainable(model, {n for n, _ in model.named_parameters()})


@STRATEGIES.register("gradual_unfreeze")
class GradualUnfreeze(Freeze):
    """ULMFiT-style: the head, then one more layer group from the top every `every` epochs."""

    name = "gradual_unfreeze"

    def __init__(self, every: int = 1, lr_decay: float = 1.0, head: list[str] | None = None):
        super().__init__(head)
        self.every, self.lr_decay = every, lr_decay

    def setup(self, model: nn.Module) -> tuple[nn.Module, dict[str, float] | None]:
        return model, _decayed_scales(layer_groups(model, self.head), self.lr_decay)

    def on_epoch_start(self, model: nn.Module, epoch: int) -> None:
        groups = layer_groups(model, self.head)
        n = 1 + epoch // self.every  # number of groups (from the head) that train
        names = {name for g in groups[-n:] for name in g}
        set_trainable(model, names)


STRATEGIES.accepts = lambda obj: isinstance(obj, type) and all(
    callable(getattr(obj, m, None)) for m in ("setup", "on_epoch_start", "on_train_mode", "model_to_save", "describe"))


def build_strategy(cfg: RunConfig) -> Strategy:
    """The strategy `strategy.name` names (registered, or a class at import path `pkg.module:Class`)."""
    kwargs = cfg.strategy.kwargs
    name = kwargs.pop("name")
    cls = STRATEGIES.resolve(name)
    try:
        check_kwargs(cls.__init__, kwargs, "strategy")
    except ConfigError as e:  # e.g. `strategy.name=full` over a LoRA recipe keeps its r, alpha, ...
        raise ConfigError(
            f"{e} (for strategy `{name}`); to switch strategies from the command line, replace the whole "
            f"section: 'strategy={{name: {name}}}'"
        ) from None
    strategy = cls(**kwargs)
    if not isinstance(strategy, StrategyProtocol):
        raise ConfigError(f"strategy `{name}` lacks part of the Strategy protocol (name, checkpoint_trainable_only, "
                          "setup, on_epoch_start, on_train_mode, model_to_save, describe); subclass "
                          "tunelab.strategies.Strategy")
    return strategy


__all__ = ["Strategy", "StrategyProtocol", "build_strategy", "layer_groups", "freeze_batchnorm_stats"]
