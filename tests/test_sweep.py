"""Sweeps: the `sweep:` section's checks, a trial's recipe, pruning at an evaluation, the storage-file check
and the Python API (tunelab.sweeps), on the digits recipe."""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3

import optuna
import pytest
import yaml

import tunelab as tl
from tests.helpers import REPO
from tunelab.config import load_config
from tunelab.errors import ConfigError
from tunelab.sweeps import best_recipe
from tunelab.sweeps.plan import flatten_space, parse_distribution, plan_sweep
from tunelab.sweeps.study import PruneOnEval, check_study_file

RECIPE = REPO / "recipes" / "digits-sweep.yaml"
SHORT = ["train.max_steps=20", "eval.every=10", "output.progress=false"]


def _cfg(tmp_path, *overrides: str):
    return load_config(RECIPE, [f"output.dir={tmp_path / 'sweep'}", *SHORT, *overrides])


@pytest.mark.parametrize(
    "spec, fragments",
    [
        ({"loguniform": [0.1, 0.001]}, ["bounds [0.1, 0.001] are reversed", "write [0.001, 0.1]"]),
        ({"loguniform": [0, 0.1]}, ["log scale needs bounds above 0"]),
        ({"float": [1.0e-5, 0.1], "log": True, "step": 0.01}, ["`step` and a log scale"]),
        ({"int": [16, 64.5]}, ["whole-number bounds"]),
        ({"uniform": [0.0]}, ["takes [low, high]"]),
        ({"normal": [0, 1]}, ["give one distribution"]),
        ({"uniform": [0, 1], "step": 0.1}, ["unknown key `sweep.space.optim.lr.step`"]),
        ({"categorical": []}, ["non-empty list"]),
        ({"categorical": [[1, 2]]}, ["categorical choices are numbers, strings"]),
    ],
)
def test_bad_distributions_are_one_clear_error(spec, fragments):
    with pytest.raises(ConfigError) as e:
        parse_distribution("optim.lr", spec)
    for fragment in fragments:
        assert fragment in str(e.value)
    assert "`sweep.space.optim.lr" in str(e.value) and "\n" not in str(e.value)


def test_space_syntax():
    # YAML reads 1e-5 (no dot) as text: numeric text is a bound; nested sections equal dotted keys
    flat = flatten_space({"optim": {"lr": {"loguniform": ["1e-5", 1.0e-2]}}, "train.batch_size": {"int": [16, 64], "step": 16}})
    assert list(flat) == ["optim.lr", "train.batch_size"]
    lr, bs = (parse_distribution(k, v) for k, v in flat.items())
    assert (lr.low, lr.high, lr.log) == (1e-5, 1e-2, True)
    assert (bs.low, bs.high, bs.step) == (16, 64, 16)


@pytest.mark.parametrize(
    "overrides, fragments",
    [
        (["sweep.space.optim.lrr={loguniform: [0.001, 0.1]}"], ["sweep.space: unknown key `optim.lrr`", "`optim.lr`"]),
        (["sweep.space.model.widht={categorical: [16, 32]}"], ["sweep.space `model.widht`", "did you mean `width`"]),
        (["sweep.space.strategy.r={categorical: [4, 8]}"], ["sweep.space `strategy.r`", "unknown key `strategy.r`"]),
        (["sweep.space.train.batch_size={int: [0, 64]}"], ["`train.batch_size` reaches 0", "greater than 0"]),
        (["sweep.space.output.dir={categorical: [a, b]}"], ["cannot vary `output`"]),
        (["sweep.objective=auroc"], ["`sweep.objective` = 'auroc' is not a metric of task `classification`",
                                     "accuracy, f1_macro"]),
        (["eval.monitor=acc", "sweep.objective=null"], ["`eval.monitor` (the sweep's objective) = 'acc'"]),
        (["sweep.n_trials=null"], ["give `sweep.n_trials` or `sweep.timeout`"]),
        (["sweep.sampler=tpee"], ["`sweep.sampler` = 'tpee'", "did you mean `tpe`"]),
        (["sweep.pruner={name: median, n_startup: 3}"], ["unknown key `sweep.pruner.n_startup`"]),
        (["sweep.sampler=grid"], ["`sampler: grid` needs a finite set of values"]),
        (["sweep.n_trialz=3"], ["unknown key `sweep.n_trialz`", "did you mean `n_trials`"]),
        (["sweep={}"], ["no `sweep:` section"]),
    ],
)
def test_bad_sweep_sections_are_one_clear_error(tmp_path, overrides, fragments):
    with pytest.raises(ConfigError) as e:
        plan_sweep(_cfg(tmp_path, *overrides), str(RECIPE))
    message = str(e.value)
    assert message.startswith(str(RECIPE)) and "\n" not in message, message
    for fragment in fragments:
        assert fragment in message, message
    assert not (tmp_path / "sweep").exists()  # nothing written


