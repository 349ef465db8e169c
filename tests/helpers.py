"""Test helpers: run the CLI in a subprocess, compare weight files."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[1]


def run_cli(*args: str, check: bool = True, timeout: int = 600, env: dict | None = None,
            cwd: Path = REPO) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "tunelab.cli", *map(str, args)], cwd=cwd, capture_output=True,
                          text=True, timeout=timeout, env=env)
    if check and proc.returncode != 0:
        raise AssertionError(f"tunelab {' '.join(map(str, args))} exited {proc.returncode}:\n{proc.stderr[-3000:]}")
    return proc


def kill_once_written(path: Path, *args: str, env: dict | None = None, timeout: int = 300) -> None:
    """Start `tunelab ARGS`, SIGKILL it as soon as `path` (e.g. a checkpoint folder) exists, and reap it.
    Fails if the run ends before it could be killed."""
    proc = subprocess.Popen([sys.executable, "-m", "tunelab.cli", *map(str, args)], cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + timeout
    while not path.exists():
        assert proc.poll() is None, "run finished before it could be killed"
        assert time.time() < deadline
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()


def assert_one_line_error(proc: subprocess.CompletedProcess, *fragments: str) -> str:
    assert proc.returncode == 2, f"exit {proc.returncode}: {proc.stderr[-2000:]}"
    err = proc.stderr.strip()
    assert "Traceback" not in err, err
    last = err.splitlines()[-1]
    assert last.startswith("error: "), err
    for frag in fragments:
        assert frag in last, f"{frag!r} not in {last!r}"
    return last


def same_weights(a: Path, b: Path) -> bool:
    sa, sb = load_file(str(a)), load_file(str(b))
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
