"""Hyperparameter sweeps with Optuna: `tunelab sweep CONFIG` and `tl.sweep(cfg, space, n_trials=...)`.

    tunelab sweep recipes/digits-sweep.yaml                     # the recipe's `sweep:` section
    tunelab sweep recipes/digits-cnn.yaml --sweep space.yaml    # or the section from its own file
    tunelab sweep recipes/digits-sweep.yaml sweep.n_trials=40 output.dir=runs/x --workers 2
    tunelab sweep recipes/digits-sweep.yaml --resume            # after a crash: each trial once
    tunelab sweep --best recipes/digits-sweep.yaml > best.yaml  # the best recipe, ready to train

Each trial is an ordinary tunelab run in `output.dir/trial-NNN/`; the study lives in `output.dir/study.db`
(Optuna's RDB storage on SQLite). The pruner reads the objective at each evaluation and stops a trial there
(status `pruned`); a trial whose loss diverges ends `failed` with the run doctor's diagnosis and the study
goes on. At the end: sweep.json, report.html, and `best` -> the best trial's final/. The section's keys
are in `tunelab.sweeps.plan`, the folder and the each-trial-once design in `tunelab.sweeps.study`.

The command line is `tunelab.commands.sweep`. Optuna is imported only when a sweep runs
(`pip install 'tunelab[sweep]'`).
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tunelab.errors import ConfigError

if TYPE_CHECKING:
    from tunelab.config import RunConfig
    from tunelab.sweeps.plan import SweepPlan


def threads_per_worker(workers: int) -> int:
    return max(1, len(os.sched_getaffinity(0)) // workers)


def run_sweep(plan: SweepPlan, resume: bool = False, overwrite: bool = False, workers: int = 1,
              log=print) -> dict[str, Any]:
    """Open (or continue, or join) the plan's study, work on it with `workers` processes (this one and
    `workers - 1` started here), then write sweep.json, best and report.html; returns sweep.json's content."""
    from tunelab.sweeps.study import Sweep

    if workers < 1:
        raise ConfigError(f"--workers {workers}: must be at least 1")
    sweep = Sweep(plan, log)
    sweep.open(resume=resume, overwrite=overwrite)
    try:
        children = []
        if workers > 1:
            if "OMP_NUM_THREADS" not in os.environ:  # share the cores out rather than oversubscribe them
                import torch

                torch.set_num_threads(threads_per_worker(workers))
            children = sweep.spawn_workers(workers - 1, threads_per_worker(workers))
        deadline = time.monotonic() + plan.options.timeout if plan.options.timeout else None
        try:
            sweep.work(deadline)
        finally:
            for child in children:
                child.wait()
        codes = [child.returncode for child in children if child.returncode]
        if codes:
            log(f"warning: {len(codes)} worker process(es) exited with code(s) {codes}; `--resume` continues "
                "what they left")
        return sweep.finish()
    finally:
        sweep.close()


def run_worker(plan: SweepPlan, log=print) -> None:
    """A process started by `--workers`: join the study the parent opened and claim trials until none is
    left (the parent checked the plan)."""
    from tunelab.sweeps.study import Sweep

    worker = Sweep(plan, log)
    worker.join()
    try:
        worker.work(time.monotonic() + plan.options.timeout if plan.options.timeout else None)
    finally:
        worker.close()


def sweep(cfg: RunConfig | str | Path | dict, space: dict[str, Any] | None = None, *, n_trials: int | None = None,
          timeout: float | None = None, resume: bool = False, overwrite: bool = False, workers: int = 1,
          log=print, **options: Any) -> dict[str, Any]:
    """Search `space` (dotted recipe key -> distribution, as in a recipe's `sweep.space`) over the recipe
    `cfg`, as `tunelab sweep` does; keyword `options` are the other `sweep:` keys (objective, mode, sampler,
    pruner, seed, importance) and override the recipe's. Returns sweep.json's content."""
    from tunelab.config import OpenSection, RunConfig, load_config
    from tunelab.sweeps.plan import plan_sweep

    cfg = cfg.model_copy(deep=True) if isinstance(cfg, RunConfig) else load_config(cfg)
    section = dict(cfg.sweep.kwargs)
    for key, value in {"space": space, "n_trials": n_trials, "timeout": timeout, **options}.items():
        if value is not None:
            section[key] = value
    cfg.sweep = OpenSection(**section)
    return run_sweep(plan_sweep(cfg), resume=resume, overwrite=overwrite, workers=workers, log=log)


def best_recipe(plan: SweepPlan) -> str:
    """The best completed trial's recipe as YAML, ready for `tunelab train` (its own output.dir)."""
    import optuna
    import yaml
    from optuna.trial import TrialState

    from tunelab.sweeps.study import STUDY_FILE, check_study_file, open_storage

    db = plan.folder / STUDY_FILE
    if plan.name not in check_study_file(db):
        raise ConfigError(f"{plan.folder}: no sweep named {plan.name!r} there (no {STUDY_FILE} or another "
                          "study); run `tunelab sweep` first")
    study = optuna.load_study(study_name=plan.name, storage=open_storage(db))
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if not complete:
        raise ConfigError(f"{plan.folder}: no trial has completed yet; nothing to recommend")
    best = study.best_trial
    recipe = plan.trial_config(best.params, best.number).to_dict()
    recipe.pop("sweep")
    recipe["name"] = f"{plan.name}-best"
    recipe["output"]["dir"] = f"{plan.folder}-best"
    lines = [f"# The best of {len(complete)} completed trials of the sweep in {plan.folder}: trial {best.number}, "
             f"{plan.objective} {best.value:.6g}",
             *(f"#   {k}: {v!r}" for k, v in best.params.items()),
             f"#   tunelab train THIS_FILE      (trains into {recipe['output']['dir']})"]
    return "\n".join(lines) + "\n" + yaml.safe_dump(recipe, sort_keys=False)