def test_plan_defaults_and_trial_config(tmp_path):
    plan = plan_sweep(_cfg(tmp_path), str(RECIPE))
    assert (plan.objective, plan.mode, plan.target_trials) == ("accuracy", "max", 20)  # eval.monitor, its mode
    cfg = plan.trial_config({"optim.lr": 0.123, "loss.label_smoothing": 0.05}, 7)
    assert cfg.optim.lr == 0.123 and cfg.loss.label_smoothing == 0.05 and cfg.optim.momentum == 0.9
    assert cfg.output_dir == tmp_path / "sweep" / "trial-007" and cfg.name == "digits-sweep-trial-007"
    assert cfg.sweep.kwargs == {}  # a trial's config.yaml is a plain recipe
    grid = plan_sweep(_cfg(tmp_path, "sweep.sampler=grid", "sweep.n_trials=null",
                           "sweep.space={optim.lr: {categorical: [0.01, 0.1]}, train.batch_size: {int: [16, 64], step: 16}}"))
    assert grid.target_trials == 8  # every grid point once


def test_prune_on_eval_stops_the_run_with_status_pruned(tmp_path):
    """The pruner's verdict at an evaluation stops the trainer there, and summary.json says `pruned`."""
    study = optuna.create_study(direction="maximize", pruner=optuna.pruners.ThresholdPruner(lower=2.0))
    trial = study.ask()  # accuracy is always below 2: pruned at the first evaluation it may prune at
    cfg = load_config(RECIPE, [f"output.dir={tmp_path / 'run'}", *SHORT, "train.max_steps=40"])
    summary = tl.train(cfg, callbacks=[PruneOnEval(trial, "accuracy")], log=lambda m: None)
    assert summary["status"] == "pruned" and summary["global_step"] == 10
    assert "pruned by the sweep at step 10" in summary["stop_reason"]
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["status"] == "pruned"
    assert (tmp_path / "run" / "final" / "model.safetensors").is_file()
    assert study.trials[0].intermediate_values == {10: summary["metrics"]["accuracy"]}


def _digest(folder):
    return {p.relative_to(folder): hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.rglob("*") if p.is_file()}


def test_a_storage_file_that_is_not_a_study_is_refused_untouched(tmp_path):
    garbage = tmp_path / "a" / "study.db"
    garbage.parent.mkdir()
    garbage.write_bytes(b"not a database " * 100)
    foreign = tmp_path / "b" / "study.db"
    foreign.parent.mkdir()
    con = sqlite3.connect(foreign)
    con.execute("CREATE TABLE notes (text)")
    con.commit()
    con.close()
    before = {f: _digest(f.parent) for f in (garbage, foreign)}
    with pytest.raises(ConfigError, match="not an Optuna study .*choose another output.dir"):
        check_study_file(garbage)
    with pytest.raises(ConfigError, match=r"an SQLite file but not an Optuna study \(tables: notes\)"):
        check_study_file(foreign)
    with pytest.raises(ConfigError, match="not an Optuna study"):  # through the API: nothing written either
        tl.sweep(_cfg(tmp_path, f"output.dir={garbage.parent}"), log=lambda m: None)
    assert {f: _digest(f.parent) for f in (garbage, foreign)} == before


