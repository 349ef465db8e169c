"""`tunelab train CONFIG [key=value ...] [--resume] [--overwrite]`: train a recipe into its run folder."""

from __future__ import annotations

import argparse
from typing import Any

from tunelab.commands.common import log
from tunelab.errors import TunelabError
from tunelab.registry import COMMANDS


def run(args: argparse.Namespace) -> int:
    from tunelab.config import load_config
    from tunelab.run import is_main_process, train

    cfg = load_config(args.config, args.overrides)
    say = log if is_main_process() else (lambda message: None)  # one voice per torchrun job
    callbacks = []
    if args.profile:
        from tunelab.insight.profile import ProfileSteps

        callbacks.append(ProfileSteps(steps=args.profile))
    summary = train(cfg, resume=args.resume, overwrite=args.overwrite, log=say,
                    allow_data_change=args.allow_data_change, callbacks=callbacks)
    if summary.get("profile"):
        say(f"profile: {summary['profile']} (open in ui.perfetto.dev); top operators in "
            f"{summary['profile'].replace('trace.json', 'ops.txt')}")
    say(f"{summary['status']}: step {summary['global_step']}, {scalars(summary['metrics'])}; run dir {cfg.output_dir}")
    if summary.get("test_metrics"):
        say(f"test: {scalars(summary['test_metrics'])}")
    if summary.get("time_breakdown"):
        from tunelab.engine.meter import format_breakdown

        say(f"time: {format_breakdown(summary['time_breakdown'])} of {summary['wall_s']:.1f} s")
    if summary["status"] == "diverged":
        found = next((d for d in summary.get("diagnoses", []) if d.get("kind") == "divergence"), {})
        raise TunelabError(f"the run diverged: {found.get('evidence', 'the loss climbed far above its minimum')}; "
                           f"{found.get('remedy', 'lower optim.lr')}")
    return 0


def scalars(metrics: dict[str, Any]) -> str:
    return ", ".join(f"{k} {v:.4f}" for k, v in metrics.items() if isinstance(v, (int, float)))


@COMMANDS.register("train")
def add_parser(sub: Any) -> None:
    p = sub.add_parser("train", help="train from a YAML recipe")
    p.add_argument("config")
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. train.max_steps=100")
    p.add_argument("--resume", action="store_true", help="continue from the newest valid checkpoint")
    p.add_argument("--overwrite", action="store_true", help="replace the run in output.dir (only a tunelab run)")
    p.add_argument("--profile", type=int, nargs="?", const=3, default=0, metavar="STEPS",
                   help="write a torch.profiler trace of STEPS optimizer steps (default 3, after 2 warm-up ones) "
                        "into RUN_DIR/profile/ (Chrome/Perfetto JSON) and the top operators into ops.txt")
    p.add_argument("--allow-data-change", action="store_true",
                   help="with --resume: continue although the data files changed since the checkpoint")
    p.set_defaults(func=run)
