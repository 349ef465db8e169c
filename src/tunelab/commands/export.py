"""`tunelab export`: a run's model as a Hugging Face folder, a PEFT adapter (tunelab.export) or one GGUF file
(tunelab.export.gguf)."""

from __future__ import annotations

import argparse
from typing import Any

from tunelab.commands.common import add_trust_code
from tunelab.export import export_run
from tunelab.registry import COMMANDS


def run(args: argparse.Namespace) -> int:
    which = "best" if args.best else "final"
    if args.format == "gguf":
        from tunelab.export.gguf import export_gguf

        out = export_gguf(args.run_dir, output=args.output, dtype=args.dtype, which=which,
                          overwrite=args.overwrite, merge=args.merge, trust_code=args.trust_code)  # fmt: skip
    else:
        out = export_run(args.run_dir, output=args.output, merge=args.merge, dtype=args.dtype, which=which,
                         overwrite=args.overwrite, trust_code=args.trust_code)  # fmt: skip
    print(out)
    return 0


@COMMANDS.register("export")
def add_parser(sub: Any) -> None:
    """Register `tunelab export` on the CLI's subparsers."""
    p = sub.add_parser(
        "export", help="a run's model as a Hugging Face folder (--merge), a PEFT adapter or a GGUF file"
    )
    p.add_argument("run_dir")
    p.add_argument("--format", choices=("hf", "gguf"), default="hf",
                   help="hf: Hugging Face folder or PEFT adapter; gguf: one file for llama.cpp (merged)")  # fmt: skip
    p.add_argument("--merge", action="store_true", help="merge LoRA weights into the (fp32) base model")
    p.add_argument("--output", help="destination folder, or .gguf file (default: under RUN_DIR/export/)")
    # no `choices`: the valid dtypes depend on --format, and each exporter refuses the others in one line
    p.add_argument("--dtype", default=None,
                   help="weights dtype: fp32, bf16, fp16 (gguf also q8_0); default: the run's")  # fmt: skip
    p.add_argument("--best", action="store_true", help="export best/ instead of final/")
    p.add_argument("--overwrite", action="store_true", help="replace an existing destination")
    add_trust_code(p)
    p.set_defaults(func=run)
