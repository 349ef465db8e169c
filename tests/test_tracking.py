"""MLflow tracking (tunelab.tracking): a real `mlflow server` started by the fixture, MLflow's local stores
without a server, sweeps as parent and child runs, and tracking failures that leave the run untouched."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from mlflow import MlflowClient

import tunelab as tl
from tests.helpers import REPO, run_cli
from tunelab import tracking
from tunelab.config import MlflowSection, load_config
from tunelab.errors import TrainingDiverged

DIGITS = REPO / "recipes" / "digits-cnn.yaml"
SHORT = ["train.max_steps=20", "eval.every=10", "output.progress=false"]


@pytest.fixture(autouse=True)
def _fresh(monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    tracking._FAILED.clear()  # each test may warn once
    yield
    tracking._FAILED.clear()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def mlflow_server(tmp_path):
    """`mlflow server` on 127.0.0.1 with a SQLite backend and served artifacts; stopped after the test."""
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    log = open(tmp_path / "server.log", "w")
    server = subprocess.Popen(
        [str(Path(sys.executable).parent / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port),
         "--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}",
         "--artifacts-destination", str(tmp_path / "artifacts"), "--workers", "1"],
        cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.time() + 180
        while True:
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2):
                    break
            except OSError:
                assert server.poll() is None, (tmp_path / "server.log").read_text()[-2000:]
                assert time.time() < deadline, "mlflow server did not start in 180 s"
                time.sleep(0.5)
        yield url
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=60)
        log.close()


def _train(out: Path, mlflow: dict, *overrides: str) -> dict:
    cfg = load_config(DIGITS, [f"output.dir={out}", *SHORT, *overrides])
    cfg.output.mlflow = MlflowSection(**mlflow)
    return tl.train(cfg, log=lambda m: None)


def _events(run_dir: Path, kind: str) -> list[dict]:
    return [r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if r["event"] == kind]


def _check_logged(client: MlflowClient, run_id: str, run_dir: Path) -> None:
    """The run's resolved config as params, each train/eval event as metrics at its step, the artifacts."""
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.tags["tunelab.status"] == "completed"
    config = load_config(run_dir / "config.yaml")
    assert run.data.params["optim.lr"] == str(config.optim.lr) and run.data.params["train.max_steps"] == "20"
    assert run.data.params["model.num_classes"] == "10"  # the resolved config: what the data filled in
    for kind in ("train", "eval"):
        key = f"{kind}/loss"
        logged = [(m.step, m.value) for m in client.get_metric_history(run_id, key)]
        assert logged == [(r["step"], r["loss"]) for r in _events(run_dir, kind)], key
    assert [m.step for m in client.get_metric_history(run_id, "eval/accuracy")] == [10, 20]
    top = {a.path for a in client.list_artifacts(run_id)}
    assert {"config.yaml", "report.html", "final"} <= top
    assert "final/model.safetensors" in {a.path for a in client.list_artifacts(run_id, "final")}


@pytest.mark.slow
def test_a_run_logged_to_a_real_tracking_server(tmp_path, mlflow_server):
    run_dir = tmp_path / "run"
    run_cli("train", DIGITS, f"output.dir={run_dir}", *SHORT,
            f"output.mlflow={{tracking_uri: '{mlflow_server}', experiment: served}}")
    client = MlflowClient(mlflow_server)
    runs = client.search_runs([client.get_experiment_by_name("served").experiment_id])
    assert len(runs) == 1
    assert json.loads((run_dir / "summary.json").read_text())["mlflow_run_id"] == runs[0].info.run_id
    _check_logged(client, runs[0].info.run_id, run_dir)
    assert any((tmp_path / "artifacts").rglob("model.safetensors"))  # uploaded through the server


@pytest.mark.parametrize("store", ["sqlite", "mlruns"])
def test_local_stores_without_a_server(tmp_path, monkeypatch, store):
    monkeypatch.chdir(tmp_path)  # MLflow puts a SQLite store's artifacts in ./mlruns
    if store == "mlruns":
        monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 keeps the file store behind a switch
        uri = (tmp_path / "mlruns").as_uri()
    else:
        uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    summary = _train(tmp_path / "run", {"tracking_uri": uri, "experiment": "local"})
    client = MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("local").experiment_id])
    assert summary["mlflow_run_id"] == run.info.run_id
    _check_logged(client, run.info.run_id, tmp_path / "run")


def test_a_diverged_run_is_logged_failed_with_the_doctors_diagnosis(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    with pytest.raises(TrainingDiverged):
        _train(tmp_path / "run", {"tracking_uri": uri}, "optim.lr=1e20", "schedule.warmup_steps=0")
    client = MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("digits-cnn").experiment_id])  # the recipe's name
    assert run.info.status == "FAILED" and run.data.tags["tunelab.status"] == "failed"
    assert "loss became" in run.data.tags["tunelab.error"]
    assert run.data.tags["doctor.divergence"].startswith("step ")


@pytest.mark.parametrize("uri", ["http://127.0.0.1:{port}", "nosuch://nowhere"])
def test_tracking_failures_never_fail_the_run(tmp_path, capsys, uri):
    uri = uri.format(port=_free_port())  # nothing listens there
    summary = _train(tmp_path / "run", {"tracking_uri": uri})
    assert summary["status"] == "completed" and "mlflow_run_id" not in summary
    err = capsys.readouterr().err
    assert err.count("warning: MLflow tracking is off") == 1 and "training goes on" in err
    assert [r["step"] for r in _events(tmp_path / "run", "train")] == [10, 20]  # metrics.jsonl keeps it all


def test_a_sweep_logs_its_trials_as_child_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg = load_config(REPO / "recipes" / "digits-sweep.yaml", [f"output.dir={tmp_path / 'sweep'}", *SHORT,
                                                               f"output.mlflow={{tracking_uri: '{uri}'}}"])
    results = tl.sweep(cfg, n_trials=2, pruner="none", log=lambda m: None)
    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("digits-sweep").experiment_id])
    (parent,) = [r for r in runs if r.data.tags.get("tunelab.kind") == "sweep"]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert len(runs) == 3 and sorted(r.info.run_name for r in children) == [
        "digits-sweep-trial-000", "digits-sweep-trial-001"]
    assert parent.info.status == "FINISHED" and parent.data.params["space.optim.lr"] == "loguniform [0.003, 0.5]"
    assert parent.data.metrics["sweep/best_value"] == results["best"]["value"]
    assert {"sweep.json", "report.html", "sweep.yaml"} <= {a.path for a in client.list_artifacts(parent.info.run_id)}
    for child in children:
        trial = int(child.info.run_name[-3:])
        assert float(child.data.params["optim.lr"]) == results["trials"][trial]["params"]["optim.lr"]
