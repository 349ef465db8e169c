"""The HTML report from a run directory, the comparison page, and the CLI around them."""

from __future__ import annotations

import base64
import json
import math
import re
from pathlib import Path

from tunelab.cli import main
from tunelab.insight.report import read_run, render_run, summary_rows


def make_run(path: Path, name: str, slope: float, diverged: bool = False) -> Path:
    """A run directory as the trainer writes it (crafted: the report reads only files)."""
    path.mkdir(parents=True)
    (path / "config.yaml").write_text(
        f"name: {name}\nmodel: {{name: cnn}}\ndata: {{name: digits, labels: [a, b, c]}}\n"
    )
    recs = [{"event": "start", "step": 0, "device": "cpu", "precision": "fp32"}]
    for s in range(10, 110, 10):
        loss = 2 * math.exp(-slope * s)
        recs.append(
            {
                "event": "train",
                "step": s,
                "loss": loss,
                "lr": 0.1 * (1 - s / 120),
                "grad_norm": 1 + s / 100,
                "samples_per_s": 500.0,
                "data_wait_frac": 0.01,
            }
        )
        if s % 20 == 0:
            recs.append(
                {
                    "event": "eval",
                    "step": s,
                    "loss": loss * 1.2 + s / 500,
                    "accuracy": 1 - loss / 2,
                    "f1_macro": 1 - loss / 2.2,
                    "confusion_matrix": [[5, 1, 0], [0, 6, 1], [1, 0, 7]],
                }
            )
    recs.append(
        {
            "event": "diagnosis",
            "kind": "overfitting",
            "evidence": "validation loss rose <fast>",
            "remedy": "weight decay",
            "step": 100,
        }
    )
    if diverged:
        recs.append(
            {"event": "train", "step": 110, "loss": float("nan"), "lr": 0.1, "grad_norm": float("inf")}
        )
        recs.append({"event": "diverged", "step": 110, "message": "loss became nan"})
    text = "".join(json.dumps(r) + "\n" for r in recs) + '{"event": "train", "st'  # a torn last line
    (path / "metrics.jsonl").write_text(text)
    summary = {
        "status": "failed" if diverged else "completed",
        "global_step": 100,
        "epoch": 2,
        "metrics": {"loss": 0.3, "accuracy": 0.9},
        "best": {"metric": "accuracy", "value": 0.9, "step": 80},
        "wall_s": 12.0,
        "train_samples_per_s": 500.0,
        "peak_rss_mb": 900.0,
    }
    (path / "summary.json").write_text(json.dumps(summary))
    (path / "lr_finder.json").write_text(
        json.dumps(
            {
                "lrs": [10 ** (-5 + i / 10) for i in range(50)],
                "losses": [2.0] * 50,
                "smoothed": [2.0 - i / 50 for i in range(50)],
                "suggestion": 1e-3,
                "steepest": 1e-3,
                "valley": 5e-4,
                "min_div10": 2e-3,
            }
        )
    )
    return path


def _images(html: str) -> list[bytes]:
    return [base64.b64decode(b) for b in re.findall(r'src="data:image/png;base64,([^"]+)"', html)]


def test_single_run_report_is_self_contained_with_all_figures(tmp_path):
    run = make_run(tmp_path / "a", "alpha", 0.03)
    assert main(["report", str(run)]) == 0
    html = (run / "report.html").read_text()
    images = _images(html)
    # loss, metrics, lr, grad norm, throughput, confusion matrix, LR finder
    assert len(images) == 7 and all(img[:8] == b"\x89PNG\r\n\x1a\n" for img in images)
    assert not re.search(r'(src|href)="(https?:)?//', html)  # no network resources
    assert "<script" not in html
    assert "&lt;fast&gt;" in html  # evidence is escaped
    assert "generalisation gap" in html and "name: alpha" in html


def test_summary_shows_the_train_validation_gap(tmp_path):
    run = read_run(make_run(tmp_path / "a", "alpha", 0.03))
    rows = dict(summary_rows(run))
    assert rows["final validation loss"] > rows["final train loss (last log)"]
    assert math.isclose(
        rows["generalisation gap (validation - train loss)"],
        rows["final validation loss"] - rows["final train loss (last log)"],
    )


def test_failed_run_report_marks_divergence(tmp_path):
    run = read_run(make_run(tmp_path / "d", "boom", 0.03, diverged=True))
    html = render_run(run)
    assert 'class="failed"' in html and len(_images(html)) >= 5


def test_compare_runs_on_shared_axes(tmp_path):
    a = make_run(tmp_path / "a", "alpha", 0.03)
    b = make_run(tmp_path / "b", "alpha", 0.01)  # same name: told apart by folder
    out = tmp_path / "cmp.html"
    assert main(["report", str(a), str(b), "-o", str(out)]) == 0
    html = out.read_text()
    assert "alpha (a)" in html and "alpha (b)" in html
    assert len(_images(html)) >= 5


def test_missing_run_dir_is_a_clear_error(tmp_path, capsys):
    assert main(["report", str(tmp_path / "nope")]) == 2
    assert "run folder not found" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["report", str(tmp_path / "empty")]) == 2
    assert "no metrics.jsonl" in capsys.readouterr().err
