"""From a RunConfig to a trained run directory, and back from a run directory to a model.

The six steps, in order: data -> (1) model -> (2) init -> (3) pretrained weights -> strategy ->
(4) task/loss + optimizer (inside the Trainer) -> (5) train -> (6) evaluate.
"""

from __future__ import annotations

import json
import os
import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from tunelab.config import RunConfig, load_config, parse_override
from tunelab.data.base import DataBundle, build_data, data_fingerprint, describe_splits, is_labelled
from tunelab.engine.callbacks import TestSetEval
from tunelab.engine.checkpoint import CheckpointManager
from tunelab.engine.meter import FlopsCallback
from tunelab.engine.rundir import claim_run_dir
from tunelab.engine.trainer import Trainer
from tunelab.errors import ConfigError, TunelabError
from tunelab.io import atomic_write_text
from tunelab.models import (
    check_trusted,
    create_model,
    create_model_on_meta,
    load_model_folder,
    resolve_builder,
)
from tunelab.registry import CALLBACKS, DATA, RESOLVERS, STRATEGIES, TASKS
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
    load_after_sharding: Any = None  # FSDP on meta: fills the shards (engine.Trainer.load_after_sharding)


def model_spec(cfg: RunConfig) -> dict[str, Any]:
    return {"name": cfg.model.name, "kwargs": cfg.model.kwargs}


def build_task_from_config(cfg: RunConfig, data: DataBundle | None) -> Task:
    import inspect

    kwargs = dict(cfg.task.kwargs)
    name = kwargs.pop("name")
    accepted = inspect.signature(TASKS.resolve(name).__init__).parameters
    if "loss" in kwargs and "loss_type" in accepted:  # `task: {name: dpo, loss: ipo}` names the loss variant
        kwargs["loss_type"] = kwargs.pop("loss")
    if "loss" in kwargs:
        raise ConfigError("`task.loss` is not a task setting: the loss has its own section, e.g. "
                          "loss: {name: cross_entropy, label_smoothing: 0.1}")
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
    strategy = build_strategy(cfg)
    on_meta = _build_on_meta(cfg, strategy)
    if on_meta is not None:  # FSDP: steps 1-3 happen on shards, inside the Trainer (see load_after_sharding)
        model, weights = on_meta
        report = None
    else:
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
    model, lr_scales = strategy.setup(model)
    strategy.on_epoch_start(model, 0)  # what trains in the first epoch (reported before training)
    if hasattr(task, "bind"):  # e.g. DPO takes its frozen reference from the initial model
        task.bind(model, data)
    run = BuiltRun(cfg, model, task, data, strategy, lr_scales, report)
    if on_meta is not None:
        run.load_after_sharding = _shard_loader(run, weights, log)
    return run


def _build_on_meta(cfg: RunConfig, strategy: Strategy) -> tuple[nn.Module, str | None] | None:
    """Under torchrun with `train.distributed.strategy: fsdp` and `meta_init`, the model built on the meta
    device (when its source can) and its weights' path; else None. LoRA builds its base normally: peft
    makes its adapters on the real weights."""
    d = cfg.train.distributed
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or d.strategy != "fsdp" or not d.meta_init:
        return None
    if getattr(strategy, "checkpoint_trainable_only", False):
        return None
    built = create_model_on_meta(cfg.model.name, **cfg.model.kwargs)
    if built is not None and d.meta_init == "auto" and built[1] is None and not cfg.pretrained.path:
        return None  # from scratch: the same init as one process (the meta model is simply dropped)
    return built


def _shard_loader(run: BuiltRun, weights: str | None, log) -> Any:
    """What fills a sharded model built on meta: the recipe's init, then its pretrained weights (or the
    source's own), read shard by shard, with the LoadReport a normal load gives."""
    cfg = run.cfg

    def load(model: nn.Module) -> None:
        from tunelab.engine.fsdp import load_pretrained_shards

        if cfg.init.scheme:
            init_weights(model, cfg.init.scheme, **cfg.init.kwargs)
        source = cfg.pretrained.path or weights
        if source is None:
            return
        p = cfg.pretrained
        run.load_report = load_pretrained_shards(model, source, allow_missing=p.allow_missing, rename=p.rename,
                                                 strict=p.strict)
        if is_main_process():
            log(run.load_report.table())
            atomic_write_text(cfg.output_dir / "load_report.json", json.dumps(run.load_report.to_dict(), indent=2))

    return load


