"""`tunelab lr-find`: the learning-rate range test from a recipe (tunelab.insight.lr_finder)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from tunelab.insight.lr_finder import RULES, describe, find_lr
from tunelab.registry import COMMANDS


def run(args: argparse.Namespace) -> int:
    from tunelab.config import load_config

    cfg = load_config(args.config, args.overrides)
    if cfg.optim.lr == "auto":
        cfg.optim.lr = 1e-3  # the value is not used: the test sweeps it
    result = find_lr(
        cfg,
        args.start_lr,
        args.end_lr,
        args.steps,
        args.rule,
        args.output,
        log=lambda m: print(m, file=sys.stderr),
    )
    out = Path(args.output) if args.output else cfg.output_dir
    print(describe(result), file=sys.stderr)
    print(f"wrote {out / 'lr_finder.png'} and {out / 'lr_finder.json'}", file=sys.stderr)
    print(
        json.dumps(
            {
                "suggestion": result.suggestion,
                "rule": result.rule,
                "steepest": result.steepest,
                "valley": result.valley,
                "min_div10": result.min_div10,
                "diverged": result.diverged,
                "steps": len(result.lrs),
            }
        )
    )
    return 0


@COMMANDS.register("lr-find")
def add_parser(sub: Any) -> None:
    p = sub.add_parser("lr-find", help="LR range test: suggest a learning rate, plot the curve")
    p.add_argument("config")
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides")
    p.add_argument("--start-lr", type=float, default=1e-7)
    p.add_argument("--end-lr", type=float, default=10.0)
    p.add_argument("--steps", type=int, default=100, help="number of LR values tried (default 100)")
    p.add_argument(
        "--rule",
        choices=RULES,
        default="checked",
        help="checked (default): steepest unless 10x from valley or min/10, then min/10",
    )
    p.add_argument("--output", help="folder for lr_finder.png/json (default: the config's output.dir)")
    p.set_defaults(func=run)
