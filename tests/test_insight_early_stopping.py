"""Early stopping end to end (the engine's EarlyStopping callback, checked from the outside): it stops,
restores the best weights, the final metrics and final/ are those of the best evaluation, and the report
shows it."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn as nn

from tunelab.config import load_config
from tunelab.data.base import TensorDataset
from tunelab.engine.trainer import Trainer
from tunelab.insight.doctor import Doctor
from tunelab.insight.report import ReportWriter
from tunelab.tasks.classification import ClassificationTask
from tunelab.weights import load_state_dict_file

torch.set_num_threads(1)


def _random_labels(n: int, seed: int) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    return TensorDataset(torch.randn(n, 16, generator=g), torch.randint(0, 4, (n,), generator=g))


@pytest.fixture(scope="module")
def stopped_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("es")
    cfg = load_config(
        {
            "model": {"name": "linear"},
            "data": {"name": "digits"},
            "optim": {"name": "adam", "lr": 1e-2},
            "train": {"max_steps": 300, "batch_size": 32, "log_every": 3},
            "eval": {"every": 6, "monitor": "loss"},
            "early_stopping": {"enabled": True, "patience": 3, "min_delta": 0.001},
            "output": {"dir": str(out), "tensorboard": False, "progress": False},
        }
    )
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 256), nn.ReLU(), nn.Linear(256, 4))
    trainer = Trainer(
        model,
        ClassificationTask(num_classes=4),
        _random_labels(96, 0),
        _random_labels(96, 1),
        config=cfg,
        callbacks=[Doctor(echo=False), ReportWriter()],
    )
    summary = trainer.fit()
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return out, summary, records


def test_stops_early_and_restores_the_best_weights(stopped_run):
    out, summary, records = stopped_run
    evals = [r for r in records if r["event"] == "eval" and not r.get("restored_best")]
    best = min(evals, key=lambda r: r["loss"])
    stop = next(r for r in records if r["event"] == "early_stop")
    assert summary["status"] == "stopped_early" and summary["global_step"] < 300
    assert stop["best_step"] == best["step"] and stop["step"] == best["step"] + 3 * 6  # patience 3 evals
    restored = next(r for r in records if r["event"] == "restored_best")
    assert restored["step_restored"] == best["step"]
    final_eval = [r for r in records if r["event"] == "eval" and r.get("restored_best")]
    assert final_eval and final_eval[0]["loss"] == pytest.approx(best["loss"], rel=1e-5)
    assert summary["metrics"]["loss"] == pytest.approx(best["loss"], rel=1e-5)
    assert summary["early_stopping"]["best_step"] == best["step"]
    final = load_state_dict_file(out / "final" / "model.safetensors")
    best_w = load_state_dict_file(out / "best" / "model.safetensors")
    assert all(torch.equal(final[k], best_w[k]) for k in final)


def test_doctor_and_report_see_the_overfitting_that_early_stopping_cut(stopped_run):
    out, summary, records = stopped_run
    assert "overfitting" in [r["kind"] for r in records if r["event"] == "diagnosis"]
    html = (out / "report.html").read_text()
    assert "restored best weights" in html and "early stopping" in html
    # the summary table describes the restored model: its validation loss, not the discarded last one's
    best_loss = summary["metrics"]["loss"]
    row = html.split("final validation loss (restored weights of step")[1].split("</tr>")[0]
    assert f"{best_loss:.4g}" in row


def test_trainer_checks_labels_and_output_shapes_from_python(tmp_path):
    from tunelab.errors import ConfigError, DataError
    from tunelab.tasks.regression import RegressionTask

    labels = TensorDataset(torch.randn(16, 16), torch.tensor([0, 3] * 8))
    with pytest.raises(DataError, match="label 3 is outside \\[0, 2\\)"):
        Trainer(nn.Linear(16, 2), ClassificationTask(num_classes=2), labels, output_dir=tmp_path / "a").fit()
    with pytest.raises(ConfigError, match="outputs 4 scores.*2 classes.*build_task\\(num_classes"):
        zeros = TensorDataset(torch.randn(16, 16), torch.zeros(16, dtype=torch.long))
        Trainer(nn.Linear(16, 4), ClassificationTask(num_classes=2), zeros, output_dir=tmp_path / "b").fit()
    values = TensorDataset(torch.randn(16, 16), torch.randn(16))
    with pytest.raises(ConfigError, match="outputs shape \\(16, 3\\).*targets are \\(16,\\)"):
        Trainer(nn.Linear(16, 3), RegressionTask(), values, output_dir=tmp_path / "c").fit()
