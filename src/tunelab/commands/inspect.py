"""`tunelab inspect CHECKPOINT [--against CONFIG ...]`: a checkpoint's tensors; with a recipe, the LoadReport."""

from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import Any

from tunelab.registry import COMMANDS


def run(args: argparse.Namespace) -> int:
    from tunelab.weights import describe_checkpoint

    path = Path(args.checkpoint)
    if path.is_dir() and (path / "model.safetensors").is_file():
        path = path / "model.safetensors"
    rows = describe_checkpoint(path)
    width = max((len(n) for n, _, _ in rows), default=10)
    for name, shape, dtype in rows:
        print(f"{name:<{width}}  {str(list(shape)):<20} {dtype}")
    print(f"{len(rows)} tensors, {sum(math.prod(shape) for _, shape, _ in rows):,} values")
    if args.against:
        from tunelab.config import load_config
        from tunelab.models import create_model
        from tunelab.weights import load_pretrained

        cfg = load_config(args.against[0], args.against[1:])
        model = create_model(cfg.model.name, **cfg.model.kwargs)
        report = load_pretrained(model, path, allow_missing=cfg.pretrained.allow_missing,
                                 rename=cfg.pretrained.rename, strict=False)
        print()
        print(report.table())
        left = report.uninitialised(cfg.pretrained.allow_missing)
        if left and cfg.pretrained.strict:
            print(f"\nA training run would refuse this load: {len(left)} model tensors would stay uninitialised "
                  f"({', '.join(left[:3])}{' ...' if len(left) > 3 else ''}); allow them with "
                  "pretrained.allow_missing=[...] or set pretrained.strict=false")
    return 0


@COMMANDS.register("inspect")
def add_parser(sub: Any) -> None:
    p = sub.add_parser("inspect", help="list a checkpoint's tensors; with --against, the LoadReport")
    p.add_argument("checkpoint")
    p.add_argument("--against", nargs="+", metavar="CONFIG [KEY=VALUE ...]",
                   help="a recipe (and overrides) whose model the checkpoint is matched against")
    p.set_defaults(func=run)
