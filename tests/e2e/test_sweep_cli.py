"""End-to-end sweeps through the CLI on the digits recipe: pruning and the report, a diverged trial,
SIGKILL during a trial and during the study's bookkeeping, and several processes on one study."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import optuna
import pytest
import yaml

from tests.helpers import REPO, run_cli, same_weights

RECIPE = "recipes/digits-sweep.yaml"
SHORT = ["output.progress=false", "train.max_steps=30", "eval.every=10"]


def _sweep_json(folder):
    return json.loads((folder / "sweep.json").read_text())


def _events(run_dir, kind):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()
            if json.loads(line)["event"] == kind]


def test_sweep_prunes_reports_and_recommends(tmp_path):
    folder = tmp_path / "sweep"
    args = [RECIPE, f"output.dir={folder}", *SHORT, "sweep.n_trials=5",
            "sweep.pruner={name: median, n_startup_trials: 1}"]
    proc = run_cli("sweep", *args)
    assert "best: trial" in proc.stderr
    results = _sweep_json(folder)
    assert [t["number"] for t in results["trials"]] == list(range(5))
    for t in results["trials"]:  # the trial's state and its run's summary.json agree
        summary = json.loads((folder / t["run_dir"] / "summary.json").read_text())
        assert t["state"] in ("complete", "pruned") and summary["status"] == t["status"]
        if t["state"] == "pruned":
            assert summary["status"] == "pruned" and summary["global_step"] < 30
            assert _events(folder / t["run_dir"], "pruned")[0]["step"] == summary["global_step"]
        else:
            assert summary["global_step"] == 30 and summary["metrics"]["accuracy"] == t["value"]
    best = results["best"]
    assert best["value"] == max(t["value"] for t in results["trials"] if t["state"] == "complete")
    assert (folder / "best" / "model.safetensors").is_file()
    assert (folder / "best").resolve() == (folder / best["run_dir"] / "final").resolve()
    assert set(results["importances"]) <= {"optim.lr", "optim.weight_decay", "loss.label_smoothing"}
    report = (folder / "report.html").read_text()
    for title in ("Objective over trials", "Parallel coordinates", "Validation objective of the top trials"):
        assert f'alt="{title}"' in report
    assert ('alt="Parameter importances"' in report) == bool(results["importances"])
    # the best recipe, ready to train: the best trial's parameters, no sweep section
    printed = run_cli("sweep", "--best", *args).stdout
    recipe = yaml.safe_load(printed)
    assert "sweep" not in recipe and recipe["output"]["dir"] == f"{folder}-best"
    assert recipe["optim"]["lr"] == best["params"]["optim.lr"]
    assert recipe["loss"]["label_smoothing"] == best["params"]["loss.label_smoothing"]


def test_a_diverged_trial_fails_with_the_doctors_diagnosis_and_the_study_goes_on(tmp_path):
    folder = tmp_path / "sweep"
    run_cli("sweep", RECIPE, f"output.dir={folder}", *SHORT, "sweep.sampler=grid", "sweep.pruner=none",
            "sweep.space={optim.lr: {categorical: [1.0e+20, 0.05]}}")
    trials = {t["params"]["optim.lr"]: t for t in _sweep_json(folder)["trials"]}
    diverged, healthy = trials[1e20], trials[0.05]
    assert diverged["state"] == "fail" and diverged["status"] == "failed" and "loss became" in diverged["error"]
    assert any(d.startswith("divergence:") for d in diverged["diagnoses"])
    summary = json.loads((folder / diverged["run_dir"] / "summary.json").read_text())
    assert summary["status"] == "failed" and summary["diagnoses"][0]["kind"] == "divergence"
    assert healthy["state"] == "complete" and _sweep_json(folder)["best"]["number"] == healthy["number"]


# Runs the CLI with a SIGKILL at one point of the study's bookkeeping: after trial N's run finished but before
# the study is told ("tell"), or right after trial N is created in the study ("ask").
KILLER = """
import os, signal, sys
import optuna
from tunelab.cli import main
from tunelab.sweeps import study
point, number = sys.argv[1], int(sys.argv[2])
if point == "tell":
    tell = study.Sweep._tell
    def _tell(self, trial, summary):
        if trial.number == number:
            os.kill(os.getpid(), signal.SIGKILL)
        return tell(self, trial, summary)
    study.Sweep._tell = _tell
else:
    ask = optuna.Study.ask
    def _ask(self, *args, **kwargs):
        trial = ask(self, *args, **kwargs)
        if trial.number == number:
            os.kill(os.getpid(), signal.SIGKILL)
        return trial
    optuna.Study.ask = _ask
