"""`tunelab predict RUN_DIR --text ... / --file in.csv / --image a.jpg ...`: labels and probabilities."""

from __future__ import annotations

import argparse
import csv
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tunelab.commands.common import add_trust_code, print_json
from tunelab.errors import ConfigError, TunelabError
from tunelab.io import atomic_write, atomic_write_text
from tunelab.registry import COMMANDS


def _flat(row: dict[str, Any]) -> dict[str, Any]:
    """A CSV row: one column per class (`prob_<name>`), lists as JSON."""
    out: dict[str, Any] = {}
    for k, v in row.items():
        if isinstance(v, dict):
            out.update({f"{'prob' if k == 'probabilities' else k}_{name}": p for name, p in v.items()})
        else:
            out[k] = json.dumps(v) if isinstance(v, list) else v
    return out


def write_predictions(rows: list[dict[str, Any]], out: Path) -> None:
    """`.csv` (one column per class) or `.jsonl`, written atomically."""
    if out.suffix != ".csv":
        atomic_write_text(out, "".join(json.dumps(r, default=float) + "\n" for r in rows))
        return
    table = [_flat(r) for r in rows]
    fields = list(dict.fromkeys(k for r in table for k in r)) or ["label"]

    def write_csv(tmp: Path) -> None:
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=fields)
            writer.writeheader()
            writer.writerows(table)

    atomic_write(out, write_csv)


def run_like_eval(loaded: Any, predict: Callable[[], list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """Predict on the run's device and in its precision (`train.device`, `train.precision`), under
    inference mode, as `tunelab eval` does: predicting in fp32 on the CPU while eval autocast to bf16 (or ran
    on the GPU) made predict two to three times slower on the same rows."""
    import torch

    from tunelab.engine.step import TrainStep

    step = TrainStep.for_run(loaded.model, loaded.task, loaded.cfg.train)
    loaded.model.to(step.device)
    with torch.inference_mode(), step.autocast():
        return predict()


def run(args: argparse.Namespace) -> int:
    from tunelab.engine.rundir import check_not_managed
    from tunelab.registry import PREDICTORS
    from tunelab.run import load_run

    if args.output:
        if Path(args.output).suffix not in (".jsonl", ".json", ".csv"):
            raise ConfigError(f"--output {args.output}: write .jsonl (one JSON object per line) or .csv")
        check_not_managed(args.output)
    loaded = load_run(args.run_dir, "best" if args.best else "final", with_data=False, trust_code=args.trust_code)
    source = loaded.cfg.data.kwargs["name"]
    if source not in PREDICTORS:
        raise TunelabError(
            f"{args.run_dir}: predict reads new inputs for {', '.join(PREDICTORS.names())} runs, and this run's data "
            f"is `{source}`; `tunelab eval {args.run_dir}` scores its eval split"
        )
    rows = run_like_eval(loaded, lambda: PREDICTORS.get(source)(loaded, args))
    if args.output:
        write_predictions(rows, Path(args.output))
        print(f"wrote {len(rows)} predictions to {args.output}", file=sys.stderr)
    else:
        for r in rows:
            print_json(r)
    return 0


@COMMANDS.register("predict")
def add_parser(sub: Any) -> None:
    p = sub.add_parser("predict", help="labels and probabilities from a trained run")
    p.add_argument("run_dir")
    p.add_argument("--text", action="append", help="a text to classify (repeatable)")
    p.add_argument("--text-pair", action="append", help="second text for pair tasks (repeatable)")
    p.add_argument("--image", nargs="+", help="image files to classify")
    p.add_argument("--file", help="a CSV/TSV/JSONL file of inputs; its columns come through in the output, and "
                   "with the run's label column, accuracy and macro-F1 go to stderr")
    p.add_argument("--output", help="write predictions to .jsonl or .csv instead of stdout")
    p.add_argument("--batch-size", type=int, help="rows per forward (default: the run's eval.batch_size, else "
                   "train.batch_size; images: 32)")
    p.add_argument("--best", action="store_true")
    add_trust_code(p)
    p.set_defaults(func=run)
