"""`tunelab eval RUN_DIR [--best]`: re-evaluate a run's final (or best) weights; `tunelab eval CONFIG --base`:
score the recipe's untrained model. One JSON line."""

from __future__ import annotations

import argparse
from typing import Any

from tunelab.commands.common import add_trust_code, log, print_json
from tunelab.registry import COMMANDS


def run(args: argparse.Namespace) -> int:
    from tunelab.run import evaluate_base, evaluate_run

    if args.base:
        print_json(evaluate_base(args.run_dir, args.overrides, log=log))
    else:
        print_json(evaluate_run(args.run_dir, "best" if args.best else "final", args.overrides,
                                trust_code=args.trust_code, split=args.split, data_path=args.data, log=log))
    return 0


@COMMANDS.register("eval")
def add_parser(sub: Any) -> None:
    p = sub.add_parser("eval", help="re-evaluate a run's final (or best) weights, or with --base a recipe's "
                                    "untrained model; prints one JSON line")
    p.add_argument("run_dir", help="a run folder (output.dir of a tunelab train), or a recipe with --base")
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides of the run's config (e.g. its data)")
    p.add_argument("--best", action="store_true")
    p.add_argument("--split", choices=["eval", "test"], default="eval",
                   help="the run's eval split, or its test split (data.test) (default: %(default)s)")
    p.add_argument("--data", metavar="PATH",
                   help="score this labelled file instead, read like the run's test file (data.test)")
    p.add_argument("--base", action="store_true",
                   help="RUN_DIR is a recipe: score its model before any training (pretrained weights, strategy "
                        "applied, untrained) on its eval split")
    add_trust_code(p)
    p.set_defaults(func=run)
