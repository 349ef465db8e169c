"""Small pieces the subcommands share."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any


def add_trust_code(p: argparse.ArgumentParser) -> None:
    p.add_argument("--trust-code", action="store_true",
                   help="allow the run folder's files to name Python code to import (a `module:Class` model, "
                        "trust_remote_code); only for folders you trust")


def print_json(obj: Any) -> None:
    print(json.dumps(obj, default=float))


def log(message: str) -> None:
    """Progress and notes go to stderr; stdout carries only results (JSON lines, generated text)."""
    print(message, file=sys.stderr)
