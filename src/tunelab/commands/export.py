"""`tunelab export`: a run's model as a Hugging Face folder, a PEFT adapter (tunelab.export)."""

from __future__ import annotations

import argparse
from typing import Any

from tunelab.export import EXPORT_DTYPES, export_run
from tunelab.registry import COMMANDS


def run(args: argparse.Namespace) -> int:
    out = export_run(
        args.run_dir,
        output=args.output,
        merge=args.merge,
        dtype=args.dtype,
        which="best" if args.best else "final",
        overwrite=args.overwrite,
    )
    print(out)
    return 0


@COMMANDS.register("export")
def add_parser(sub: Any) -> None:
    """Register `tunelab export` on the CLI's subparsers."""
    p = sub.add_parser("export", help="a run's model as a Hugging Face folder (--merge) or a PEFT adapter")
    p.add_argument("run_dir")
    p.add_argument("--merge", action="store_true", help="merge LoRA weights into the (fp32) base model")
    p.add_argument("--output", help="destination folder (default: RUN_DIR/export/{merged,adapter,model})")
    p.add_argument("--dtype", choices=EXPORT_DTYPES, default=None, help="weights dtype (default: the run's)")
    p.add_argument("--best", action="store_true", help="export best/ instead of final/")
    p.add_argument("--overwrite", action="store_true", help="replace an existing destination")
    p.set_defaults(func=run)
