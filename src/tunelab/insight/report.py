"""The HTML run report: one self-contained `report.html` (inline CSS, PNG figures as data URIs, no
scripts, no network) per run, and a comparison page for several runs on shared axes.

Written at the end of every CLI run (`ReportWriter` below, also for runs that diverged)
and on demand:
    tunelab report RUN_DIR                 # rewrites RUN_DIR/report.html
    tunelab report RUN_A RUN_B -o cmp.html # compares runs
Everything comes from the run directory: metrics.jsonl, summary.json, config.yaml, lr_finder.json.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, Field

from tunelab.callbacks import Callback
from tunelab.config import validate_options
from tunelab.engine.meter import format_breakdown
from tunelab.errors import TunelabError
from tunelab.registry import CALLBACKS

if TYPE_CHECKING:
    from tunelab.config import RunConfig
    from tunelab.engine.trainer import Trainer

Record = dict[str, Any]


class ReportOptions(BaseModel):
    """`report:` section of a recipe."""

    model_config = ConfigDict(extra="forbid")
    enabled: bool = True
    dpi: int = Field(80, ge=30, le=300)

    @classmethod
    def from_config(cls, cfg: RunConfig) -> ReportOptions:
        return validate_options(cls, cfg, "report")


# -- reading a run directory -----------------------------------------------------------------------------


@dataclass
class RunData:
    name: str
    path: Path
    records: list[Record]
    summary: dict[str, Any]
    config_text: str = ""
    config: dict[str, Any] = field(default_factory=dict)
    lr_finder: dict[str, Any] | None = None

    def events(self, kind: str) -> list[Record]:
        return [r for r in self.records if r.get("event") == kind]

    def series(self, kind: str, key: str) -> tuple[list[float], list[float]]:
        """(steps, values) of a scalar field of one event kind; non-finite values are dropped."""
        xs, ys = [], []
        for r in self.events(kind):
            v = r.get(key)
            if _scalar(v) and math.isfinite(v):
                xs.append(r.get("step", 0))
                ys.append(float(v))
        return xs, ys


def _scalar(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def read_metrics(path: Path) -> list[Record]:
    """metrics.jsonl as a list of dicts; a torn last line (a run killed mid-write) and any other line that
    is not a JSON object (a damaged log) are skipped."""
    records = []
    if not path.is_file():
        return records
    for line in path.read_text(errors="replace").splitlines():
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict):
            records.append(record)
    return records


def _read_optional(path: Path, parse: Any) -> Any:
    """A run's side file parsed (JSON or YAML), or None when it is missing or damaged (with a warning): a
    report shows what is readable instead of failing on one bad file."""
    if not path.is_file():
        return None
    try:
        return parse(path.read_text(errors="replace"))
    except ValueError as e:  # json.JSONDecodeError and yaml.YAMLError's parse errors
        print(f"warning: {path}: unreadable ({str(e).splitlines()[0][:120]}); left out of the report", file=sys.stderr)
        return None


def read_run(run_dir: str | Path, summary: dict[str, Any] | None = None) -> RunData:
    import yaml

    def parse_yaml(text: str) -> Any:
        try:
            return yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise ValueError(str(e)) from e

    path = Path(run_dir)
    if not path.is_dir():
        raise TunelabError(f"{path}: run folder not found")
    metrics = path / "metrics.jsonl"
    if not metrics.is_file():
        raise TunelabError(f"{path}: not a tunelab run folder (no metrics.jsonl); pass the run's output.dir")
    records = read_metrics(metrics)
    if summary is None:
        summary = _read_optional(path / "summary.json", json.loads)
        if not isinstance(summary, dict):
            end = [r for r in records if r.get("event") == "end"]
            summary = dict(end[-1]) if end else {"status": "unfinished"}
    config_text = (path / "config.yaml").read_text(errors="replace") if (path / "config.yaml").is_file() else ""
    config = _read_optional(path / "config.yaml", parse_yaml)
    config = config if isinstance(config, dict) else {}
    lr_finder = _read_optional(path / "lr_finder.json", json.loads)
    lr_finder = lr_finder if isinstance(lr_finder, dict) else None
    name = str(config.get("name") or path.name)
    return RunData(name, path, records, dict(summary), config_text, config, lr_finder)


# -- figures ------------------------------------------------------------------------------------------------


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _png(fig: Any, dpi: int) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")
    _pyplot().close(fig)
    return base64.b64encode(buf.getvalue()).decode()


def _label(run: RunData, many: bool, what: str) -> str:
    return f"{run.name} {what}" if many else what


def _vlines(ax: Any, run: RunData) -> None:
    for r in run.events("early_stop"):
        ax.axvline(r["step"], color="tab:red", ls=":", lw=1, label="early stop")
    best = run.summary.get("best") or {}
    if isinstance(best, dict) and _scalar(best.get("step")):
        ax.axvline(best["step"], color="tab:green", ls=":", lw=1, label=f"best {best.get('metric', '')}")
    for r in run.events("diverged"):
        ax.axvline(r["step"], color="black", ls="--", lw=1, label="diverged")


def figure_loss(runs: list[RunData], dpi: int) -> str | None:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 3.6))
    many, drew = len(runs) > 1, False
    for i, run in enumerate(runs):
        color = f"C{i}"
        x, y = run.series("train", "loss")
        if x:
            ax.plot(x, y, color=color, lw=1.2, label=_label(run, many, "train"))
            drew = True
        ev = [r for r in run.events("eval") if not r.get("restored_best")]
        x2 = [r["step"] for r in ev if _scalar(r.get("loss")) and math.isfinite(r["loss"])]
        y2 = [r["loss"] for r in ev if _scalar(r.get("loss")) and math.isfinite(r["loss"])]
        if x2:
            ax.plot(
                x2, y2, color=color, ls="--", marker="o", ms=3, lw=1.2, label=_label(run, many, "validation")
            )
            drew = True
        if not many:
            _vlines(ax, run)
            if x and x2:  # the train/validation gap, where both are known
                import numpy as np

                xs = [s for s in x2 if x[0] <= s <= x[-1]]
                if xs:
                    tr = np.interp(xs, x, y)
                    va = [y2[x2.index(s)] for s in xs]
                    ax.fill_between(xs, tr, va, color=color, alpha=0.12, label="gap")
    if not drew:
        plt.close(fig)
        return None
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.set_title("Training and validation loss")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _png(fig, dpi)


def _eval_metric_names(runs: list[RunData]) -> list[str]:
    names: list[str] = []
    for run in runs:
        for r in run.events("eval"):
            for k, v in r.items():
                if k not in ("event", "step", "epoch", "time", "loss", "restored_best") and _scalar(v):
                    if k not in names:
                        names.append(k)
    return names


def figure_metrics(runs: list[RunData], dpi: int) -> str | None:
    names = _eval_metric_names(runs)[:6]
    if not names:
        return None
    plt = _pyplot()
    cols = min(3, len(names))
    rows = math.ceil(len(names) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.4 * cols, 2.7 * rows), squeeze=False)
    for j, name in enumerate(names):
        ax = axes[j // cols][j % cols]
        for i, run in enumerate(runs):
            ev = [r for r in run.events("eval") if not r.get("restored_best")]
            pts = [(r["step"], r[name]) for r in ev if _scalar(r.get(name)) and math.isfinite(r[name])]
            if pts:
                ax.plot(*zip(*pts), color=f"C{i}", marker="o", ms=3, lw=1.2, label=run.name)
        ax.set_title(name, fontsize=10)
        ax.set_xlabel("step", fontsize=8)
        ax.grid(alpha=0.3)
        if len(runs) > 1 and j == 0:
            ax.legend(fontsize=7)
    for j in range(len(names), rows * cols):
        axes[j // cols][j % cols].axis("off")
    fig.suptitle("Validation metrics", fontsize=11)
    fig.tight_layout()
    return _png(fig, dpi)


def _line_figure(
    runs: list[RunData],
    key: str,
    title: str,
    ylabel: str,
    dpi: int,
    log: bool = False,
    extra: tuple[tuple[str, str], ...] = (),
) -> str | None:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 3.2))
    drew = False
    many = len(runs) > 1
    for i, run in enumerate(runs):
        x, y = run.series("train", key)
        if x:
            ax.plot(x, y, color=f"C{i}", lw=1.2, label=_label(run, many, ylabel))
            drew = True
        for k, label in extra:
            x, y = run.series("train", k)
            if x and not many:
                ax.plot(x, y, lw=1, ls="--", label=label)
    if not drew:
        plt.close(fig)
        return None
    if log and all(v > 0 for run in runs for v in run.series("train", key)[1]):
        ax.set_yscale("log")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _png(fig, dpi)


def figure_throughput(runs: list[RunData], dpi: int) -> str | None:
    plt = _pyplot()
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(9, 3.2))
    drew = False
    for i, run in enumerate(runs):
        key = "tokens_per_s" if run.series("train", "tokens_per_s")[0] else "samples_per_s"
        x, y = run.series("train", key)
        if x:
            ax.plot(x, y, color=f"C{i}", lw=1.2, label=f"{run.name} ({key.replace('_per_s', '/s')})")
            drew = True
        x, y = run.series("train", "data_wait_frac")
        if x:
            ax2.plot(x, [100 * v for v in y], color=f"C{i}", lw=1.2, label=run.name)
    if not drew:
        plt.close(fig)
        return None
    ax.set_title("Throughput")
    ax.set_xlabel("optimizer step")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    ax2.set_title("Time waiting for data (% of step)")
    ax2.set_xlabel("optimizer step")
    ax2.set_ylim(0, 100)
    ax2.grid(alpha=0.3)
    fig.tight_layout()
    return _png(fig, dpi)


def _class_names(run: RunData, n: int) -> list[str]:
    labels = (run.config.get("data") or {}).get("labels")
    if isinstance(labels, list) and len(labels) == n:
        return [str(x) for x in labels]
    return [str(i) for i in range(n)]


def figure_confusion(run: RunData, dpi: int) -> str | None:
    evals = [r for r in run.events("eval") if isinstance(r.get("confusion_matrix"), list)]
    if not evals:
        return None
    cm = evals[-1]["confusion_matrix"]
    n = len(cm)
    if n == 0 or n > 50:
        return None
    plt = _pyplot()
    names = _class_names(run, n)
    size = min(2.5 + 0.45 * n, 12)
    fig, ax = plt.subplots(figsize=(size, size))
    ax.imshow(cm, cmap="Blues")
    ax.set_xticks(range(n), names, rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(n), names, fontsize=8)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    total = sum(map(sum, cm))
    correct = sum(cm[i][i] for i in range(n))
    ax.set_title(
        f"Confusion matrix (step {evals[-1]['step']}, accuracy {correct / max(total, 1):.3f})", fontsize=10
    )
    if n <= 20:
        high = max(max(row) for row in cm) / 2
        for i in range(n):
            for j in range(n):
                v = cm[i][j]
                ax.text(
                    j,
                    i,
                    str(int(v)),
                    ha="center",
                    va="center",
                    fontsize=7,
                    color="white" if v > high else "black",
                )
    fig.tight_layout()
    return _png(fig, dpi)


def figure_lr_finder(result: dict[str, Any], dpi: int) -> str | None:
    """The LR range test: raw and smoothed loss against the LR, with the suggestion and cross-checks."""
    lrs, raw, smooth = result.get("lrs"), result.get("losses"), result.get("smoothed")
    if not lrs or not smooth:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 3.6))
    finite = [(a, b) for a, b in zip(lrs, raw or []) if _scalar(b) and math.isfinite(b)]
    if finite:
        ax.plot(*zip(*finite), color="0.75", lw=0.8, label="loss")
    ax.plot(lrs[: len(smooth)], smooth, color="C0", lw=1.5, label="smoothed loss")
    marks = (
        ("suggestion", "C3", "-"),
        ("steepest", "C1", "--"),
        ("valley", "C2", ":"),
        ("min_div10", "C4", "-."),
    )
    for key, color, ls in marks:
        v = result.get(key)
        if _scalar(v) and v > 0:
            ax.axvline(v, color=color, ls=ls, lw=1.2, label=f"{key.replace('_div10', '/10')} {v:.2g}")
    ax.set_xscale("log")
    ys = [v for v in smooth if math.isfinite(v)]
    if ys:
        lo, hi = min(ys), ys[0]
        ax.set_ylim(lo - 0.1 * abs(hi - lo) - 1e-3, max(hi, lo) + 0.6 * abs(hi - lo) + 1e-3)
    ax.set_xlabel("learning rate")
    ax.set_ylabel("training loss")
    ax.set_title("LR range test")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    return _png(fig, dpi)


# -- HTML -------------------------------------------------------------------------------------------------

CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:24px auto;max-width:1100px;
color:#1d2433;padding:0 16px}h1{font-size:1.5em;margin-bottom:2px}h2{font-size:1.15em;margin-top:28px;
border-bottom:1px solid #dde;padding-bottom:4px}.sub{color:#667;margin-top:0}table{border-collapse:collapse;
font-size:.9em}td,th{border:1px solid #dde;padding:4px 10px;text-align:left;vertical-align:top}
th{background:#f3f5fa}.fig{margin:10px 0}.fig img{max-width:100%;border:1px solid #eef}
.dx{border-left:4px solid #d9822b;background:#fff7ee;padding:8px 12px;margin:8px 0}
.dx.ok{border-color:#2b9d55;background:#effaf2}.dx b.kind{text-transform:capitalize}
pre{background:#f6f8fa;padding:10px;overflow:auto;font-size:.8em}
.failed{color:#b3261e;font-weight:600}.completed,.stopped_early{color:#2b9d55;font-weight:600}
"""


