"""A sweep's folder and its Optuna study: which process runs which trial, each exactly once, across crashes.

The folder (`output.dir`):
    study.db        Optuna's RDB storage (SQLite): trials, parameters, intermediate values, states
    sweep.yaml      the recipe with its resolved sweep section (what worker processes read)
    trial-NNN/      one ordinary tunelab run per trial, NNN being Optuna's trial number
    sweep.json      every trial (params, objective, state, status, wall time), the best one, importances
    report.html     the sweep report (tunelab.insight.sweep_report)
    best            -> trial-NNN/final: the best trial's final weights (a relative symlink)
    .tunelab        the marker of a folder tunelab made (as a run folder's, tunelab.engine.rundir), saying
                    `sweep folder`; also a flock, held shared by every process working on the sweep
    .locks/         flock files: sweep.lock (claims), trial-NNN.lock

One sweep per folder. The marker is held shared by each process working on the sweep, so several
processes (`--workers`, or the same command started twice) share one study, while `--overwrite` takes it
exclusively (`RunLock`), which it gets only when no process works on the sweep: it moves the old sweep
aside, and deletes it once the new study exists (put back if that fails, or by the next start after a
kill: `recover_interrupted_overwrite`), exactly as a run's `--overwrite`. `tunelab train` refuses a
folder whose marker says `sweep folder`; each trial's folder is claimed by its run like any run folder.

Each trial once. A worker claims work holding an exclusive flock on .locks/sweep.lock: first a RUNNING
trial whose own lock (.locks/trial-NNN.lock) nobody holds (its worker died, and the kernel released the
lock with the process), else a new trial from `study.ask()`, as long as the study holds fewer than
n_trials. It keeps the trial's lock until the trial is told. A SIGKILL anywhere therefore leaves either a
told trial (kept) or a RUNNING one with a free lock, which the next claim adopts under its own number: it
resumes from its newest checkpoint, runs again when it has none, or is only told when its run had
finished (summary.json) before the kill. Numbers come from the storage, so they are never reused.

Why flocks rather than Optuna's heartbeat (`heartbeat_interval`, `grace_period`, `fail_stale_trials`): a
heartbeat finds a dead worker only after the grace period and marks its trial FAIL (a retry gets a new
number and a new folder), and it declares a live worker that stalls past the grace period dead while that
worker still writes. The kernel releases a flock the moment its process dies, and never before. Flocks
need every worker on one machine, which SQLite storage needs anyway.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import sqlite3
import subprocess
import sys
import time
import traceback
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tunelab.callbacks import Callback
from tunelab.engine.rundir import (
    MARKER,
    RunDir,
    RunLock,
    holds_trained_run,
    marker_kind,
    recover_interrupted_overwrite,
    set_aside,
)
from tunelab.errors import ConfigError, TrainingDiverged, TunelabError
from tunelab.io import atomic_write_text
from tunelab.sweeps.plan import SweepPlan

STUDY_FILE = "study.db"
SWEEP_YAML = "sweep.yaml"
SWEEP_KIND = "sweep folder"  # what the folder's marker says (tunelab.engine.rundir.marker_kind)
_OPTUNA_TABLES = {"studies", "trials", "version_info"}


# -- the storage file ---------------------------------------------------------------------------------------


def check_study_file(path: Path) -> list[str]:
    """The study names in `path`, read without writing; one clear error when it is not an Optuna study
    (opening any SQLite file as Optuna storage would add Optuna's tables to it)."""
    if not path.exists():
        return []
    hint = "move it away or choose another output.dir=..."
    try:  # waits up to 60 s while another process writes the study
        con = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True, timeout=60)
        try:
            tables = {row[0] for row in con.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
            names = [row[0] for row in con.execute("SELECT study_name FROM studies")] if "studies" in tables else []
        finally:
            con.close()
    except sqlite3.OperationalError as e:  # unreadable, or locked for over a minute
        raise ConfigError(f"{path}: cannot read the study ({e})") from e
    except sqlite3.DatabaseError as e:
        raise ConfigError(f"{path}: not an Optuna study ({e}); {hint}") from e
    if not _OPTUNA_TABLES <= tables:
        raise ConfigError(f"{path}: an SQLite file but not an Optuna study "
                          f"(tables: {', '.join(sorted(tables)) or 'none'}); {hint}")
    return names


def open_storage(path: Path) -> Any:
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)  # the sweep prints one line per trial itself
    try:
        return optuna.storages.RDBStorage(
            f"sqlite:///{path.resolve()}", engine_kwargs={"connect_args": {"timeout": 60}}
        )
    except Exception as e:  # e.g. a study written by an Optuna with another schema
        raise ConfigError(f"{path}: Optuna cannot open this study ({str(e).splitlines()[0]})") from e


