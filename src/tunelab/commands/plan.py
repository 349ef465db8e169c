"""`tunelab plan`: the pre-flight memory and FLOPs plan of a recipe or run folder (tunelab.insight.plan)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from tunelab.commands.common import add_trust_code
from tunelab.insight.plan import format_plan, make_plan, parse_size
from tunelab.registry import COMMANDS


def run(args: argparse.Namespace) -> int:
    from tunelab.config import load_config

    source = Path(args.config)
    cfg = load_config(source / "config.yaml" if source.is_dir() else source, args.overrides)  # a run folder too
    if source.is_dir():
        from tunelab.run import check_config_trusted

        check_config_trusted(cfg, args.trust_code, source / "config.yaml")
    budget = parse_size(args.budget) if args.budget else None
    plan = make_plan(cfg, budget, log=lambda m: print(m, file=sys.stderr), nproc=args.nproc, nnodes=args.nnodes)
    if args.auto_batch:
        from tunelab.insight.autobatch import find_micro_batch_for_config

        res = find_micro_batch_for_config(cfg, log=lambda m: print(m, file=sys.stderr))
        print(f"auto batch: {res.describe()}", file=sys.stderr)
    if args.json:
        print(json.dumps(plan.to_dict(), default=float))
    else:
        print(format_plan(plan))
    return 0


@COMMANDS.register("plan")
def add_parser(sub: Any) -> None:
    p = sub.add_parser("plan", help="pre-flight: parameters, peak memory, FLOPs and what fits a budget")
    p.add_argument("config")
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides")
    p.add_argument("--budget", help="memory budget, e.g. 24GB (default: this device's memory)")
    p.add_argument("--json", action="store_true", help="print the plan as one JSON line")
    p.add_argument("--nproc", type=int, default=1, help="ranks per node: per-rank memory and traffic for ddp/fsdp")
    p.add_argument("--nnodes", type=int, default=1, help="nodes (with --nproc; adds hybrid sharding)")
    add_trust_code(p)
    p.add_argument(
        "--auto-batch",
        action="store_true",
        help="on a GPU, also search the largest micro-batch that fits (runs real steps)",
    )
    p.set_defaults(func=run)
