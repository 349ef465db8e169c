"""The sweep report: one self-contained `report.html` in a sweep folder (inline PNG figures, no scripts),
written by `tunelab sweep` at the end of its work, from sweep.json's content and the trials' run folders.

Figures: the objective over trials (pruned and failed trials marked, the best so far as a line), parallel
coordinates of the parameters and the objective, parameter importances (Optuna's fANOVA evaluator, or its
mean-decrease-impurity one: `sweep.importance: mdi`), and the learning curves of the top trials on shared
axes. Then a table of every trial.
"""

from __future__ import annotations

import html
import math
from pathlib import Path
from typing import Any

from tunelab.insight.report import (
    RunData,
    _fig_html,
    _fmt,
    _page,
    _png,
    _pyplot,
    figure_loss,
    read_run,
)

TOP_TRIALS = 5  # learning curves shown


def param_importances(study: Any, evaluator: str = "fanova") -> dict[str, float]:
    """Importance of each parameter for the objective ({} when it is undefined: fewer than two trials with a
    value, or one value for all). Completed trials count with their objective, pruned ones with their
    value when they were pruned: with pruning, the completed trials are the good ones, often all at the same
    accuracy, and the parameters that got trials pruned are the important ones. Log-sampled parameters are
    judged on their log scale (`_sampled_scale`)."""
    import optuna
    from optuna.trial import TrialState

    scored = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED))
              if _finite(t.value)]
    if len({t.value for t in scored}) < 2:
        return {}
    copy = optuna.create_study(direction=study.direction)
    for t in scored:
        on_scale = {name: _sampled_scale(dist, t.params[name]) for name, dist in t.distributions.items()}
        copy.add_trial(optuna.trial.create_trial(
            params={k: v for k, (_, v) in on_scale.items()},
            distributions={k: d for k, (d, _) in on_scale.items()}, value=t.value))
    importance = optuna.importance
    chosen = (importance.FanovaImportanceEvaluator(seed=0) if evaluator == "fanova"
              else importance.MeanDecreaseImpurityImportanceEvaluator(seed=0))
    try:
        return {k: float(v) for k, v in importance.get_param_importances(copy, evaluator=chosen).items()}
    except (ValueError, RuntimeError):  # e.g. the trials' parameters do not vary
        return {}


def _sampled_scale(dist: Any, value: Any) -> tuple[Any, Any]:
    """A log-sampled parameter as its log10 (Optuna's evaluators work on the raw scale, where fANOVA's
    marginals would weigh lr in [0.1, 0.5] far above lr in [0.001, 0.1], which the sampler explores as much)."""
    from optuna.distributions import FloatDistribution

    if getattr(dist, "log", False):
        return FloatDistribution(math.log10(dist.low), math.log10(dist.high)), math.log10(value)
    return dist, value


def _finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def figure_objective(results: dict[str, Any], mode: str, dpi: int) -> str | None:
    """The objective of each trial against its number; pruned trials at their last value; failed ones as
    ticks on the axis; the best completed value so far as a step line."""
    trials = results["trials"]
    if not trials:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 3.4))
    styles = {"complete": ("o", "C0", "completed"), "pruned": ("x", "0.5", "pruned")}
    for state, (marker, color, label) in styles.items():
        pts = [(t["number"], t["value"]) for t in trials if t["state"] == state and _finite(t["value"])]
        if pts:
            ax.plot(*zip(*pts), marker, color=color, ms=5, label=label)
    failed = [t["number"] for t in trials if t["state"] == "fail"]
    for i, n in enumerate(failed):
        ax.axvline(n, color="tab:red", ls=":", lw=1, label="failed" if i == 0 else None)
    best, line = None, []
    for t in sorted(trials, key=lambda t: t["number"]):
        if t["state"] == "complete" and _finite(t["value"]):
            if best is None or (t["value"] > best if mode == "max" else t["value"] < best):
                best = t["value"]
        if best is not None:
            line.append((t["number"], best))
    if line:
        ax.step(*zip(*line), where="post", color="C2", lw=1.2, label="best so far")
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("trial")
    ax.set_ylabel(results["objective"])
    ax.set_title(f"Objective over trials ({mode}imise {results['objective']})")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _png(fig, dpi)