# -- locks --------------------------------------------------------------------------------------------------


class Locks:
    """The sweep folder's flocks, released by the kernel when their process dies, however it dies: the
    marker (held shared by the processes working on the sweep) and the files in `.locks/`."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.marker = folder / MARKER
        self.dir = folder / ".locks"

    def mark(self) -> None:
        """The folder and its marker, created when missing (an empty marker is filled in)."""
        self.folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.marker, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            if os.fstat(fd).st_size == 0:
                os.write(fd, json.dumps({"tunelab": SWEEP_KIND, "created": time.time()}).encode())
        finally:
            os.close(fd)

    @contextlib.contextmanager
    def claims(self) -> Iterator[None]:
        """Exclusive: one process at a time opens the study, counts, adopts and creates trials."""
        import fcntl

        self.mark()
        self.dir.mkdir(exist_ok=True)
        fd = os.open(self.dir / "sweep.lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    @staticmethod
    def _try(path: Path, how: int) -> int | None:
        """An fd of `path` holding a `how` flock, or None when another process holds a conflicting one."""
        import fcntl

        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, how | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        return fd

    def trial(self, number: int) -> int | None:
        """An exclusive lock on trial `number` if nobody holds it (the caller closes the fd to release it)."""
        import fcntl

        return self._try(self.dir / f"trial-{number:03d}.lock", fcntl.LOCK_EX)

    def workers_alive(self) -> bool:
        """Whether a process is working on the sweep now (each holds the marker shared)."""
        import fcntl

        fd = self._try(self.marker, fcntl.LOCK_EX)
        if fd is not None:
            os.close(fd)
        return fd is None

    def hold_worker(self) -> int:
        """The marker, shared, for as long as this process works on the sweep (the caller closes the fd).
        Refused while an `--overwrite` holds it exclusively."""
        import fcntl

        fd = self._try(self.marker, fcntl.LOCK_SH)
        if fd is None:
            raise TunelabError(f"{self.folder}: an --overwrite in another tunelab process is replacing this "
                               "sweep; wait for it to finish or choose another output.dir=...")
        return fd


# -- one trial ----------------------------------------------------------------------------------------------


class PruneOnEval(Callback):
    """Reports the objective at each evaluation to the Optuna trial and, when the sweep's pruner says so,
    stops the run at that evaluation with status `pruned` (the trainer's `stop_status`)."""

    def __init__(self, trial: Any, objective: str):
        self.trial, self.objective = trial, objective

    def on_eval_end(self, trainer: Any, metrics: dict[str, Any]) -> None:
        value = metrics.get(self.objective)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            return
        step = trainer.global_step
        with warnings.catch_warnings():  # a resumed trial reports the evaluations since its checkpoint again
            warnings.simplefilter("ignore")
            self.trial.report(float(value), step)
        if trainer.should_stop or step >= trainer.total_steps:  # the run is ending anyway
            return
        if self.trial.should_prune():
            trainer.should_stop = True
            trainer.stop_status = "pruned"
            trainer.stop_reason = f"pruned by the sweep at step {step} ({self.objective} {value:.4g})"
            trainer.log("pruned", monitor=self.objective, value=float(value))


def suggest(trial: Any, name: str, dist: Any) -> Any:
    """Trial `trial`'s value of `name`: the stored one when it has it (an adopted trial), else sampled."""
    from optuna.distributions import CategoricalDistribution, IntDistribution

    if isinstance(dist, CategoricalDistribution):
        return trial.suggest_categorical(name, dist.choices)
    if isinstance(dist, IntDistribution):
        return trial.suggest_int(name, dist.low, dist.high, step=dist.step, log=dist.log)
    return trial.suggest_float(name, dist.low, dist.high, step=dist.step, log=dist.log)


def finished_summary(run_dir: Path) -> dict[str, Any] | None:
    """summary.json of a run that ended for good (summary.json is written last; `interrupted` may resume)."""
    path = run_dir / "summary.json"
    try:
        summary = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return summary if summary.get("status") in ("completed", "stopped_early", "pruned", "diverged", "failed") else None


def has_checkpoint(run_dir: Path) -> bool:
    from tunelab.engine.checkpoint import CheckpointManager

    root = run_dir / "checkpoints"
    return root.is_dir() and CheckpointManager(root).latest_valid(warn=lambda message: None) is not None


@dataclass
class Claim:
    trial: Any  # optuna.Trial
    lock: int  # fd of the trial's flock
    adopted: bool  # a RUNNING trial whose worker died


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


# -- the sweep ----------------------------------------------------------------------------------------------


class Sweep:
    """The study of one sweep folder, as one process works on it."""

    def __init__(self, plan: SweepPlan, log: Callable[[str], None] = print):
        self.plan, self.log = plan, log
        self.folder = plan.folder
        self.db = self.folder / STUDY_FILE
        self.locks = Locks(self.folder)
        self.study: Any = None
        self._held: list[int] = []

    # -- opening ----------------------------------------------------------------------------------------
    def open(self, resume: bool = False, overwrite: bool = False) -> None:
        """Create the study, continue it (`resume`) or join the processes working on it; refuse anything
        else with one line, before writing to the folder. `overwrite`: the old sweep is deleted only once
        the new study exists."""
        recover_interrupted_overwrite(self.folder)
        names = check_study_file(self.db)
        self._check_folder()
        if resume and not names:
            raise ConfigError(f"{self.folder}: no sweep to resume (no {STUDY_FILE}); drop --resume to start one")
        replaced = self._set_aside() if overwrite and names else None
        try:
            with self.locks.claims():
                alive = self.locks.workers_alive()
                self._held.append(self.locks.hold_worker())  # from here, an --overwrite elsewhere is refused
                self._open_study(resume, alive)
        except BaseException:
            self.close()
            if replaced is not None:
                replaced.rollback()
            raise
        if replaced is not None:
            replaced.commit()
        atomic_write_text(self.folder / SWEEP_YAML, self.plan.to_yaml())

    def _open_study(self, resume: bool, alive: bool) -> None:
        names = check_study_file(self.db)
        if self.plan.name not in names:
            if names:
                raise ConfigError(f"{self.db}: holds the sweep {names[0]!r}, not {self.plan.name!r} (the "
                                  "recipe's name); use that name or another output.dir=...")
            self.study = self._create()
            return
        self.study = self._load()
        self._check_definition()
        if not (alive or resume):
            done = sum(t.state.is_finished() for t in self.study.get_trials(deepcopy=False))
            raise ConfigError(
                f"{self.folder}: holds a sweep ({done} trials finished); pass --resume to continue "
                "it or --overwrite to start afresh (or choose another output.dir=...)")
        if alive:
            self.log(f"sweep {self.folder}: joining the processes already working on it")

    def join(self) -> None:
        """For a worker process started by `--workers`: work on the existing study."""
        check_study_file(self.db)
        with self.locks.claims():
            self._held.append(self.locks.hold_worker())
            self.study = self._load()

    def close(self) -> None:
        while self._held:
            os.close(self._held.pop())

    def _check_folder(self) -> None:
        folder = self.folder
        if folder.exists() and not folder.is_dir():
            raise ConfigError(f"`output.dir` = {folder} exists and is not a folder")
        if self.db.exists() or not folder.is_dir():
            return
        ours = {".locks", SWEEP_YAML} | ({MARKER} if marker_kind(folder) in (None, SWEEP_KIND) else set())
        entries = sorted(e.name for e in folder.iterdir() if e.name not in ours)
        if entries:
            what = "a training run" if holds_trained_run(folder) else ", ".join(entries[:5])
            raise ConfigError(f"{folder}: output folder holds {what} and no sweep (no {STUDY_FILE}); "
                              "choose another output.dir=...")

    def _set_aside(self) -> RunDir:
        """`--overwrite`: the old sweep, locked exclusively (no process works on it, and none can join it
        meanwhile), moves to a hidden sibling; `commit()` deletes it, `rollback()` puts it back."""
        self.locks.mark()  # a sweep from before markers: its marker says what it is while it is aside
        try:
            lock = RunLock(self.folder).acquire()
        except TunelabError as e:
            raise ConfigError(f"{self.folder}: processes are working on this sweep; --overwrite waits until "
                              "they have stopped") from e
        try:
            aside = set_aside(self.folder, lock)
        except BaseException:
            lock.release()
            raise
        return RunDir(self.folder, None, aside)

    def _create(self) -> Any:
        import optuna

        from tunelab import tracking

        self.folder.mkdir(parents=True, exist_ok=True)
        study = optuna.create_study(
            storage=open_storage(self.db), study_name=self.plan.name,
            direction="maximize" if self.plan.mode == "max" else "minimize",
            sampler=self.plan.make_sampler(), pruner=self.plan.make_pruner(),
        )
        study.set_user_attr("tunelab_definition", self.plan.definition())
        mlflow = self.plan.recipe["output"].get("mlflow")
        if mlflow is not None:
            run_id = tracking.start_sweep_run(mlflow, self.plan.name, self._mlflow_params())
            study.set_user_attr("mlflow_run_id", run_id)
        return study

    def _load(self) -> Any:
        import optuna

        study = optuna.load_study(study_name=self.plan.name, storage=open_storage(self.db),
                                  pruner=self.plan.make_pruner())
        # salted by the trial count and this process: resumed and parallel samplers draw new points
        study.sampler = self.plan.make_sampler(salt=hash((len(study.get_trials(deepcopy=False)), os.getpid())))
        return study

    def _check_definition(self) -> None:
        """A study continues only with the recipe and search it was started with."""
        from tunelab.tracking import flat_params

        stored = self.study.user_attrs.get("tunelab_definition")
        if stored is None:  # the process that created the study died before writing it
            self.study.set_user_attr("tunelab_definition", self.plan.definition())
            return
        before, now = flat_params(stored), flat_params(self.plan.definition())
        for key in sorted(set(before) | set(now)):
            if before.get(key) != now.get(key):
                shown = key.removeprefix("recipe.")
                was, wants = before.get(key, "(unset)"), now.get(key, "(unset)")
                raise ConfigError(
                    f"{self.folder}: this sweep was started with `{shown}` = {was!r}, not {wants!r}; keep the "
                    "recipe and search as they were (only sweep.n_trials and sweep.timeout may change) or choose "
                    "another output.dir=...")

    def _mlflow_params(self) -> dict[str, str]:
        from tunelab.sweeps.plan import describe

        params = {f"space.{k}": describe(d) for k, d in self.plan.space.items()}
        params.update(objective=self.plan.objective, mode=str(self.plan.mode), n_trials=str(self.plan.target_trials),
                      sampler=self.plan.sampler_name, pruner=self.plan.pruner_name)
        return params

    # -- working ----------------------------------------------------------------------------------------
    def work(self, deadline: float | None = None) -> None:
        """Claim and run trials until the study holds n_trials of them, or until `deadline` has passed at
        the end of a trial (as Optuna's `timeout`: the trial running then finishes)."""
        while (claim := self._claim()) is not None:
            try:
                self._run(claim)
            finally:
                os.close(claim.lock)
            if deadline is not None and time.monotonic() >= deadline:
                return

    def _claim(self) -> Claim | None:
        import optuna
        from optuna.trial import TrialState

        with self.locks.claims():
            trials = self.study.get_trials(deepcopy=False)
            for t in trials:
                if t.state == TrialState.RUNNING and (lock := self.locks.trial(t.number)) is not None:
                    return Claim(optuna.Trial(self.study, t._trial_id), lock, adopted=True)
            target = self.plan.target_trials
            if target is not None and len(trials) >= target:
                return None
            trial = self.study.ask()
            lock = self.locks.trial(trial.number)
            assert lock is not None, f"trial {trial.number} is new, yet its lock is held"
            for name, dist in self.plan.space.items():
                suggest(trial, name, dist)
            return Claim(trial, lock, adopted=False)

    def _run(self, claim: Claim) -> None:
        trial, n = claim.trial, claim.trial.number
        params = {name: suggest(trial, name, dist) for name, dist in self.plan.space.items()}
        cfg = self.plan.trial_config(params, n)
        out = cfg.output_dir
        summary = finished_summary(out)
        if summary is not None:
            self.log(f"trial {n}: its run had finished when the sweep stopped; recording it")
        else:
            resume = has_checkpoint(out)
            if claim.adopted:
                self.log(f"trial {n}: was interrupted; " + ("resuming it from its newest checkpoint" if resume
                                                            else "running it again (it has no checkpoint)"))
            else:
                self.log(f"trial {n}: " + ", ".join(f"{k}={_short(v)}" for k, v in params.items()))
            summary = self._train(cfg, trial, resume)
        self._tell(trial, summary)

    def _train(self, cfg: Any, trial: Any, resume: bool) -> dict[str, Any]:
        from tunelab import tracking
        from tunelab.run import train

        n = trial.number
        try:
            with tracking.child_runs_of(self.study.user_attrs.get("mlflow_run_id")):
                return train(cfg, resume=resume, overwrite=not resume, log=lambda m: self.log(f"trial {n}: {m}"),
                             callbacks=[PruneOnEval(trial, self.plan.objective)])
        except TrainingDiverged as e:  # summary.json says `failed`, with the doctor's diagnosis
            return finished_summary(cfg.output_dir) or {"status": "failed", "error": str(e)}
        except TunelabError as e:
            return {"status": "failed", "error": str(e)}
        except Exception as e:  # a bug or an out-of-memory: the trial fails, the study goes on
            traceback.print_exc()
            return {"status": "failed", "error": f"{type(e).__name__}: {e}"}

    def _tell(self, trial: Any, summary: dict[str, Any]) -> None:
        from optuna.trial import TrialState

        status = summary.get("status")
        value = (summary.get("metrics") or {}).get(self.plan.objective)
        attrs = {"status": status, "global_step": summary.get("global_step"), "train_wall_s": summary.get("wall_s"),
                 "error": (summary.get("error") or "")[:2000] or None,
                 "diagnoses": [f"{d.get('kind')}: {d.get('evidence')}" for d in summary.get("diagnoses") or []]
                 or None}
        for key, v in attrs.items():
            if v is not None:
                trial.set_user_attr(key, v)
        if status in ("completed", "stopped_early") and _finite(value):
            self.study.tell(trial, float(value))
        elif status == "pruned":
            self.study.tell(trial, state=TrialState.PRUNED)
        else:
            self.study.tell(trial, state=TrialState.FAIL)
        with self.locks.claims():
            results = self.results()
            self._write_results(results)
        best = results["best"]
        shown = f"{self.plan.objective} {value:.4g}" if _finite(value) else (attrs["error"] or "no value")
        self.log(f"trial {trial.number} {status}: {shown}"
                 + (f" at step {summary.get('global_step')}" if summary.get("global_step") else "")
                 + (f"; best so far: trial {best['number']}, {best['value']:.4g}" if best else ""))

    # -- results ----------------------------------------------------------------------------------------
    def results(self) -> dict[str, Any]:
        """sweep.json's content: the plan, every trial and the best one."""
        from optuna.trial import TrialState

        from tunelab.sweeps.plan import describe

        trials = self.study.get_trials(deepcopy=False)
        rows = []
        for t in trials:
            row: dict[str, Any] = {
                "number": t.number, "state": t.state.name.lower(), "status": t.user_attrs.get("status"),
                "value": t.value, "params": t.params, "steps": t.user_attrs.get("global_step"),
                "wall_s": (t.datetime_complete - t.datetime_start).total_seconds()
                if t.datetime_complete and t.datetime_start else None,
                "run_dir": self.plan.trial_dir(t.number).name,
            }
            for key in ("error", "diagnoses"):
                if t.user_attrs.get(key):
                    row[key] = t.user_attrs[key]
            rows.append(row)
        complete = [t for t in trials if t.state == TrialState.COMPLETE]
        best = None
        if complete:
            pick = max if self.study.direction.name == "MAXIMIZE" else min
            b = pick(complete, key=lambda t: t.value)
            best = {"number": b.number, "value": b.value, "params": b.params,
                    "run_dir": self.plan.trial_dir(b.number).name, "final": f"{self.plan.trial_dir(b.number).name}/final"}
        counts = {s: sum(r["state"] == s for r in rows) for s in ("complete", "pruned", "fail", "running")}
        return {
            "name": self.plan.name, "objective": self.plan.objective, "mode": self.plan.mode,
            "n_trials": self.plan.target_trials, "sampler": self.plan.sampler_name, "pruner": self.plan.pruner_name,
            "space": {k: describe(d) for k, d in self.plan.space.items()},
            "counts": counts, "best": best, "trials": rows,
        }

    def _write_results(self, results: dict[str, Any]) -> None:
        atomic_write_text(self.folder / "sweep.json", json.dumps(results, indent=2, default=str))
        best = results["best"]
        if best is None or not (self.folder / best["final"]).is_dir():
            return
        link = self.folder / "best"
        if link.is_symlink() and os.readlink(link) == best["final"]:
            return
        tmp = self.folder / f".best-{os.getpid()}"
        if tmp.is_symlink():
            tmp.unlink()
        os.symlink(best["final"], tmp)
        os.replace(tmp, link)

    def finish(self, dpi: int = 80) -> dict[str, Any]:
        """After the work: sweep.json with the parameter importances, best/, report.html, the MLflow run."""
        from tunelab import tracking
        from tunelab.insight.sweep_report import param_importances, write_sweep_report

        # Read the study and write sweep.json and the report under the claims lock: a process that ends a
        # trial takes it only after its `tell`, so whichever process writes last has seen every ended trial
        # (read outside the lock, a slower process could overwrite a newer sweep.json with a stale one).
        with self.locks.claims():
            results = self.results()
            results["importances"] = param_importances(self.study, self.plan.options.importance)
            results["importance_evaluator"] = self.plan.options.importance
            self._write_results(results)
            report = write_sweep_report(self.folder, results, self.plan.mode or "max", dpi=dpi)
        run_id = self.study.user_attrs.get("mlflow_run_id")
        if run_id:
            done = results["counts"]["running"] == 0 and len(results["trials"]) >= (results["n_trials"] or 0)
            tracking.finish_sweep_run(self.plan.recipe["output"]["mlflow"], run_id, results,
                                      [self.folder / "sweep.json", report, self.folder / SWEEP_YAML], done)
        return results

    def spawn_workers(self, count: int, threads: int) -> list[subprocess.Popen]:
        """`count` more processes on this study (`--workers`): each reads sweep.yaml and claims trials, with
        `threads` CPU threads unless OMP_NUM_THREADS says otherwise."""
        env = dict(os.environ)
        env.setdefault("OMP_NUM_THREADS", str(threads))
        cmd = [sys.executable, "-m", "tunelab.cli", "sweep", str(self.folder / SWEEP_YAML), "--worker"]
        return [subprocess.Popen(cmd, env=env) for _ in range(count)]


def _short(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)