sys.exit(main(sys.argv[3:]))
"""


@pytest.mark.slow
def test_sigkill_during_a_trial_and_during_bookkeeping_then_resume(tmp_path):
    folder = tmp_path / "sweep"
    args = [RECIPE, f"output.dir={folder}", "output.progress=false", "train.max_steps=60", "eval.every=20",
            "train.checkpoint_every=20", "sweep.n_trials=4", "sweep.pruner=none"]
    # 1. SIGKILL while trial 1 trains (it has a checkpoint at step 20)
    proc = subprocess.Popen([sys.executable, "-m", "tunelab.cli", "sweep", *args], cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not (folder / "trial-001" / "checkpoints" / "step-20").exists():
        assert proc.poll() is None and time.time() < deadline, "the sweep ended before it could be killed"
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (folder / "trial-001" / "final").exists()
    # 2. --resume: trial 1 resumes from its checkpoint, finishes, and the process dies before the study hears
    killed = subprocess.run([sys.executable, "-c", KILLER, "tell", "1", "sweep", *args, "--resume"], cwd=REPO,
                            capture_output=True, text=True, timeout=600)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert "trial 1: was interrupted; resuming it from its newest checkpoint" in killed.stderr
    assert json.loads((folder / "trial-001" / "summary.json").read_text())["status"] == "completed"
    # 3. --resume: trial 1 is only recorded; the process dies right after the study creates trial 2
    killed = subprocess.run([sys.executable, "-c", KILLER, "ask", "2", "sweep", *args, "--resume"], cwd=REPO,
                            capture_output=True, text=True, timeout=600)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert "trial 1: its run had finished when the sweep stopped; recording it" in killed.stderr
    assert not (folder / "trial-002").exists()
    # 4. --resume to the end: trial 2 runs (it had no checkpoint), then trial 3
    done = run_cli("sweep", *args, "--resume")
    assert "trial 2: was interrupted; running it again (it has no checkpoint)" in done.stderr
    study = optuna.load_study(study_name="digits-sweep", storage=f"sqlite:///{folder / 'study.db'}")
    assert sorted(t.number for t in study.trials) == [0, 1, 2, 3]  # as many as asked, none twice
    assert all(t.state == optuna.trial.TrialState.COMPLETE for t in study.trials)
    assert [t["number"] for t in _sweep_json(folder)["trials"]] == [0, 1, 2, 3]
    assert len(_events(folder / "trial-001", "resume")) == 1 and not _events(folder / "trial-002", "resume")
    # the interrupted trial's final weights are those of an uninterrupted run with its parameters
    ref = tmp_path / "ref"
    run_cli("train", folder / "trial-001" / "config.yaml", f"output.dir={ref}")
    assert same_weights(ref / "final" / "model.safetensors", folder / "trial-001" / "final" / "model.safetensors")


@pytest.mark.slow
def test_two_commands_and_workers_run_each_trial_once(tmp_path):
    folder = tmp_path / "sweep"
    sweep_file = tmp_path / "space.yaml"  # the sweep section from its own file, over the plain digits recipe
    sweep_file.write_text(yaml.safe_dump({"sweep": {"space": {"optim.lr": {"loguniform": [0.01, 0.3]}},
                                                    "n_trials": 8, "pruner": "none"}}))
    cmd = [sys.executable, "-m", "tunelab.cli", "sweep", "recipes/digits-cnn.yaml", "--sweep", str(sweep_file),
           f"output.dir={folder}", "output.progress=false", "train.max_steps=40", "eval.every=20"]
    first = subprocess.Popen([*cmd, "--workers", "2"], cwd=REPO, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while not (folder / "trial-000").exists():
        assert first.poll() is None and time.time() < deadline
        time.sleep(0.05)
    second = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)  # the same command
    assert second.returncode == 0, second.stderr[-2000:]
    assert "joining the processes already working on it" in second.stderr
    assert first.wait(timeout=600) == 0, first.stderr.read()[-2000:]
    trials = _sweep_json(folder)["trials"]
    assert [t["number"] for t in trials] == list(range(8)) and all(t["state"] == "complete" for t in trials)
    for t in trials:  # each trial trained once, from its start to its end, in its own folder
        run_dir = folder / t["run_dir"]
        assert len(_events(run_dir, "start")) == 1 and not _events(run_dir, "resume")
        assert json.loads((run_dir / "summary.json").read_text())["global_step"] == 40
    assert len({t["params"]["optim.lr"] for t in trials}) == 8  # no two processes drew the same point
