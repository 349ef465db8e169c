"""Repeats for the side-by-side benchmarks: sides run round-robin N times (so a change of machine load hits
them alike); each side's figures are medians over its runs and each ratio is the median of the per-repeat
ratios (the two sides of one repeat ran back to back). Every run is kept in the final JSON (`repeats`)."""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Callable


def run_in_scratch(cmd: list[str], env: dict | None = None, **kwargs) -> subprocess.CompletedProcess:
    """`subprocess.run` with TMPDIR pointed at a fresh folder that is removed afterwards, whatever the side
    wrote there (run folders, checkpoints, the peer's output_dir, a tokenised cache): a benchmark's sides
    leave nothing behind, so repeated benchmarks can't fill the disk."""
    env = dict(os.environ if env is None else env)
    scratch = tempfile.mkdtemp(prefix="tunelab-bench-", dir=env.get("TMPDIR"))  # inside the side's own TMPDIR
    try:
        return subprocess.run(cmd, env={**env, "TMPDIR": scratch}, **kwargs)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def run_round_robin(n: int, sides: list[str], launch: Callable[[str, int], tuple[list[str], dict]],
                    cwd=None) -> list[dict[str, dict]]:
    """Run every side in its own subprocess, round-robin `n` times; `launch(side, repeat)` gives the command
    and its environment, and the side prints its result as its last JSON line. Each run is echoed to stderr.
    Returns one {side: result} per repeat."""
    repeats: list[dict[str, dict]] = []
    for rep in range(n):
        repeats.append({})
        for side in sides:
            cmd, env = launch(side, rep)
            proc = run_in_scratch(cmd, env, capture_output=True, text=True, cwd=cwd)
            lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
            if proc.returncode != 0 or not lines:
                sys.stderr.write(proc.stderr[-4000:])
                raise SystemExit(f"side {side} failed (exit {proc.returncode})")
            result = {k: v for k, v in json.loads(lines[-1]).items() if k != "side"}
            print(json.dumps({side: result, "repeat": rep}), file=sys.stderr, flush=True)
            repeats[-1][side] = result
    return repeats


def median_side(runs: list[dict]) -> dict:
    """A side's figures over its runs: the median of every number (the first run's other values)."""
    numeric = {k for k, v in runs[0].items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    return {k: statistics.median(r[k] for r in runs if r.get(k) is not None) if k in numeric else v
            for k, v in runs[0].items() if not (k in numeric and all(r.get(k) is None for r in runs))}  # fmt: skip


def summarize(repeats: list[dict[str, dict]], figures: dict[str, Callable[[dict[str, dict]], float]],
              digits: int = 4) -> dict:
    """{side: medians, figure: median over repeats, "repeats": every run with its figures}. A figure is a
    function of one repeat's sides ({side: result}); one whose sides did not run is left out."""
    for rep in repeats:
        for name, fn in figures.items():
            try:
                rep[name] = round(fn(rep), digits)
            except KeyError:
                pass
    sides = [k for k, v in repeats[0].items() if isinstance(v, dict)]
    final: dict = {side: _rounded(median_side([rep[side] for rep in repeats]), digits) for side in sides}
    for name in figures:
        values = [rep[name] for rep in repeats if name in rep]
        if values:
            final[name] = round(statistics.median(values), digits)
    final["repeats"] = repeats
    return final


def _rounded(d: dict, digits: int) -> dict:
    return {k: round(v, digits) if isinstance(v, float) else v for k, v in d.items()}