def make_trainer(run: BuiltRun, callbacks: list | None = None) -> Trainer:
    """The Trainer of a built run, with the callbacks its data adds (artefact writers, MFU) and `callbacks`."""
    cfg = run.cfg
    from_data = list(run.data.callbacks)
    if run.data.tokens_per_sample:
        from_data.append(FlopsCallback(run.data.tokens_per_sample))
    return Trainer(
        run.model, run.task, run.data.train, run.data.eval, config=cfg,
        callbacks=from_data + list(callbacks or []),
        collate_fn=run.data.collate_fn, lr_scales=run.lr_scales,
        train_lengths=run.data.train_lengths, eval_lengths=run.data.eval_lengths,
        strategy=run.strategy, model_spec=model_spec(cfg),
    )


def default_callbacks(cfg: RunConfig, data: DataBundle) -> list:
    """Callbacks every run gets from the layers above (the CALLBACKS registry, in its order): the doctor,
    sample generations, the report, MLflow tracking (when `output.mlflow` is set), and any a plug-in
    registers. A provider whose optional dependencies are missing is left out."""
    callbacks = []
    for name in CALLBACKS.ordered():
        try:
            provider = CALLBACKS.get(name)
        except TunelabError:
            continue
        callbacks += provider(cfg, data)
    return callbacks


def is_main_process() -> bool:
    """Rank 0 of a torchrun job, or a plain process: the one that owns the run folder."""
    return int(os.environ.get("RANK", "0")) == 0


def train(cfg: RunConfig, resume: bool = False, overwrite: bool = False, log=print,
          allow_data_change: bool = False, callbacks: list | None = None) -> dict[str, Any]:
    """Build everything from `cfg`, train, evaluate; returns summary.json's content. The run folder is
    locked for the whole run; with `overwrite`, the old run is deleted only once the new one has built.
    `callbacks` are added after the default ones (a sweep's pruner)."""
    if not resume and auto_resume(cfg):
        log(f"auto-resume: continuing from the newest checkpoint in {cfg.output_dir}")
        resume, overwrite = True, False
    with claim_run_dir(cfg.output_dir, resume, overwrite, main=is_main_process()) as run_dir:
        if cfg.optim.lr == "auto":
            cfg = RESOLVERS.get("optim.lr")(cfg, log=log)  # the LR finder (tunelab.insight.lr_finder)
        if cfg.train.auto_batch:
            cfg = _saved_batch(cfg) if resume else RESOLVERS.get("train.auto_batch")(cfg, log=log)
        run = build_run(cfg, log=log)
        run_dir.commit()
        return fit_run(run, resume=resume, log=log, allow_data_change=allow_data_change, callbacks=callbacks)


def auto_resume(cfg: RunConfig) -> bool:
    """Resume without --resume: `train.auto_resume`, or a job that torchrun restarted (`--max-restarts`, the
    TORCHELASTIC_RESTART_COUNT it sets), when the run folder holds a checkpoint. The restarted command line is
    the first one, so a restart never repeats its --overwrite."""
    restarted = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0) > 0
    if not (cfg.train.auto_resume or restarted):
        return False
    return bool(CheckpointManager(cfg.output_dir / "checkpoints").steps())


def _saved_batch(cfg: RunConfig) -> RunConfig:
    """On resume, the micro-batch and accumulation the run's auto batch search chose (its config.yaml)."""
    saved = cfg.output_dir / "config.yaml"
    new = cfg.model_copy(deep=True)
    if saved.is_file():
        before = load_config(saved)
        new.train.batch_size, new.train.grad_accum = before.train.batch_size, before.train.grad_accum
    new.train.auto_batch = False
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


