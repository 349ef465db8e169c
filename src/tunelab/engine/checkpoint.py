"""Atomic, verified checkpoints with the full training state, for exact resume.

Layout: `checkpoints/step-<N>/` holding model.safetensors, optimizer.pt, trainer_state.pt and
manifest.json (sha256 of every file). A checkpoint is written into a temporary folder, each file fsynced,
the manifest written last, then the folder renamed into place: a crash leaves either the old set or the
new one, never a half-written `step-N`. On load the manifest is checked; a truncated or tampered
checkpoint is refused and resume falls back to the previous good one.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tunelab.errors import CheckpointError

MANIFEST = "manifest.json"


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def replace_dir(tmp: Path, final: Path) -> None:
    """Move folder `tmp` to `final`, replacing an existing `final` without ever leaving neither."""
    old = None
    if final.exists():
        old = final.with_name(f".{final.name}.old-{os.getpid()}-{time.time_ns()}")
        os.replace(final, old)
    os.replace(tmp, final)
    fsync_dir(final.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def write_dir_atomically(final: Path, fill: Callable[[Path], None]) -> None:
    """Create folder `final` by letting `fill(tmp_dir)` write into a temporary folder, then add a sha256
    manifest of every file, fsync, and rename into place (replacing an older `final`)."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f".tmp-{final.name}-{os.getpid()}-{time.time_ns()}")
    tmp.mkdir()
    try:
        fill(tmp)
        digests = {}
        for f in sorted(p for p in tmp.rglob("*") if p.is_file()):
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
            digests[str(f.relative_to(tmp))] = sha256_file(f)
        atomic_write_text(tmp / MANIFEST, json.dumps({"files": digests, "created": time.time()}, indent=1))
        fsync_dir(tmp)
        replace_dir(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_folder_atomically(final: Path, writers: dict[str, Callable[[Path], None]]) -> None:
    """`write_dir_atomically` with one file per writer (name -> fn(path))."""

    def fill(tmp: Path) -> None:
        for name, write in writers.items():
            write(tmp / name)

    write_dir_atomically(final, fill)


def verify_folder(folder: Path) -> None:
    """Raise CheckpointError when the manifest is missing or any file is missing or altered."""
    manifest = folder / MANIFEST
    if not manifest.is_file():
        raise CheckpointError(f"{folder}: no {MANIFEST} (incomplete checkpoint)")
    try:
        files = json.loads(manifest.read_text())["files"]
    except (ValueError, KeyError) as e:
        raise CheckpointError(f"{manifest}: unreadable manifest") from e
    for name, digest in files.items():
        path = folder / name
        if not path.is_file():
            raise CheckpointError(f"{folder}: file {name} listed in the manifest is missing")
        if sha256_file(path) != digest:
            raise CheckpointError(f"{path}: sha256 does not match the manifest (truncated or tampered)")


# -- RNG state in weights-only-loadable form ---------------------------------------------------------------


def holds_trained_run(out: Path) -> bool:
    """Whether folder `out` holds a run that trained: a checkpoint, final/, a logged training step, or a
    summary past step 0. A start that failed before its first step (or lr-find output) does not count."""
    if (out / "final").exists():
        return True
    if (out / "checkpoints").is_dir() and any((out / "checkpoints").iterdir()):
        return True
    metrics = out / "metrics.jsonl"
    if metrics.is_file() and any('"event": "train"' in line for line in metrics.read_text(errors="replace").splitlines()):
        return True
    try:
        return json.loads((out / "summary.json").read_text()).get("global_step", 0) > 0
    except (OSError, ValueError, AttributeError):
        return False


def rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": (np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    name, key, *rest = state["numpy"]
    np.random.set_state((name, key.numpy().astype(np.uint32), *rest))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def torch_save(obj: Any) -> Callable[[Path], None]:
    return lambda path: torch.save(obj, path)


def torch_load(path: Path) -> Any:
    return torch.load(path, map_location="cpu", weights_only=True)


class CheckpointManager:
    """Saves `step-N` folders under `root`, keeps the newest `keep_last`, finds the newest good one."""

    def __init__(self, root: Path, keep_last: int = 2):
        self.root = Path(root)
        self.keep_last = keep_last

    def steps(self) -> list[int]:
        if not self.root.is_dir():
            return []
        out = []
        for p in self.root.iterdir():
            if p.is_dir() and p.name.startswith("step-") and p.name[5:].isdigit():
                out.append(int(p.name[5:]))
        return sorted(out)

    def path(self, step: int) -> Path:
        return self.root / f"step-{step}"

    def save(self, step: int, writers: dict[str, Callable[[Path], None]]) -> Path:
        final = self.path(step)
        write_folder_atomically(final, writers)
        for old in self.steps()[: -self.keep_last]:
            shutil.rmtree(self.path(old), ignore_errors=True)
        return final

    def latest_valid(self, warn: Callable[[str], None] = print) -> Path | None:
        """Newest checkpoint that passes verification; damaged ones are reported and skipped."""
        for step in reversed(self.steps()):
            path = self.path(step)
            try:
                verify_folder(path)
                return path
            except CheckpointError as e:
                warn(f"checkpoint step-{step} refused: {e}; falling back to an older one")
        return None