def _fmt(v: Any) -> str:
    if isinstance(v, bool) or v is None:
        return html.escape(str(v))
    if isinstance(v, float):
        if not math.isfinite(v):
            return str(v)
        return f"{v:.4g}" if abs(v) < 1e5 else f"{v:,.0f}"
    if isinstance(v, int):
        return f"{v:,}"
    if isinstance(v, dict):
        return ", ".join(f"{html.escape(str(k))}: {_fmt(x)}" for k, x in v.items())
    return html.escape(str(v))


def _speed_rows(s: dict[str, Any]) -> list[tuple[str, Any]]:
    """Wall time, throughput, where the time went, memory."""
    rows: list[tuple[str, Any]] = [("wall time (s)", s.get("wall_s")), ("train samples/s", s.get("train_samples_per_s"))]
    if s.get("train_tokens_per_s"):
        rows.append(("train tokens/s", s.get("train_tokens_per_s")))
    if s.get("time_breakdown"):
        rows.append(("where the time went", format_breakdown(s["time_breakdown"])))
    if s.get("flops_frac_of_matmul_peak"):
        rows.append(("model FLOP/s / measured matmul peak", s["flops_frac_of_matmul_peak"]))
    rows.append(("peak RSS (MB)", s.get("peak_rss_mb")))
    if s.get("peak_gpu_mb"):
        rows.append(("peak GPU memory (MB)", s.get("peak_gpu_mb")))
    return rows


