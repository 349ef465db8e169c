"""`tunelab quickstart [--output DIR]`: the six steps on the digits that scikit-learn ships, no network."""

from __future__ import annotations

import argparse
from typing import Any

from tunelab.registry import COMMANDS


def run(args: argparse.Namespace) -> int:
    from tunelab.quickstart import quickstart

    quickstart(args.output, overwrite=args.overwrite)
    return 0


@COMMANDS.register("quickstart")
def add_parser(sub: Any) -> None:
    p = sub.add_parser("quickstart", help="the whole pipeline on the digits that scikit-learn ships")
    p.add_argument("--output", default="runs/quickstart")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=run)
