"""Atomic, verified checkpoints with the full training state, for exact resume.

Layout: `checkpoints/step-<N>/` holding model.safetensors, optimizer.pt, trainer_state.pt and
manifest.json (sha256 of every file). A checkpoint is written into a temporary folder, each file fsynced,
the manifest written last, then the folder renamed into place: a crash leaves either the old set or the
new one, never a half-written `step-N`. On load the manifest is checked; a truncated or tampered
checkpoint is refused and resume falls back to the previous good one.
"""

from __future__ import annotations

import random
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tunelab.errors import CheckpointError
from tunelab.io import verify_folder, write_dir_atomically


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
    """A weights-only load: a pickle that would run code is refused (CheckpointError), never executed."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # UnpicklingError, truncated zip, ...: a bad checkpoint, not a crash
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise CheckpointError(f"{path}: refused: not a weights-only torch file ({first[:160]})") from e


def non_finite(tensors: dict[str, torch.Tensor]) -> list[str]:
    """Names of the floating-point tensors holding a NaN or an infinity."""
    return [k for k, v in tensors.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]


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
        """Write `step-N` atomically, then prune the oldest beyond `keep_last` (only once this one exists:
        the caller saves only finite states, so a good checkpoint is never pruned for a poisoned one)."""
        final = self.path(step)

        def fill(tmp: Path) -> None:
            for name, write in writers.items():
                write(tmp / name)

        write_dir_atomically(final, fill)
        for old in self.steps()[: -self.keep_last]:
            shutil.rmtree(self.path(old), ignore_errors=True)
        return final

    def candidates(self) -> list[Path]:
        """Every checkpoint, newest first."""
        return [self.path(s) for s in reversed(self.steps())]

    def latest_valid(self, warn: Callable[[str], None] = print) -> Path | None:
        """Newest checkpoint that passes verification; damaged ones are reported and skipped."""
        for path in self.candidates():
            try:
                verify_folder(path)
                return path
            except CheckpointError as e:
                warn(f"checkpoint {path.name} refused: {e}; falling back to an older one")
        return None