def summary_rows(run: RunData) -> list[tuple[str, Any]]:
    """The summary table: status, length, speed, memory, final train/validation loss and their gap."""
    s = run.summary
    start = next(iter(run.events("start")), {})
    rows: list[tuple[str, Any]] = [
        ("status", s.get("status")),
        ("optimizer steps", s.get("global_step")),
        ("epochs", s.get("epoch")),
        ("device / precision", f"{start.get('device', '?')} / {start.get('precision', '?')}"),
        *_speed_rows(s),
    ]
    train_steps, train_loss = run.series("train", "loss")
    evals = [r for r in run.events("eval") if _scalar(r.get("loss")) and not r.get("restored_best")]
    restored = [r for r in run.events("restored_best") if r.get("step_restored") is not None]
    val_loss = evals[-1]["loss"] if evals else None
    if restored:  # the final model is the restored one: its loss and the training loss logged up to its step
        step = restored[-1]["step_restored"]
        again = [r for r in run.events("eval") if r.get("restored_best") and _scalar(r.get("loss"))]
        at_step = [r["loss"] for r in evals if r.get("step") == step]
        val_loss = again[-1]["loss"] if again else (at_step[-1] if at_step else None)
        kept = [y for x, y in zip(train_steps, train_loss) if x <= step]
        train_loss = kept or train_loss[:1]
    suffix = f" (restored weights of step {restored[-1]['step_restored']})" if restored else ""
    if train_loss:
        rows.append((f"final train loss (last log){suffix}", train_loss[-1]))
    if val_loss is not None:
        rows.append((f"final validation loss{suffix}", val_loss))
    if train_loss and val_loss is not None:
        rows.append(("generalisation gap (validation - train loss)", val_loss - train_loss[-1]))
    metrics = s.get("metrics") or {}
    for k, v in metrics.items():
        if _scalar(v) and k != "loss":  # the final loss is the validation loss above
            rows.append((f"final {k}", v))
    for k, v in (s.get("test_metrics") or {}).items():
        if _scalar(v):
            rows.append((f"test {k}", v))
    if s.get("best"):
        rows.append(("best checkpoint", s["best"]))
    if s.get("early_stopping"):
        rows.append(("early stopping", s["early_stopping"]))
    for r in run.events("restored_best"):
        rows.append(
            (
                "restored best weights",
                f"from step {r.get('step_restored')} ({r.get('monitor')} {_fmt(r.get('value'))})",
            )
        )
    if s.get("stop_reason"):
        rows.append(("stop reason", s["stop_reason"]))
    if s.get("error"):
        rows.append(("error", s["error"]))
    if run.lr_finder:
        rows.append(("LR finder suggestion", run.lr_finder.get("suggestion")))
    return rows