def _test_split(run: BuiltRun, log=print) -> list:
    """The callback that scores a labelled test split at the end of the run (before the report reads the
    summary); an unlabelled one is left to `tunelab predict`."""
    test = run.data.test
    if test is None:
        return []
    if not is_labelled(test):
        log(f"test split: {len(test)} rows without labels: not scored at the end (tunelab predict labels them)")
        return []
    return [TestSetEval(test)]


def fit_run(run: BuiltRun, resume: bool = False, log=print, allow_data_change: bool = False,
            callbacks: list | None = None) -> dict[str, Any]:
    """Train a built run into `cfg.output_dir` (the Trainer claims and locks the folder)."""
    cfg, out = run.cfg, run.cfg.output_dir
    total, trainable = count_parameters(run.model)
    log(f"model {cfg.model.name}: {total:,} parameters, {trainable:,} trainable; {describe_splits(run.data)}")
    record_absolute_paths(cfg)
    trainer = make_trainer(run, _test_split(run, log) + default_callbacks(cfg, run.data) + list(callbacks or []))
    trainer.data_fingerprint = data_fingerprint(cfg, run.data)
    trainer.load_after_sharding = run.load_after_sharding
    trainer.allow_data_change = allow_data_change
    if run.data.info:
        trainer.log_on_start = {"data": run.data.info}
    main = is_main_process()
    with claim_run_dir(out, resume=resume, main=main):
        changed = _changed_settings(out / "config.yaml", cfg) if resume else {}
        if changed:
            log("warning: resuming with changed settings: "
                + "; ".join(f"{k}: {old!r} -> {new!r}" for k, (old, new) in changed.items()))
        saved = out / "config.yaml"
        previous = saved.read_text() if resume and main and saved.is_file() else None
        if main:
            atomic_write_text(saved, cfg.to_yaml())
            if run.load_report is not None:
                atomic_write_text(out / "load_report.json", json.dumps(run.load_report.to_dict(), indent=2))
        trainer.log_on_resume = {"changed": {k: list(v) for k, v in changed.items()}} if changed else {}
        try:
            return trainer.fit(resume=resume)
        except BaseException:
            if previous is not None and trainer.global_step == 0:  # refused before any checkpoint was restored
                atomic_write_text(saved, previous)  # (e.g. another model): the run's config stays its own
            raise


# -- loading a finished run ----------------------------------------------------------------------------------


@dataclass
class LoadedRun:
    cfg: RunConfig
    model: nn.Module
    task: Task
    data: DataBundle | None
    run_dir: Path


def check_config_trusted(cfg: RunConfig, trust_code: bool, where: str | Path) -> None:
    """A run folder's config.yaml may come from anyone: an import path in any plug-in name (or the model's
    `trust_remote_code`) needs the user's --trust-code before anything is imported or built from it."""
    check_trusted(model_spec(cfg), trust_code, where)
    for section, registry in (("data", DATA), ("task", TASKS), ("strategy", STRATEGIES)):
        name = str(getattr(cfg, section).kwargs.get("name", ""))
        if not trust_code and registry.is_import_path(name):
            raise TunelabError(f"{where}: `{section}.name` = {name!r} is Python code to import; a run folder may "
                               "come from anyone, so this needs --trust-code (pass it only for folders you trust)")


# Sections that decide what the saved model is or how it was trained: a loaded run's model comes from its
# folder, so overriding them would change nothing (silently).
_FIXED_SECTIONS = ("model", "init", "pretrained", "strategy", "optim", "schedule")


def _refuse_ignored_overrides(overrides: list[str] | None, folder: Path) -> None:
    fixed = [o for o in overrides or [] if parse_override(o)[0][0] in _FIXED_SECTIONS]
    if fixed:
        raise ConfigError(
            f"{' '.join(fixed)}: {folder} holds the model as trained, so {', '.join(_FIXED_SECTIONS)} overrides "
            "would be ignored; override data, task, loss or eval keys here, or train a new run with these settings")


