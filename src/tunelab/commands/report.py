"""`tunelab report`: a run's self-contained report.html, or a comparison of runs (tunelab.insight.report)."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from tunelab.errors import ConfigError
from tunelab.insight.report import write_comparison, write_report
from tunelab.registry import COMMANDS


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from tunelab.engine.rundir import check_not_managed

    if not 30 <= args.dpi <= 300:
        raise ConfigError(f"--dpi {args.dpi}: use 30 to 300 (the report's figures; default 80)")
    own = {(Path(d) / "report.html").resolve() for d in args.run_dirs}
    if args.output and Path(args.output).resolve() not in own:  # a run's own report.html is its to rewrite
        check_not_managed(args.output, "-o")
    if len(args.run_dirs) == 1:
        out = write_report(args.run_dirs[0], output=args.output, dpi=args.dpi)
    else:
        out = write_comparison(args.run_dirs, args.output or "report-compare.html", dpi=args.dpi)
    print(f"wrote {out}", file=sys.stderr)
    return 0


@COMMANDS.register("report")
def add_parser(sub: Any) -> None:
    p = sub.add_parser("report", help="write report.html for a run, or compare several runs on shared axes")
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR")
    p.add_argument(
        "-o",
        "--output",
        help="output HTML (default: RUN_DIR/report.html; report-compare.html for several runs)",
    )
    p.add_argument("--dpi", type=int, default=80)
    p.set_defaults(func=run)