def _diagnoses(run: RunData) -> list[Record]:
    found = {}
    for r in run.events("diagnosis"):
        found.setdefault(r.get("kind"), r)
    return list(found.values())


def _diagnoses_html(run: RunData) -> str:
    dx = _diagnoses(run)
    if not dx and (run.config.get("doctor") or {}).get("enabled") is False:
        return '<div class="dx ok">The run doctor was off for this run (<code>doctor.enabled: false</code>).</div>'
    if not dx:
        return '<div class="dx ok"><b>No problems found</b> by the run doctor.</div>'
    parts = []
    for d in dx:
        parts.append(
            f'<div class="dx"><b class="kind">{html.escape(str(d.get("kind", "")).replace("_", " "))}</b> '
            f"(step {_fmt(d.get('step'))})<br>Evidence: {html.escape(str(d.get('evidence', '')))}<br>"
            f"Remedy: {html.escape(str(d.get('remedy', '')))}</div>"
        )
    return "\n".join(parts)


def _fig_html(title: str, b64: str | None) -> str:
    if not b64:
        return ""
    alt = html.escape(title)
    return f'<div class="fig"><img alt="{alt}" title="{alt}" src="data:image/png;base64,{b64}"></div>'


def _page(title: str, subtitle: str, body: list[str]) -> str:
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        '<link rel="icon" href="data:,">'
        f"<title>{html.escape(title)}</title><style>{CSS}</style></head><body>\n"
        f'<h1>{html.escape(title)}</h1><p class="sub">{subtitle}</p>\n'
        + "\n".join(body)
        + "\n</body></html>\n"
    )