def load_run(run_dir: str | Path, which: str = "final", overrides: list[str] | None = None,
             with_data: bool = True, trust_code: bool = False) -> LoadedRun:
    """The trained model of a run folder, with its task (and data). Code named by the folder's files runs
    only with `trust_code` (the CLI's --trust-code)."""
    run_dir = Path(run_dir)
    cfg_path = run_dir / "config.yaml"
    if not run_dir.is_dir():
        raise TunelabError(f"{run_dir}: no such folder (give a run folder: output.dir of a tunelab train)")
    if not cfg_path.is_file():
        raise TunelabError(f"{run_dir}: not a tunelab run folder (no config.yaml)")
    _refuse_ignored_overrides(overrides, run_dir / which)
    cfg = load_config(cfg_path, overrides)
    check_config_trusted(cfg, trust_code, cfg_path)
    folder = run_dir / which
    if not folder.is_dir():
        hint = " (no metric was monitored: set eval.monitor)" if which == "best" else ""
        raise TunelabError(f"{run_dir}: no {which}/ folder{hint}; did the run finish?")
    model = load_model_folder(folder, trust_code=trust_code)  # checks the folder's manifest
    data = build_data(cfg) if with_data else None
    task = build_task_from_config(cfg, data)
    return LoadedRun(cfg, model, task, data, run_dir)


def evaluate_run(run_dir: str | Path, which: str = "final", overrides: list[str] | None = None,
                 trust_code: bool = False, split: str = "eval", data_path: str | None = None,
                 log=lambda message: None) -> dict:
    """A run's final (or best) weights scored on its eval or test split; `data_path`: on that labelled file,
    read as the run's data source reads its test file (`data.test`)."""
    if data_path is not None:
        overrides, split = [*(overrides or []), f"data.test={Path(data_path).resolve()}"], "test"
    run = load_run(run_dir, which, overrides, trust_code=trust_code)
    dataset = run.data.eval if split == "eval" else run.data.test
    where = data_path or f"{run_dir}: the run's data"
    if dataset is None:
        raise TunelabError(f"{where} has no {split} split" + (" (give one with --data PATH or data.test=PATH)"
                                                              if split == "test" else ""))
    if not is_labelled(dataset):
        raise TunelabError(f"{where}: the {split} rows have no labels to score against (tunelab predict labels them)")
    log(f"scoring {run_dir}/{which} on the {split} split" + (f" ({data_path})" if data_path else "")
        + f": {len(dataset):,} rows")
    return _evaluator(run.cfg, run.model, run.task, run.data, run_dir).evaluate(dataset)


def evaluate_base(config_path: str | Path, overrides: list[str] | None = None, log=print) -> dict:
    """`tunelab eval CONFIG --base`: the recipe's model as training would start it (pretrained weights,
    strategy applied, nothing trained) scored on its eval split: the baseline a fine-tune must beat."""
    cfg = load_config(config_path, overrides)
    run = build_run(cfg, log=log)
    if run.data.eval is None:
        raise TunelabError(f"{config_path}: the recipe's data has no eval split (set the data source's eval key)")
    if run.load_after_sharding is not None:
        raise TunelabError("--base builds one process's model; run it without torchrun")
    log(f"scoring the untrained model of {config_path} on the eval split: {len(run.data.eval):,} rows")
    return _evaluator(cfg, run.model, run.task, run.data, None).evaluate()


def _evaluator(cfg: RunConfig, model: nn.Module, task: Task, data: DataBundle, out: Path | None) -> Trainer:
    """A Trainer that only evaluates `data.eval` (no progress display, nothing written)."""
    cfg = cfg.model_copy(deep=True)
    cfg.output.progress = False
    cfg.eval.at_start = False
    return Trainer(model, task, data.train, data.eval, config=cfg, collate_fn=data.collate_fn,
                   eval_lengths=data.eval_lengths, output_dir=out)