def _axis_values(values: list[Any], log: bool = False) -> tuple[list[float], list[str] | None, str]:
    """One parallel-coordinates axis: the values scaled to [0, 1] (on a log scale with `log`), then the
    category names (None for a numeric axis) or the numeric axis' range as text."""
    if all(_finite(v) for v in values):
        nums = [float(v) for v in values]
        log = log and min(nums) > 0
        xs = [math.log10(v) for v in nums] if log else nums
        lo, hi = min(xs), max(xs)
        scaled = [(x - lo) / (hi - lo) if hi > lo else 0.5 for x in xs]
        return scaled, None, f"{min(nums):.3g} .. {max(nums):.3g}" + (" (log)" if log else "")
    choices = sorted({str(v) for v in values})
    return [choices.index(str(v)) / max(len(choices) - 1, 1) for v in values], choices, ""


def figure_parallel(results: dict[str, Any], dpi: int) -> str | None:
    """One line per trial through an axis per parameter and the objective, coloured by the objective;
    pruned trials dashed, at the value they were pruned with."""
    done = [t for t in results["trials"] if t["state"] in ("complete", "pruned") and _finite(t["value"])]
    names = list(results["space"])
    if len(done) < 2 or not names:
        return None
    plt = _pyplot()
    columns = [[t["params"].get(n) for t in done] for n in names] + [[t["value"] for t in done]]
    labels = names + [results["objective"]]
    logs = [results["space"][n].startswith("loguniform") for n in names] + [False]  # as the space samples them
    axes = [_axis_values(col, log) for col, log in zip(columns, logs)]
    values = [t["value"] for t in done]
    lo, hi = min(values), max(values)
    cmap = plt.get_cmap("viridis")
    fig, ax = plt.subplots(figsize=(max(6, 1.8 * len(labels)), 3.8))
    for i, t in enumerate(done):
        shade = (t["value"] - lo) / (hi - lo) if hi > lo else 1.0
        pruned = t["state"] == "pruned"
        ax.plot(range(len(labels)), [a[0][i] for a in axes], color=cmap(shade), lw=1.0 if pruned else 1.6,
                ls="--" if pruned else "-", alpha=0.55 if pruned else 0.9)
    for j, (_, choices, span) in enumerate(axes):
        ax.axvline(j, color="0.3", lw=0.8)
        if choices is None:  # numeric: low at the bottom, high at the top
            low, _, high = span.partition(" .. ")
            ax.text(j, -0.06, low, ha="center", va="top", fontsize=7)
            ax.text(j, 1.04, high, ha="center", va="bottom", fontsize=7)
        else:
            for k, choice in enumerate(choices):
                ax.text(j + 0.03, k / max(len(choices) - 1, 1), choice, fontsize=7, va="center")
    ax.set_xticks(range(len(labels)), labels, fontsize=8)
    ax.set_yticks([])
    ax.set_ylim(-0.15, 1.15)
    ax.set_title("Parallel coordinates (colour: objective, brighter is higher; dashed: pruned)")
    for side in ("top", "right", "left"):
        ax.spines[side].set_visible(False)
    return _png(fig, dpi)


def figure_importances(importances: dict[str, float], evaluator: str, dpi: int) -> str | None:
    if not importances:
        return None
    plt = _pyplot()
    names = list(importances)[::-1]
    fig, ax = plt.subplots(figsize=(6, 0.5 + 0.45 * len(names)))
    ax.barh(names, [importances[n] for n in names], color="C0")
    for i, n in enumerate(names):
        ax.text(importances[n], i, f" {importances[n]:.2f}", va="center", fontsize=8)
    ax.set_xlim(0, 1.1)
    ax.set_xlabel("importance (sums to 1)")
    ax.set_title(f"Parameter importances ({'fANOVA' if evaluator == 'fanova' else 'mean decrease in impurity'}; "
                 "completed and pruned trials)")
    ax.grid(alpha=0.3, axis="x")
    return _png(fig, dpi)


