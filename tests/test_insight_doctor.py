"""The run doctor: each diagnosis provoked by a crafted run, and no false alarm on a healthy one."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from torch.utils.data import Dataset

from tunelab.config import load_config
from tunelab.data.base import DataBundle, TensorDataset
from tunelab.engine.trainer import Trainer
from tunelab.errors import ConfigError, TrainingDiverged
from tunelab.insight.doctor import (
    Doctor,
    DoctorOptions,
    check_class_imbalance,
    check_overfitting,
    diagnose_records,
)
from tunelab.insight.report import ReportWriter
from tunelab.run import default_callbacks
from tunelab.tasks.classification import ClassificationTask
from tunelab.tasks.regression import RegressionTask

torch.set_num_threads(1)


def _records(path: Path) -> list[dict]:
    return [json.loads(line) for line in (path / "metrics.jsonl").read_text().splitlines()]


def _kinds(path: Path) -> list[str]:
    return [r["kind"] for r in _records(path) if r["event"] == "diagnosis"]


def _fit(
    tmp_path: Path,
    model: nn.Module,
    task,
    train,
    eval=None,
    *,
    optim: dict,
    train_cfg: dict,
    eval_cfg: dict | None = None,
    doctor: dict | None = None,
    report: bool = False,
) -> Path:
    cfg = load_config(
        {
            "model": {"name": "linear"},
            "data": {"name": "digits"},
            "optim": optim,
            "train": {"log_every": 1, **train_cfg},
            "eval": eval_cfg or {},
            "output": {"dir": str(tmp_path), "tensorboard": False, "progress": False},
        }
    )
    callbacks = [Doctor(DoctorOptions(**(doctor or {})), echo=False)] + ([ReportWriter()] if report else [])
    Trainer(model, task, train, eval, config=cfg, callbacks=callbacks).fit()
    return tmp_path


def _blobs(n: int, classes: int, dim: int = 8, seed: int = 0, noise: float = 0.3) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(classes, dim, generator=torch.Generator().manual_seed(123)) * 3
    y = torch.randint(0, classes, (n,), generator=g)
    return TensorDataset(centres[y] + noise * torch.randn(n, dim, generator=g), y)


def test_random_labels_are_diagnosed_as_overfitting(tmp_path):
    g = torch.Generator().manual_seed(0)
    train = TensorDataset(torch.randn(96, 16, generator=g), torch.randint(0, 4, (96,), generator=g))
    val = TensorDataset(torch.randn(96, 16, generator=g), torch.randint(0, 4, (96,), generator=g))
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 256), nn.ReLU(), nn.Linear(256, 4))
    out = _fit(
        tmp_path,
        model,
        ClassificationTask(num_classes=4),
        train,
        val,
        optim={"name": "adam", "lr": 1e-2},
        train_cfg={"max_steps": 60, "batch_size": 32, "log_every": 3},
        eval_cfg={"every": 6},
    )
    dx = [r for r in _records(out) if r["event"] == "diagnosis" and r["kind"] == "overfitting"]
    assert dx, _kinds(out)
    assert "validation loss rose" in dx[0]["evidence"] and "weight decay" in dx[0]["remedy"]


def test_exploding_then_diverging_regression_is_named_and_reported(tmp_path):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(256, 8, generator=g)
    y = x @ torch.randn(8, generator=g)
    model = nn.Linear(8, 1)
    with pytest.raises(TrainingDiverged):
        _fit(
            tmp_path,
            model,
            RegressionTask(),
            TensorDataset(x, y),
            optim={"name": "sgd", "lr": 10.0},
            train_cfg={"max_steps": 200, "batch_size": 64},
            report=True,
        )
    kinds = _kinds(tmp_path)
    assert "exploding_gradients" in kinds and "divergence" in kinds
    div = next(r for r in _records(tmp_path) if r.get("kind") == "divergence")
    assert "lower optim.lr" in div["remedy"]
    html = (tmp_path / "report.html").read_text()  # the report is written for a failed run too
    assert "divergence" in html and "failed" in html


def test_tiny_learning_rate_is_diagnosed_as_too_low(tmp_path):
    torch.manual_seed(0)
    out = _fit(
        tmp_path,
        nn.Linear(8, 4),
        ClassificationTask(num_classes=4),
        _blobs(256, 4),
        optim={"name": "sgd", "lr": 1e-7},
        train_cfg={"max_steps": 12, "batch_size": 32, "log_every": 2},
    )
    assert "lr_too_low" in _kinds(out)
    assert "underfitting" not in _kinds(out)  # the plateau explains it; one diagnosis, not two


def test_a_model_that_cannot_fit_is_diagnosed_as_underfitting(tmp_path):
    # class 0 is separable, classes 1-4 are the same cloud: the best reachable loss is ~70% of the first
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, 5, (400,), generator=g)
    x = torch.randn(400, 4, generator=g) * 0.5 + (y == 0).float().unsqueeze(1) * 4
    data = TensorDataset(x, y)
    torch.manual_seed(0)
    out = _fit(
        tmp_path,
        nn.Linear(4, 5),
        ClassificationTask(num_classes=5),
        data,
        data,
        optim={"name": "adam", "lr": 0.05},
        train_cfg={"max_steps": 60, "batch_size": 64, "log_every": 5},
        eval_cfg={"every": 30},
    )
    kinds = _kinds(out)
    assert "underfitting" in kinds and "lr_too_low" not in kinds and "overfitting" not in kinds


class _SlowDataset(Dataset):
    def __init__(self, base: TensorDataset, delay: float):
        self.base, self.delay = base, delay

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int):
        time.sleep(self.delay)
        return self.base[i]


def test_slow_data_loading_is_diagnosed(tmp_path):
    torch.manual_seed(0)
    out = _fit(
        tmp_path,
        nn.Linear(8, 4),
        ClassificationTask(num_classes=4),
        _SlowDataset(_blobs(256, 4), 0.004),
        optim={"name": "sgd", "lr": 0.1},
        train_cfg={"max_steps": 10, "batch_size": 8, "log_every": 2},
    )
    dx = [r for r in _records(out) if r.get("kind") == "data_loader_bound"]
    assert dx and "num_workers" in dx[0]["remedy"]


def test_deep_sigmoid_net_has_vanishing_gradients(tmp_path):
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for _ in range(10):
        lin = nn.Linear(16, 16)
        nn.init.normal_(lin.weight, std=0.01)
        layers += [lin, nn.Sigmoid()]
    model = nn.Sequential(nn.Linear(8, 16), nn.Sigmoid(), *layers, nn.Linear(16, 4))
    nn.init.normal_(model[0].weight, std=0.01)
    out = _fit(
        tmp_path,
        model,
        ClassificationTask(num_classes=4),
        _blobs(128, 4),
        optim={"name": "sgd", "lr": 0.1},
        train_cfg={"max_steps": 8, "batch_size": 32, "log_every": 2},
    )
    dx = [r for r in _records(out) if r.get("kind") == "vanishing_gradients"]
    assert dx and "`0.weight`" in dx[0]["evidence"]
    train = [r for r in _records(out) if r["event"] == "train"]
    assert train[-1]["grad_rms_first"] < 1e-4 * train[-1]["grad_rms_last"]  # per-layer evidence is logged


def test_imbalanced_labels_are_diagnosed_with_class_weights(tmp_path):
    g = torch.Generator().manual_seed(0)
    y = torch.cat([torch.zeros(380, dtype=torch.long), torch.ones(20, dtype=torch.long)])
    x = torch.randn(400, 8, generator=g) + y.float().unsqueeze(1)
    out = _fit(
        tmp_path,
        nn.Linear(8, 2),
        ClassificationTask(num_classes=2),
        TensorDataset(x, y),
        optim={"name": "sgd", "lr": 0.1},
        train_cfg={"max_steps": 4, "batch_size": 50},
    )
    dx = [r for r in _records(out) if r.get("kind") == "class_imbalance"]
    assert dx and "19:1" in dx[0]["evidence"]
    assert "loss.class_weights=[0.53,10.00]" in dx[0]["remedy"]


def test_healthy_digits_run_gets_no_diagnosis_and_a_report(tmp_path):
    from tunelab.run import train

    cfg = load_config(
        "recipes/digits-cnn.yaml",
        [
            "train.max_steps=40",
            "train.log_every=5",
            "eval.every=10",
            f"output.dir={tmp_path}/run",
            "output.tensorboard=false",
            "output.progress=false",
        ],
    )
    summary = train(cfg, log=lambda m: None)
    run = tmp_path / "run"
    assert _kinds(run) == []
    assert "diagnoses" not in summary
    assert summary["report"] == str(run / "report.html")
    assert "No problems found" in (run / "report.html").read_text()
    # the same records, diagnosed after the fact, agree
    assert diagnose_records(_records(run)) == []


def test_doctor_and_report_can_be_disabled_and_bad_keys_are_named():
    base = {"model": {"name": "linear"}, "data": {"name": "digits"}}
    data = DataBundle(train=None)
    assert [type(cb).__name__ for cb in default_callbacks(load_config(base), data)] == ["Doctor", "ReportWriter"]
    cfg = load_config({**base, "doctor": {"enabled": False}, "report": {"enabled": False}})
    assert default_callbacks(cfg, data) == []
    with pytest.raises(ConfigError, match="doctor.overfit_evalz"):
        default_callbacks(load_config({**base, "doctor": {"overfit_evalz": 2}}), data)


def test_checks_on_records_need_both_curves():
    o = DoctorOptions()
    trains = [{"step": s, "loss": 1.0 - s / 100, "lr": 0.1} for s in range(10, 90, 10)]
    evals = [{"step": s, "loss": v} for s, v in zip(range(10, 90, 10), [0.9, 0.8, 0.7, 0.75, 0.8, 0.85, 0.9])]
    assert check_overfitting(trains, evals, o).kind == "overfitting"
    flat_train = [
        {**r, "loss": 0.5} for r in trains
    ]  # validation rises, training does not fall: not overfitting
    assert check_overfitting(flat_train, evals, o) is None
    assert check_class_imbalance([50, 45, 40], o) is None
    assert check_class_imbalance([50, 0, 40], o).kind == "class_imbalance"


def _preference_evals(margins, logps, rewards):
    return [{"event": "eval", "step": 10 * (i + 1), "loss": 0.69 - 0.01 * i, "reward_margin": m,
             "logp_chosen": lp, "reward_chosen": rc, "reward_accuracy": 0.6}
            for i, (m, lp, rc) in enumerate(zip(margins, logps, rewards))]


def test_preference_findings_margin_collapse_and_falling_chosen_likelihood():
    o = DoctorOptions()
    trains = [{"event": "train", "step": s, "loss": 0.69 - s / 500, "lr": 1e-4} for s in range(5, 45, 5)]
    healthy = _preference_evals([0.1, 0.3, 0.5, 0.6], [-50.0, -50.2, -49.8, -50.5], [0.05, 0.1, 0.2, 0.2])
    assert diagnose_records(trains + healthy, o) == []  # nor underfitting: a DPO loss near ln 2 is normal
    collapsed = _preference_evals([0.1, 0.4, 0.2, 0.01], [-50.0] * 4, [0.0] * 4)
    (d,) = diagnose_records(trains + collapsed, o)
    assert d.kind == "margin_collapse" and d.step == 40
    assert "rose to 0.4 (step 20) and fell to 0.01 (step 40)" in d.evidence and "optim.lr" in d.remedy
    displaced = _preference_evals([0.1, 0.5, 0.9, 1.2], [-50.0, -52.0, -55.0, -58.0], [-0.1, -0.3, -0.5, -0.8])
    (d,) = diagnose_records(trains + displaced, o)
    assert d.kind == "chosen_likelihood_falling" and "fell from -50 to -58, chosen reward -0.8" in d.evidence
    assert "task.nll_weight" in d.remedy
    above_reference = _preference_evals([0.1, 1.2], [-50.0, -58.0], [0.1, 0.2])  # still above the reference
    assert diagnose_records(trains + above_reference, o) == []