def test_python_api_sweep_and_best_recipe(tmp_path):
    cfg = _cfg(tmp_path)
    results = tl.sweep(cfg, {"optim.lr": {"loguniform": [0.01, 0.3]}}, n_trials=2, pruner="none", log=lambda m: None)
    folder = tmp_path / "sweep"
    assert [t["number"] for t in results["trials"]] == [0, 1]
    assert all(t["state"] == "complete" and t["status"] == "completed" for t in results["trials"])
    best = results["best"]
    assert best["value"] == max(t["value"] for t in results["trials"])
    assert (folder / "best").resolve() == (folder / best["run_dir"] / "final").resolve()
    assert json.loads((folder / "sweep.json").read_text())["best"]["number"] == best["number"]
    for t in results["trials"]:  # each trial is an ordinary run with its parameters in config.yaml
        trial_cfg = load_config(folder / t["run_dir"] / "config.yaml")
        assert trial_cfg.optim.lr == t["params"]["optim.lr"]
        assert json.loads((folder / t["run_dir"] / "summary.json").read_text())["metrics"]["accuracy"] == t["value"]
    text = best_recipe(plan_sweep(cfg, check=False))
    recipe = load_config(yaml.safe_load(text))
    assert recipe.optim.lr == best["params"]["optim.lr"] and recipe.output.dir == f"{folder}-best"
    assert "sweep" not in yaml.safe_load(text) and text.startswith("# The best of 2 completed trials")
    # the same sweep again: the folder holds it, so it needs --resume (which finds nothing left to do)
    with pytest.raises(ConfigError, match="holds a sweep .*pass --resume"):
        tl.sweep(cfg, {"optim.lr": {"loguniform": [0.01, 0.3]}}, n_trials=2, pruner="none", log=lambda m: None)
    again = tl.sweep(cfg, {"optim.lr": {"loguniform": [0.01, 0.3]}}, n_trials=2, pruner="none", resume=True,
                     log=lambda m: None)
    assert [t["number"] for t in again["trials"]] == [0, 1] and again["best"] == best
    with pytest.raises(ConfigError, match=r"started with `space.optim.lr` = 'loguniform \[0.01, 0.3\]'"):
        tl.sweep(cfg, {"optim.lr": {"loguniform": [0.01, 0.5]}}, n_trials=2, pruner="none", resume=True,
                 log=lambda m: None)
    # --overwrite starts afresh (the old sweep goes only once the new study exists)
    fresh = tl.sweep(cfg, {"optim.lr": {"loguniform": [0.01, 0.5]}}, n_trials=1, pruner="none", overwrite=True,
                     log=lambda m: None)
    assert len(fresh["trials"]) == 1 and not (folder / "trial-001").exists()
    assert not list(tmp_path.glob(".sweep.replaced-*"))


@pytest.fixture(scope="module")
def finished_sweep(tmp_path_factory):
    folder = tmp_path_factory.mktemp("finished") / "sweep"
    cfg = load_config(RECIPE, [f"output.dir={folder}", *SHORT])
    tl.sweep(cfg, n_trials=2, log=lambda m: None)  # the recipe's search, as the command line runs it
    return folder