def _figures(runs: list[RunData], dpi: int) -> list[tuple[str, str | None]]:
    """(title, PNG) for the figures shared by the single-run and the comparison page."""
    try:
        _pyplot()
    except ImportError:
        print(
            "warning: matplotlib is not installed; the report has no figures (pip install 'tunelab[report]')",
            file=sys.stderr,
        )
        return []
    return [
        ("Training and validation loss", figure_loss(runs, dpi)),
        ("Validation metrics", figure_metrics(runs, dpi)),
        ("Learning-rate schedule", _line_figure(runs, "lr", "Learning-rate schedule", "lr", dpi)),
        (
            "Gradient norm",
            _line_figure(
                runs,
                "grad_norm",
                "Gradient norm (before clipping)",
                "grad norm",
                dpi,
                log=True,
                extra=(
                    ("grad_rms_first", "RMS grad, first layer"),
                    ("grad_rms_last", "RMS grad, last layer"),
                ),
            ),
        ),
        ("Throughput", figure_throughput(runs, dpi)),
    ]


def render_run(run: RunData, dpi: int = 80) -> str:
    """The single-run report page."""
    status = str(run.summary.get("status", "?"))
    body = ["<h2>Summary</h2><table>"]
    body += [f"<tr><th>{html.escape(k)}</th><td>{_fmt(v)}</td></tr>" for k, v in summary_rows(run)]
    body.append("</table>")
    body += ["<h2>Diagnoses</h2>", _diagnoses_html(run), "<h2>Figures</h2>"]
    figs = _figures([run], dpi)
    if figs:
        figs.append(("Confusion matrix", figure_confusion(run, dpi)))
        if run.lr_finder:
            figs.append(("LR range test", figure_lr_finder(run.lr_finder, dpi)))
    body += [_fig_html(t, b) for t, b in figs]
    if run.config_text:
        body += ["<h2>Config</h2>", f"<pre>{html.escape(run.config_text)}</pre>"]
    sub = (
        f'run dir <code>{html.escape(str(run.path))}</code> · status <span class="{html.escape(status)}">'
        f"{html.escape(status)}</span>"
    )
    return _page(f"tunelab run report: {run.name}", sub, body)


