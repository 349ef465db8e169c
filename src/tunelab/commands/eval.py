"""`tunelab eval RUN_DIR [--best]`: re-evaluate a run's final (or best) weights; one JSON line."""

from __future__ import annotations

import argparse
from typing import Any

from tunelab.commands.common import add_trust_code, print_json
from tunelab.registry import COMMANDS


def run(args: argparse.Namespace) -> int:
    from tunelab.run import evaluate_run

    print_json(evaluate_run(args.run_dir, "best" if args.best else "final", args.overrides, trust_code=args.trust_code))
    return 0


@COMMANDS.register("eval")
def add_parser(sub: Any) -> None:
    p = sub.add_parser("eval", help="re-evaluate a run's final (or best) weights; prints one JSON line")
    p.add_argument("run_dir")
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides of the run's config (e.g. its data)")
    p.add_argument("--best", action="store_true")
    add_trust_code(p)
    p.set_defaults(func=run)