@pytest.mark.parametrize(
    "overrides, fragment",
    [
        (["sweep.space.optim.lrr={loguniform: [0.001, 0.1]}"], "sweep.space: unknown key `optim.lrr`"),
        (["sweep.space.optim.lr={loguniform: [0.1, 0.001]}"], "the bounds [0.1, 0.001] are reversed"),
        (["sweep.space.optim.lr={loguniform: [0, 0.1]}"], "a log scale needs bounds above 0"),
        (["sweep.objective=bleu"], "`sweep.objective` = 'bleu' is not a metric of task `classification`"),
        (["sweep.space.optim.lr={loguniform: [1.0e-3, 0.5]}"], "this sweep was started with `space.optim.lr`"),
        (["optim.momentum=0.5"], "this sweep was started with `optim.momentum` = '0.9', not '0.5'"),
    ],
)
def test_bad_input_is_one_line_and_leaves_the_sweep_folder_as_it_was(finished_sweep, capsys, overrides, fragment):
    from tunelab.cli import main

    before = _digest(finished_sweep)
    code = main(["sweep", str(RECIPE), f"output.dir={finished_sweep}", *SHORT, *overrides, "--resume"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in err and err.startswith("error: ") and fragment in err, err
    assert _digest(finished_sweep) == before


def test_the_sweep_folder_is_claimed_like_a_run_folder(finished_sweep):
    """The folder carries tunelab's marker, saying it holds a sweep: `train` into it is refused, and
    `--overwrite` is refused while a process works on the sweep (holds the marker shared); nothing changes."""
    from tunelab.engine.rundir import marker_kind
    from tunelab.sweeps.study import Locks

    assert marker_kind(finished_sweep) == "sweep folder"
    before = _digest(finished_sweep)
    with pytest.raises(ConfigError, match="holds a tunelab sweep folder, not a run"):
        tl.train(load_config(RECIPE, [f"output.dir={finished_sweep}", *SHORT]), log=lambda m: None)
    cfg = load_config(RECIPE, [f"output.dir={finished_sweep}", *SHORT])
    worker = Locks(finished_sweep).hold_worker()  # another process working on the sweep
    try:
        with pytest.raises(ConfigError, match="processes are working on this sweep; --overwrite waits"):
            tl.sweep(cfg, n_trials=1, overwrite=True, log=lambda m: None)
    finally:
        os.close(worker)
    assert _digest(finished_sweep) == before
    assert not list(finished_sweep.parent.glob(".sweep.*"))


def test_an_interrupted_overwrite_puts_the_old_sweep_back(tmp_path):
    """A kill after `--overwrite` moved the old sweep aside, before the new study existed: the next start
    restores it (tunelab.engine.rundir.recover_interrupted_overwrite), and --resume finds the old trials."""
    cfg = _cfg(tmp_path)
    tl.sweep(cfg, n_trials=1, pruner="none", log=lambda m: None)
    folder = tmp_path / "sweep"
    before = _digest(folder)
    folder.rename(tmp_path / ".sweep.replaced-99999999")  # what the killed --overwrite left
    folder.mkdir()
    (folder / ".tunelab").write_text('{"tunelab": "sweep folder"}')
    again = tl.sweep(cfg, n_trials=1, pruner="none", resume=True, log=lambda m: None)
    assert [t["number"] for t in again["trials"]] == [0] and not list(tmp_path.glob(".sweep.*"))
    assert (folder / "trial-000" / "final").is_dir() and set(before) <= set(_digest(folder))


def test_a_storage_file_that_is_not_a_study_on_the_cli(tmp_path, capsys):
    from tunelab.cli import main

    (tmp_path / "study.db").write_bytes(b"SQLite format 3\x00 but not really" * 10)
    before = _digest(tmp_path)
    for extra in ([], ["--resume"], ["--best"]):
        code = main(["sweep", str(RECIPE), f"output.dir={tmp_path}", *SHORT, *extra])
        err = capsys.readouterr().err.strip()
        assert code == 2 and "\n" not in err and f"{tmp_path / 'study.db'}: not an Optuna study" in err, err
    assert _digest(tmp_path) == before


def test_a_time_budget_ends_the_sweep_after_the_trial_running_then(tmp_path):
    results = tl.sweep(_cfg(tmp_path, "sweep.n_trials=null"), timeout=0.001, pruner="none", log=lambda m: None)
    assert [t["state"] for t in results["trials"]] == ["complete"] and results["n_trials"] is None


def test_importances_judge_log_sampled_parameters_on_their_log_scale():
    """The objective rises with log10(lr) across [1e-5, 1e-1] and ignores `noise`; pruned trials count at the
    value they were pruned with. On the raw scale (Optuna's evaluators) lr's marginal would be flat below 0.01."""
    import math
    import random

    from tunelab.insight.sweep_report import param_importances

    study = optuna.create_study(direction="maximize")
    rng = random.Random(0)
    lr_dist = optuna.distributions.FloatDistribution(1e-5, 1e-1, log=True)
    noise_dist = optuna.distributions.FloatDistribution(0.0, 1.0)
    for i in range(30):
        lr, noise = 10 ** rng.uniform(-5, -1), rng.uniform(0, 1)
        state = optuna.trial.TrialState.PRUNED if i % 3 == 0 else optuna.trial.TrialState.COMPLETE
        study.add_trial(optuna.trial.create_trial(
            state=state, value=math.log10(lr), intermediate_values={10: math.log10(lr)},
            params={"lr": lr, "noise": noise},
            distributions={"lr": lr_dist, "noise": noise_dist}))
    for evaluator in ("fanova", "mdi"):
        importances = param_importances(study, evaluator)
        assert importances["lr"] > 0.8 > importances["noise"], (evaluator, importances)
    assert param_importances(optuna.create_study()) == {}
