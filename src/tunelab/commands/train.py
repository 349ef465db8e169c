"""`tunelab train CONFIG [key=value ...] [--resume] [--overwrite]`: train a recipe into its run folder."""

from __future__ import annotations

import argparse
from typing import Any

from tunelab.commands.common import log
from tunelab.errors import TunelabError
from tunelab.registry import COMMANDS


def run(args: argparse.Namespace) -> int:
    from tunelab.config import load_config
    from tunelab.run import train

    cfg = load_config(args.config, args.overrides)
    summary = train(cfg, resume=args.resume, overwrite=args.overwrite, log=log,
                    allow_data_change=args.allow_data_change)
    metrics = {k: v for k, v in summary["metrics"].items() if isinstance(v, (int, float))}
    log(f"{summary['status']}: step {summary['global_step']}, "
        + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()) + f"; run dir {cfg.output_dir}")
    if summary["status"] == "diverged":
        found = next((d for d in summary.get("diagnoses", []) if d.get("kind") == "divergence"), {})
        raise TunelabError(f"the run diverged: {found.get('evidence', 'the loss climbed far above its minimum')}; "
                           f"{found.get('remedy', 'lower optim.lr')}")
    return 0


@COMMANDS.register("train")
def add_parser(sub: Any) -> None:
    p = sub.add_parser("train", help="train from a YAML recipe")
    p.add_argument("config")
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. train.max_steps=100")
    p.add_argument("--resume", action="store_true", help="continue from the newest valid checkpoint")
    p.add_argument("--overwrite", action="store_true", help="replace the run in output.dir (only a tunelab run)")
    p.add_argument("--allow-data-change", action="store_true",
                   help="with --resume: continue although the data files changed since the checkpoint")
    p.set_defaults(func=run)
