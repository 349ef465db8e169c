"""LR-finder honesty check: does the suggested LR train to within 1 point of the best LR of a small grid?

For each recipe: `tunelab lr-find` gives the suggestion, then the recipe is trained once per grid LR and
once at the suggestion, each in its own subprocess, same seed and budget. One JSON line per recipe, then a
final JSON line.

    python bench/lr_find_check.py                       # digits and SST-2 (SST-2 on 2,000 rows)
    python bench/lr_find_check.py --only digits --grid-digits 0.01,0.1
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TUNELAB = [sys.executable, "-m", "tunelab.cli"]

CASES = {
    "digits": {
        "recipe": "recipes/digits-cnn.yaml",
        "grid": [0.01, 0.03, 0.1, 0.3],
        "overrides": [],
        "metric": "accuracy",
    },
    "sst2": {
        "recipe": "recipes/sst2-minilm.yaml",
        "grid": [1e-5, 3e-5, 1e-4, 3e-4],
        "overrides": ["data.max_rows=2000"],
        "metric": "accuracy",
    },
}


DIAGNOSES: dict[str, list[str]] = {}  # run -> the doctor's diagnoses (false-alarm evidence on real runs)


def _run(args: list[str]) -> subprocess.CompletedProcess:
    proc = subprocess.run(TUNELAB + args, cwd=REPO, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr[-3000:])
        raise SystemExit(f"command failed: tunelab {' '.join(args)}")
    return proc


def train_once(recipe: str, overrides: list[str], lr: float, out: Path, metric: str) -> float:
    t0 = time.time()
    _run(
        [
            "train",
            recipe,
            *overrides,
            f"optim.lr={lr}",
            f"output.dir={out}",
            "output.progress=false",
            "output.tensorboard=false",
            "report.enabled=false",
            "--overwrite",
        ]
    )
    value = json.loads((out / "summary.json").read_text())["metrics"][metric]
    lines = (out / "metrics.jsonl").read_text().splitlines()
    kinds = [json.loads(x)["kind"] for x in lines if '"diagnosis"' in x]
    print(
        f"  lr {lr:.3g}: {metric} {value:.4f}, doctor: {kinds or 'no diagnosis'} ({time.time() - t0:.0f}s)",
        file=sys.stderr,
    )
    DIAGNOSES[f"{out.name}"] = kinds
    return float(value)


def check(name: str, case: dict, tmp: Path, steps: int) -> dict:
    recipe, overrides, metric = case["recipe"], case["overrides"], case["metric"]
    print(f"== {name}: lr-find on {recipe} {' '.join(overrides)}", file=sys.stderr)
    proc = _run(["lr-find", recipe, *overrides, "--steps", str(steps), "--output", str(tmp / f"{name}-lrf")])
    found = json.loads(proc.stdout.strip().splitlines()[-1])
    suggested = found["suggestion"]
    grid = {lr: train_once(recipe, overrides, lr, tmp / f"{name}-{lr:g}", metric) for lr in case["grid"]}
    got = train_once(recipe, overrides, suggested, tmp / f"{name}-suggested", metric)
    best_lr = max(grid, key=grid.get)
    gap = 100 * (grid[best_lr] - got)
    return {
        "case": name,
        "recipe": recipe,
        "overrides": overrides,
        "metric": metric,
        "suggested_lr": suggested,
        "steepest": found["steepest"],
        "valley": found["valley"],
        "min_div10": found["min_div10"],
        "suggested_score": got,
        "grid": {f"{k:g}": v for k, v in grid.items()},
        "best_grid_lr": best_lr,
        "best_grid_score": grid[best_lr],
        "points_below_best": round(gap, 2),
        "within_1_point": gap <= 1.0,
        "doctor": {k: v for k, v in DIAGNOSES.items() if k.startswith(name)},
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--only", choices=sorted(CASES), action="append")
    p.add_argument("--steps", type=int, default=100, help="LR-finder steps")
    p.add_argument("--grid-digits", help="comma-separated LRs")
    p.add_argument("--grid-sst2", help="comma-separated LRs")
    p.add_argument("--sst2-rows", type=int, default=2000, help="data.max_rows for SST-2 (recipe: 8000)")
    args = p.parse_args()
    if args.grid_digits:
        CASES["digits"]["grid"] = [float(x) for x in args.grid_digits.split(",")]
    if args.grid_sst2:
        CASES["sst2"]["grid"] = [float(x) for x in args.grid_sst2.split(",")]
    CASES["sst2"]["overrides"] = [f"data.max_rows={args.sst2_rows}"]
    results = []
    with tempfile.TemporaryDirectory(prefix="lrcheck-") as d:
        for name in args.only or list(CASES):
            r = check(name, CASES[name], Path(d), args.steps)
            print(json.dumps(r))
            results.append(r)
    print(
        json.dumps(
            {
                "bench": "lr_find_check",
                "cases": len(results),
                "all_within_1_point": all(r["within_1_point"] for r in results),
                "points_below_best": {r["case"]: r["points_below_best"] for r in results},
            }
        )
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
