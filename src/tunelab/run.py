"""From a RunConfig to a trained run directory, and back from a run directory to a model.

The six steps, in order: data -> (1) model -> (2) init -> (3) pretrained weights -> strategy ->
(4) task/loss + optimizer (inside the Trainer) -> (5) train -> (6) evaluate.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import shutil
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from tunelab.config import RunConfig, load_config
from tunelab.data.base import DataBundle, build_data
from tunelab.engine.checkpoint import atomic_write_text, holds_trained_run
from tunelab.engine.trainer import Trainer
from tunelab.errors import ConfigError, TunelabError
from tunelab.models import create_model, load_model_folder, resolve_builder
from tunelab.strategies import Strategy, build_strategy
from tunelab.tasks.base import Task, build_task
from tunelab.weights import LoadReport, count_parameters, init_weights, load_pretrained


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


@dataclass
class BuiltRun:
    cfg: RunConfig
    model: nn.Module
    task: Task
    data: DataBundle
    strategy: Strategy
    lr_scales: dict[str, float] | None
    load_report: LoadReport | None = None
    info: dict[str, Any] = field(default_factory=dict)


def model_spec(cfg: RunConfig) -> dict[str, Any]:
    return {"name": cfg.model.name, "kwargs": cfg.model.kwargs}


def build_task_from_config(cfg: RunConfig, data: DataBundle | None) -> Task:
    import inspect

    from tunelab.registry import TASKS

    kwargs = dict(cfg.task.kwargs)
    name = kwargs.pop("name")
    if "loss" in kwargs:
        raise ConfigError("`task.loss` is not a task setting: the loss has its own section, e.g. "
                          "loss: {name: cross_entropy, label_smoothing: 0.1}")
    accepted = inspect.signature(TASKS.get(name).__init__).parameters
    if data is not None:  # the data source knows the classes when the recipe does not say
        if "num_classes" in accepted and "num_classes" not in kwargs and data.num_classes:
            kwargs["num_classes"] = data.num_classes
        if "labels" in accepted and "labels" not in kwargs and data.label_names:
            kwargs["labels"] = data.label_names
    return build_task(name, loss=cfg.loss, **kwargs)


def fill_model_from_data(cfg: RunConfig, data: DataBundle, log=print) -> None:
    """Model settings the data knows (the class count, the tokenizer's vocabulary), written into `cfg.model`
    when the model's builder takes them and the recipe leaves them out, so config.yaml records what was
    built (as fastai's learners take `n_out` from the data)."""
    import inspect

    entry, implied = resolve_builder(cfg.model.name)
    accepted = inspect.signature(entry.build).parameters
    known = {"num_classes": data.num_classes, "num_labels": data.num_classes, "vocab_size": data.vocab_size}
    filled = []
    for key, value in known.items():
        if value is None or key not in accepted or key in implied or cfg.model.kwargs.get(key) is not None:
            continue
        if key == "num_labels" and cfg.model.kwargs.get("id2label") is not None:
            continue  # the recipe's id2label sets the count
        setattr(cfg.model, key, value)
        filled.append(f"model.{key}={value}")
    if filled:
        log(f"from the data: {' '.join(filled)}")


def build_run(cfg: RunConfig, log=print) -> BuiltRun:
    seed_everything(cfg.train.seed)
    data = build_data(cfg)
    fill_model_from_data(cfg, data, log)
    task = build_task_from_config(cfg, data)
    for split, ds in (("train", data.train), ("eval", data.eval)):
        if ds is not None:
            task.check_dataset(ds, split)
    # 1. define
    model = create_model(cfg.model.name, **cfg.model.kwargs)
    # 2. initialise
    if cfg.init.scheme:
        init_weights(model, cfg.init.scheme, **cfg.init.kwargs)
    # 3. pretrained weights
    report = None
    if cfg.pretrained.path:
        report = load_pretrained(
            model, cfg.pretrained.path, allow_missing=cfg.pretrained.allow_missing,
            rename=cfg.pretrained.rename, strict=cfg.pretrained.strict,
        )
        log(report.table())
    strategy = build_strategy(cfg)
    model, lr_scales = strategy.setup(model)
    strategy.on_epoch_start(model, 0)  # what trains in the first epoch (reported before training)
    return BuiltRun(cfg, model, task, data, strategy, lr_scales, report)


def make_trainer(run: BuiltRun, callbacks: list | None = None) -> Trainer:
    cfg = run.cfg
    return Trainer(
        run.model, run.task, run.data.train, run.data.eval, config=cfg,
        callbacks=list(run.data.callbacks) + list(callbacks or []),
        collate_fn=run.data.collate_fn, lr_scales=run.lr_scales,
        train_lengths=run.data.train_lengths, eval_lengths=run.data.eval_lengths,
        strategy=run.strategy, model_spec=model_spec(cfg),
    )


# What a run writes before its first step (and `tunelab lr-find`): a folder holding only these is reused.
_START_FILES = {"config.yaml", "metrics.jsonl", "summary.json", "report.html", "tb", "checkpoints", "tokenizer",
                "load_report.json", "lr_finder.json", "lr_finder.png"}


def prepare_output_dir(cfg: RunConfig, resume: bool, overwrite: bool) -> Path | None:
    """Check `output.dir` for this start and make it ready. Nothing is deleted here: a run being replaced
    (`--overwrite`) is moved aside to a hidden sibling, whose path is returned; `replaced_output_dir`
    deletes it once the new run is built, or puts it back if building fails. A folder from a start that
    never trained (a config error found after the folder was made, or `tunelab lr-find` output) is reused."""
    out = cfg.output_dir
    if out.exists() and not out.is_dir():
        raise ConfigError(f"`output.dir` = {out} exists and is not a folder")
    entries = list(out.iterdir()) if out.is_dir() else []
    if not entries:
        if resume:
            raise ConfigError(f"{out}: nothing to resume (the output folder is empty or missing)")
        out.mkdir(parents=True, exist_ok=True)
        return None
    if resume:
        return None
    if not holds_trained_run(out):
        if all(e.name in _START_FILES for e in entries):
            return None
        raise ConfigError(
            f"{out}: output folder is not empty and holds no tunelab run "
            f"({', '.join(sorted(e.name for e in entries)[:5])}); choose another output.dir=..."
        )
    if not overwrite:
        raise ConfigError(
            f"{out}: output folder holds a run; pass --resume to continue it or --overwrite "
            f"to replace it (or choose another output.dir=...)"
        )
    here, target = Path.cwd().resolve(), out.resolve()
    if target == here or target in here.parents:
        raise ConfigError(f"`output.dir` = {out} is the current folder or holds it; --overwrite will not delete it")
    aside = out.parent / f".{out.name}.replaced-{os.getpid()}"
    out.rename(aside)
    out.mkdir()
    return aside


@contextlib.contextmanager
def replaced_output_dir(cfg: RunConfig, resume: bool, overwrite: bool) -> Iterator[None]:
    """`prepare_output_dir` around the code that builds the run: an old run moved aside by `--overwrite` is
    deleted only when that code succeeds, and restored (the new folder removed) when it raises."""
    aside = prepare_output_dir(cfg, resume, overwrite)
    try:
        yield
    except BaseException:
        if aside is not None:
            shutil.rmtree(cfg.output_dir, ignore_errors=True)
            aside.rename(cfg.output_dir)
        raise
    if aside is not None:
        shutil.rmtree(aside)


def default_callbacks(cfg: RunConfig) -> list:
    """Callbacks every CLI run gets: the run doctor and the end-of-run report (when installed)."""
    callbacks = []
    try:
        from tunelab.insight import default_callbacks as insight_callbacks
    except ImportError:
        return callbacks
    callbacks += insight_callbacks(cfg)
    return callbacks


def train(cfg: RunConfig, resume: bool = False, overwrite: bool = False, log=print) -> dict[str, Any]:
    """Build everything from `cfg`, train, evaluate; returns summary.json's content."""
    with replaced_output_dir(cfg, resume, overwrite):  # an old run is replaced only once this one builds
        if cfg.optim.lr == "auto":
            from tunelab.insight.lr_finder import resolve_auto_lr

            cfg = resolve_auto_lr(cfg, log=log)
        if cfg.train.auto_batch:
            cfg = _saved_batch(cfg) if resume else _auto_batch(cfg, log)
        run = build_run(cfg, log=log)
    return fit_run(run, resume=resume, log=log)


def _saved_batch(cfg: RunConfig) -> RunConfig:
    """On resume, the micro-batch and accumulation the run's auto batch search chose (its config.yaml)."""
    saved = cfg.output_dir / "config.yaml"
    new = cfg.model_copy(deep=True)
    if saved.is_file():
        before = load_config(saved)
        new.train.batch_size, new.train.grad_accum = before.train.batch_size, before.train.grad_accum
    new.train.auto_batch = False
    return new


def _auto_batch(cfg: RunConfig, log) -> RunConfig:
    """`train.auto_batch: true`: search the micro-batch on the GPU; on other devices keep the recipe's."""
    import torch

    from tunelab.engine.trainer import pick_device

    device = pick_device(cfg.train.device)
    if device.type == "cuda" and torch.cuda.is_available():
        from tunelab.insight.autobatch import resolve_auto_batch

        new = resolve_auto_batch(cfg, log=log)
    else:
        log(f"auto batch: searches GPU memory; on {device} the recipe's micro-batch "
            f"{cfg.train.batch_size} x accumulation {cfg.train.grad_accum} is kept")
        new = cfg.model_copy(deep=True)
    new.train.auto_batch = False  # config.yaml records the resolved sizes; a resume reuses them
    return new


_FILE_SUFFIX = re.compile(r"\.[A-Za-z0-9]{1,8}$")


def _absolute(value: Any) -> Any:
    """`value` with each relative path that exists here made absolute: strings that look like paths (a `/`
    or a file suffix) and name an existing file or folder; anything else is kept as written."""
    if isinstance(value, list):
        return [_absolute(v) for v in value]
    if isinstance(value, dict):
        return {k: _absolute(v) for k, v in value.items()}
    if (
        isinstance(value, str)
        and value
        and not os.path.isabs(value)
        and "://" not in value
        and "{" not in value
        and ("/" in value or _FILE_SUFFIX.search(value))
        and os.path.exists(os.path.expanduser(value))
    ):
        return os.path.abspath(os.path.expanduser(value))
    return value


def record_absolute_paths(cfg: RunConfig) -> None:
    """Rewrite the relative file paths in the model, init, pretrained and data sections as absolute ones,
    so that the run's config.yaml (and final/'s model spec) work from any folder: `tunelab eval RUN_DIR`,
    `predict`, `export` and `generate` rebuild data and models from them."""
    for section in (cfg.model, cfg.init, cfg.pretrained, cfg.data):
        names = [n for n in type(section).model_fields if n != "name"] + list(section.model_extra or {})
        for name in names:
            value = getattr(section, name)
            new = _absolute(value)
            if new != value:
                setattr(section, name, new)


def _changed_settings(saved: Path, cfg: RunConfig) -> dict[str, tuple[Any, Any]]:
    """Dotted keys whose value differs between the run's saved config.yaml and `cfg`: (saved, now)."""
    if not saved.is_file():
        return {}
    try:
        before = load_config(saved).to_dict()
    except TunelabError:
        return {}

    def flat(d: Any, prefix: str = "") -> dict[str, Any]:
        if not isinstance(d, dict):
            return {prefix: d}
        return {k: v for key, sub in d.items() for k, v in flat(sub, f"{prefix}{key}.").items()} or {prefix: d}

    a, b = flat(before), flat(cfg.to_dict())
    return {k.rstrip("."): (a.get(k), b.get(k)) for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)}


def fit_run(run: BuiltRun, resume: bool = False, log=print) -> dict[str, Any]:
    """Train a built run into `cfg.output_dir` (which `prepare_output_dir` has checked)."""
    cfg, out = run.cfg, run.cfg.output_dir
    total, trainable = count_parameters(run.model)
    n_train = len(run.data.train) if run.data.train is not None else 0
    n_eval = len(run.data.eval) if run.data.eval is not None else 0
    log(f"model {cfg.model.name}: {total:,} parameters, {trainable:,} trainable; "
        f"train {n_train} examples, eval {n_eval}")
    out.mkdir(parents=True, exist_ok=True)
    record_absolute_paths(cfg)
    changed = _changed_settings(out / "config.yaml", cfg) if resume else {}
    if changed:
        log("warning: resuming with changed settings: "
            + "; ".join(f"{k}: {old!r} -> {new!r}" for k, (old, new) in changed.items()))
    atomic_write_text(out / "config.yaml", cfg.to_yaml())
    if run.load_report is not None:
        atomic_write_text(out / "load_report.json", json.dumps(run.load_report.to_dict(), indent=2))
    trainer = make_trainer(run, default_callbacks(cfg))
    if run.data.info:
        trainer.log_on_start = {"data": run.data.info}
    trainer.log_on_resume = {"changed": {k: list(v) for k, v in changed.items()}} if changed else {}
    return trainer.fit(resume=resume)


# -- loading a finished run ----------------------------------------------------------------------------------


@dataclass
class LoadedRun:
    cfg: RunConfig
    model: nn.Module
    task: Task
    data: DataBundle | None
    run_dir: Path


def load_run(run_dir: str | Path, which: str = "final", overrides: list[str] | None = None,
             with_data: bool = True) -> LoadedRun:
    run_dir = Path(run_dir)
    cfg_path = run_dir / "config.yaml"
    if not run_dir.is_dir():
        raise TunelabError(f"{run_dir}: no such folder (give a run folder: output.dir of a tunelab train)")
    if not cfg_path.is_file():
        raise TunelabError(f"{run_dir}: not a tunelab run folder (no config.yaml)")
    cfg = load_config(cfg_path, overrides)
    folder = run_dir / which
    if not folder.is_dir():
        hint = " (no metric was monitored: set eval.monitor)" if which == "best" else ""
        raise TunelabError(f"{run_dir}: no {which}/ folder{hint}; did the run finish?")
    from tunelab.engine.checkpoint import verify_folder

    verify_folder(folder)
    model = load_model_folder(folder)
    data = build_data(cfg) if with_data else None
    task = build_task_from_config(cfg, data)
    return LoadedRun(cfg, model, task, data, run_dir)


def evaluate_run(run_dir: str | Path, which: str = "final", overrides: list[str] | None = None) -> dict:
    run = load_run(run_dir, which, overrides)
    if run.data.eval is None:
        raise TunelabError(f"{run_dir}: the run's data has no eval split")
    cfg = run.cfg.model_copy(deep=True)
    cfg.output.progress = False
    trainer = Trainer(run.model, run.task, run.data.train, run.data.eval, config=cfg,
                      collate_fn=run.data.collate_fn, eval_lengths=run.data.eval_lengths,
                      output_dir=run_dir)
    return trainer.evaluate()


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr)