def render_comparison(runs: list[RunData], dpi: int = 80) -> str:
    """Several runs on shared axes, with a summary table of one column per run."""
    body = [
        "<h2>Summary</h2><table><tr><th></th>"
        + "".join(f"<th>{html.escape(r.name)}</th>" for r in runs)
        + "</tr>"
    ]
    tables = [dict(summary_rows(r)) for r in runs]
    keys: list[str] = []
    for t in tables:
        keys += [k for k in t if k not in keys]
    for k in keys:
        body.append(
            f"<tr><th>{html.escape(k)}</th>"
            + "".join(f"<td>{_fmt(t.get(k, ''))}</td>" for t in tables)
            + "</tr>"
        )
    body.append("</table><h2>Diagnoses</h2>")
    for r in runs:
        body += [f"<h3>{html.escape(r.name)}</h3>", _diagnoses_html(r)]
    body.append("<h2>Figures (shared axes)</h2>")
    body += [_fig_html(t, b) for t, b in _figures(runs, dpi)]
    finders = [r for r in runs if r.lr_finder]
    for r in finders:
        body.append(_fig_html(f"LR range test: {r.name}", figure_lr_finder(r.lr_finder, dpi)))
    sub = "runs: " + ", ".join(f"<code>{html.escape(str(r.path))}</code>" for r in runs)
    return _page(f"tunelab comparison of {len(runs)} runs", sub, body)


def write_report(
    run_dir: str | Path,
    summary: dict[str, Any] | None = None,
    output: str | Path | None = None,
    dpi: int = 80,
) -> Path:
    """Write `report.html` for one run (atomically) and return its path."""
    from tunelab.io import atomic_write_text

    run = read_run(run_dir, summary)
    out = Path(output) if output else run.path / "report.html"
    atomic_write_text(out, render_run(run, dpi))
    return out


def write_comparison(run_dirs: list[str | Path], output: str | Path, dpi: int = 80) -> Path:
    from tunelab.io import atomic_write_text

    runs = [read_run(d) for d in run_dirs]
    names = [r.name for r in runs]
    for i, r in enumerate(runs):  # same recipe name twice: tell them apart by folder
        if names.count(r.name) > 1:
            r.name = f"{r.name} ({r.path.name})" if r.path.name != r.name else f"{r.name} #{i + 1}"
    out = Path(output)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out, render_comparison(runs, dpi))
    return out


# -- the end-of-run writer -------------------------------------------------------------------------------
class ReportWriter(Callback):
    """Writes report.html at the end of every run, completed, stopped early or diverged."""

    def __init__(self, dpi: int = 80):
        self.dpi = dpi

    def on_fit_end(self, trainer: Trainer, summary: dict[str, Any]) -> None:
        if not trainer.is_main or trainer.output_dir is None:
            return
        if trainer._metrics_file is not None:
            trainer._metrics_file.flush()
        try:
            path = write_report(trainer.output_dir, summary=summary, dpi=self.dpi)
        except Exception as e:  # a report must never cost the user a finished run
            print(f"warning: could not write the HTML report ({type(e).__name__}: {e})", file=sys.stderr)
            return
        summary["report"] = str(path)


@CALLBACKS.register("report")
def report_callbacks(cfg: RunConfig, data: Any) -> list[Callback]:
    """report.html at the end of every run, unless `report.enabled: false`."""
    options = ReportOptions.from_config(cfg)
    return [ReportWriter(options.dpi)] if options.enabled else []