def figure_curves(runs: list[RunData], objective: str, dpi: int) -> str | None:
    """The objective at each evaluation of the top trials, on shared axes."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 3.4))
    drew = False
    for i, run in enumerate(runs):
        pts = [(r["step"], r[objective]) for r in run.events("eval")
               if not r.get("restored_best") and _finite(r.get(objective))]
        if pts:
            ax.plot(*zip(*pts), color=f"C{i}", marker="o", ms=3, lw=1.2, label=run.name)
            drew = True
    if not drew:
        plt.close(fig)
        return None
    ax.set_xlabel("optimizer step")
    ax.set_ylabel(objective)
    ax.set_title(f"Validation {objective} of the top trials")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _png(fig, dpi)


def top_runs(folder: Path, results: dict[str, Any], mode: str, k: int = TOP_TRIALS) -> list[RunData]:
    done = [t for t in results["trials"] if t["state"] == "complete" and _finite(t["value"])]
    done.sort(key=lambda t: t["value"], reverse=mode == "max")
    runs = []
    for t in done[:k]:
        path = folder / t["run_dir"]
        if (path / "metrics.jsonl").is_file():
            run = read_run(path)
            run.name = f"trial {t['number']}"
            runs.append(run)
    return runs


def _trials_table(results: dict[str, Any]) -> str:
    names = list(results["space"])
    head = "".join(f"<th>{html.escape(h)}</th>" for h in
                   ["trial", "state", html.escape(results["objective"]), *names, "steps", "wall (s)", "notes"])
    best = (results.get("best") or {}).get("number")
    rows = []
    for t in results["trials"]:
        notes = "; ".join(t.get("diagnoses") or []) or t.get("error") or ""
        state = t["state"] if t.get("status") in (None, "completed") else f"{t['state']} ({t['status']})"
        cells = [f"{t['number']}{' (best)' if t['number'] == best else ''}", state, _fmt(t["value"]),
                 *(_fmt(t["params"].get(n)) for n in names), _fmt(t.get("steps")), _fmt(t.get("wall_s")),
                 html.escape(notes[:300])]
        rows.append("<tr>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
    return f"<table><tr>{head}</tr>{''.join(rows)}</table>"


def render_sweep(folder: Path, results: dict[str, Any], mode: str, dpi: int = 80) -> str:
    counts = results["counts"]
    best = results.get("best")
    body = ["<h2>Summary</h2><table>"]
    rows = [
        ("objective", f"{results['objective']} ({mode}imise)"),
        ("trials", f"{len(results['trials'])} of {results['n_trials'] or 'unbounded'}: {counts['complete']} completed, "
                   f"{counts['pruned']} pruned, {counts['fail']} failed, {counts['running']} running"),
        ("sampler / pruner", f"{results['sampler']} / {results['pruner']}"),
        ("search space", "<br>".join(f"{html.escape(k)}: {html.escape(v)}" for k, v in results["space"].items())),
    ]
    if best:
        rows += [("best trial", f"{best['number']} ({html.escape(best['run_dir'])}): {results['objective']} "
                                f"{_fmt(best['value'])}"),
                 ("best parameters", _fmt(best["params"]))]
    body += [f"<tr><th>{html.escape(k)}</th><td>{v}</td></tr>" for k, v in rows]
    body.append("</table><h2>Figures</h2>")
    try:
        _pyplot()
    except ImportError:
        body.append("<p>matplotlib is not installed: no figures (pip install 'tunelab[report]').</p>")
        return _page(f"tunelab sweep report: {results['name']}", "", body + ["<h2>Trials</h2>",
                                                                           _trials_table(results)])
    runs = top_runs(folder, results, mode)
    figures = [
        ("Objective over trials", figure_objective(results, mode, dpi)),
        ("Parallel coordinates", figure_parallel(results, dpi)),
        ("Parameter importances", figure_importances(results.get("importances") or {},
                                                     results.get("importance_evaluator", "fanova"), dpi)),
        ("Validation objective of the top trials", figure_curves(runs, results["objective"], dpi) if runs else None),
        ("Loss of the top trials", figure_loss(runs, dpi) if runs else None),
    ]
    if not (results.get("importances") or {}):
        body.append("<p>No parameter importances: they need trials (completed, or pruned at their last value) "
                    "whose objectives differ.</p>")
    body += [_fig_html(title, png) for title, png in figures]
    body += ["<h2>Trials</h2>", _trials_table(results)]
    sub = f"sweep folder <code>{html.escape(str(folder))}</code> · each trial's own report is in its folder"
    return _page(f"tunelab sweep report: {results['name']}", sub, body)


def write_sweep_report(folder: Path, results: dict[str, Any], mode: str, dpi: int = 80) -> Path:
    from tunelab.io import atomic_write_text

    out = Path(folder) / "report.html"
    atomic_write_text(out, render_sweep(Path(folder), results, mode, dpi))
    return out
