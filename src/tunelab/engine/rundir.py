"""The run folder's contract: tunelab writes only into folders it made, one process at a time.

- A marker file, `.tunelab`, says that tunelab made the folder; a non-empty folder without it (and without
  the shape of a run written before markers existed) is never written into, with or without --overwrite.
- The marker is also the lock: `fcntl.flock` on it, held by the training process for the whole run (and
  by `--overwrite` while it replaces a run). A second start on the same folder gets one line and exit 2.
- `--overwrite` moves the old run aside to a hidden sibling (`.NAME.replaced-PID`) and deletes it only once
  the new run has been built; a kill in between is repaired by the next start (the old run is put back).
- Leftovers of killed atomic writes (`.tmp-*`) are removed when the folder is claimed.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from tunelab.errors import ConfigError, TunelabError
from tunelab.io import RUN_MARKER, remove_stale_tmp

MARKER = RUN_MARKER

# Run folders whose lock this process holds: resolved path -> [fd, depth]. flock belongs to an open file
# description, so a second open() in the same process would deadlock against itself: nested claims (the CLI's
# `train` around `Trainer.fit`) share one fd.
_HELD: dict[str, list[int]] = {}


def holds_trained_run(out: Path) -> bool:
    """Whether folder `out` holds a run that trained: a checkpoint, final/, a logged training step, or a
    summary past step 0. A start that failed before its first step (or lr-find output) does not count."""
    if (out / "final").exists():
        return True
    if (out / "checkpoints").is_dir() and any(p.name.startswith("step-") for p in (out / "checkpoints").iterdir()):
        return True
    metrics = out / "metrics.jsonl"
    if metrics.is_file():
        with open(metrics, errors="replace") as f:
            if any('"event": "train"' in line for line in f):
                return True
    try:
        return json.loads((out / "summary.json").read_text()).get("global_step", 0) > 0
    except (OSError, ValueError, AttributeError):
        return False


def _written_by_tunelab_before_markers(out: Path) -> bool:
    """A run folder from a tunelab version that wrote no marker: its final/ or checkpoint layout, or a
    metrics.jsonl that starts with tunelab's `start` event."""
    if (out / "final" / "tunelab_model.json").is_file() or (out / "final" / "manifest.json").is_file():
        return True
    ckpts = out / "checkpoints"
    if ckpts.is_dir() and any((p / "manifest.json").is_file() for p in ckpts.glob("step-*")):
        return True
    try:
        with open(out / "metrics.jsonl") as f:
            first = json.loads(f.readline())
        return first.get("event") == "start" and "total_steps" in first
    except (OSError, ValueError, AttributeError):
        return False


def is_run_folder(out: Path) -> bool:
    return (out / MARKER).is_file() or _written_by_tunelab_before_markers(out)


def marker_kind(folder: Path) -> str | None:
    """What the marker says `folder` is (`run folder`, `sweep folder`); None when it says nothing."""
    try:
        return json.loads((folder / MARKER).read_text()).get("tunelab")
    except (OSError, ValueError, AttributeError):
        return None


def _owner_alive(folder: Path) -> bool:
    """Whether some process holds the lock of `folder` (a run being trained or replaced)."""
    marker = folder / MARKER
    if not marker.is_file():
        return False
    fd = os.open(marker, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return False
    except BlockingIOError:
        return True
    finally:
        os.close(fd)


class RunLock:
    """An exclusive lock on run folder `out` (flock on its marker), reentrant within one process."""

    def __init__(self, out: Path):
        self.out = Path(out)
        self.key = str(self.out.resolve())
        self.fd: int | None = None

    def acquire(self) -> RunLock:
        if self.key in _HELD:
            _HELD[self.key][1] += 1
            self.fd = _HELD[self.key][0]
            return self
        marker = self.out / MARKER
        fd = os.open(marker, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise TunelabError(
                f"{self.out}: another tunelab process is using this run folder; wait for it to finish, stop it, "
                "or choose another output.dir=..."
            ) from None
        if os.fstat(fd).st_size == 0:  # a new marker says what it is; an existing one is left as it is
            os.write(fd, json.dumps({"tunelab": "run folder", "created": time.time()}).encode())
        _HELD[self.key] = [fd, 1]
        self.fd = fd
        return self

    def moved_to(self, new: Path) -> None:
        """The folder was renamed (to be replaced): the lock follows the open file."""
        entry = _HELD.pop(self.key)
        self.out, self.key = Path(new), str(Path(new).resolve())
        _HELD[self.key] = entry

    def release(self) -> None:
        entry = _HELD.get(self.key)
        if entry is None or self.fd is None:
            return
        entry[1] -= 1
        if entry[1] == 0:
            del _HELD[self.key]
            os.close(entry[0])  # closing the last descriptor releases the flock
        self.fd = None


def _warn(msg: str) -> None:
    print(f"warning: {msg}", file=sys.stderr)


def _siblings(out: Path, kind: str) -> list[Path]:
    parent = out.parent
    return sorted(parent.glob(f".{out.name}.{kind}-*")) if parent.is_dir() else []


def recover_interrupted_overwrite(out: Path) -> None:
    """Repair what a kill during `--overwrite` left: a run moved aside whose replacement never started
    training is put back; a run being deleted after its replacement was built is deleted."""
    for doomed in _siblings(out, "deleting"):
        if not _owner_alive(doomed):
            shutil.rmtree(doomed, ignore_errors=True)
    for aside in _siblings(out, "replaced"):
        if _owner_alive(aside):
            continue
        occupied = out.is_dir() and (holds_trained_run(out) or (any(out.iterdir()) and not is_run_folder(out)))
        if occupied:
            _warn(f"{aside} holds a run that an interrupted --overwrite moved aside, and {out} holds another; "
                  f"delete {aside.name} or move it back by hand")
            continue
        if out.is_dir():
            shutil.rmtree(out)
        aside.rename(out)
        _warn(f"restored {out}: an earlier --overwrite was interrupted before its new run started training")


class RunDir:
    """A claimed run folder: locked for this process until the claim ends. With `--overwrite`, the old run
    is kept aside until `commit()` (the new run built), and put back if the claim ends in an error first."""

    def __init__(self, out: Path, lock: RunLock | None, aside: tuple[Path, RunLock] | None = None):
        self.out, self.lock, self._aside = out, lock, aside

    def commit(self) -> None:
        """The new run is built: delete the run it replaces."""
        if self._aside is None:
            return
        aside, old_lock = self._aside
        self._aside = None
        doomed = aside.with_name(aside.name.replace(".replaced-", ".deleting-", 1))
        aside.rename(doomed)  # a kill during the deletion below must not bring it back
        shutil.rmtree(doomed, ignore_errors=True)
        old_lock.release()

    def rollback(self) -> None:
        if self._aside is None:
            return
        aside, old_lock = self._aside
        self._aside = None
        if self.lock is not None:
            self.lock.release()
            self.lock = None
        shutil.rmtree(self.out, ignore_errors=True)
        aside.rename(self.out)
        old_lock.release()


def set_aside(out: Path, lock: RunLock) -> tuple[Path, RunLock]:
    """`--overwrite`: move folder `out`, locked by `lock`, to a hidden sibling (the lock follows it), for a
    `RunDir` to delete once the replacement is built, or to put back if it fails."""
    here, target = Path.cwd().resolve(), out.resolve()
    if target == here or target in here.parents:
        raise ConfigError(f"`output.dir` = {out} is the current folder or holds it; --overwrite will not delete it")
    moved = out.parent / f".{out.name}.replaced-{os.getpid()}"
    out.rename(moved)
    lock.moved_to(moved)
    return moved, lock


@contextlib.contextmanager
def claim_run_dir(out: Path, resume: bool = False, overwrite: bool = False, main: bool = True) -> Iterator[RunDir]:
    """Make `out` ready for a run and hold its lock until the block ends (see the module docstring).

    - empty or missing: created; `resume` is an error (nothing to resume);
    - not made by tunelab: refused, whatever the flags;
    - holding a trained run: `resume` continues it, `overwrite` replaces it, neither is an error;
    - made by tunelab but never trained (a start that failed early, lr-find output): reused.
    `main=False` (the other ranks of a torchrun job): nothing is checked or locked; rank 0 does it."""
    if not main:
        yield RunDir(out, None)
        return
    out = Path(out)
    if out.is_symlink():
        out = out.resolve()  # a run folder kept elsewhere: its target is the run
    if out.exists() and not out.is_dir():
        raise ConfigError(f"`output.dir` = {out} exists and is not a folder")
    recover_interrupted_overwrite(out)
    entries = [e.name for e in out.iterdir()] if out.is_dir() else []
    if not entries:
        if resume:
            raise ConfigError(f"{out}: nothing to resume (the output folder is empty or missing)")
        out.mkdir(parents=True, exist_ok=True)
    elif not is_run_folder(out):
        raise ConfigError(
            f"{out}: output folder is not empty and was not made by tunelab "
            f"({', '.join(sorted(entries)[:5])}); choose another output.dir=..."
        )
    elif marker_kind(out) not in (None, "run folder"):
        raise ConfigError(f"{out}: output folder holds a tunelab {marker_kind(out)}, not a run; "
                          "choose another output.dir=...")
    lock = RunLock(out).acquire()
    aside = None
    try:
        for folder in (out, out / "checkpoints"):
            remove_stale_tmp(folder)
        if entries and not resume and holds_trained_run(out):
            if not overwrite:
                raise ConfigError(f"{out}: output folder holds a run; pass --resume to continue it (from Python: "
                                  "fit(resume=True)) or --overwrite to replace it (or choose another output.dir=...)")
            aside = set_aside(out, lock)
            out.mkdir()
            lock = RunLock(out).acquire()
    except BaseException:
        lock.release()
        raise
    run_dir = RunDir(out, lock, aside)
    try:
        yield run_dir
    except BaseException:
        run_dir.rollback()
        raise
    else:
        run_dir.commit()
    finally:
        if run_dir.lock is not None:
            run_dir.lock.release()


def mark_run_dir(out: Path) -> None:
    """Make `out` a tunelab folder for output written outside a training run (`tunelab lr-find`): created
    with its marker when missing or empty; a non-empty folder that tunelab did not make is refused."""
    out = Path(out)
    if out.is_dir() and any(out.iterdir()):
        if not is_run_folder(out):
            raise ConfigError(f"{out}: output folder is not empty and was not made by tunelab; "
                              "choose another output.dir=... (or --output)")
        return
    out.mkdir(parents=True, exist_ok=True)
    (out / MARKER).touch()


# What a run writes and reads back: other commands' outputs must not land on these.
MANAGED = {MARKER, "config.yaml", "metrics.jsonl", "summary.json", "report.html", "load_report.json",
           "lr_finder.json", "lr_finder.png", "classes.json", "confusion_matrix.png", "eval_predictions.csv",
           "misclassified.csv", "final", "best", "checkpoints", "tb", "tokenizer"}


def check_not_managed(path: str | Path, flag: str = "--output") -> None:
    """Refuse an output path that would replace a file a run folder owns (its log, config, weights...)."""
    target = Path(path).resolve()
    for parent in [target.parent, *target.parent.parents]:
        if is_run_folder(parent):
            first = target.relative_to(parent).parts[0]
            if first in MANAGED:
                raise ConfigError(f"{flag} {path}: {parent / first} belongs to the run in {parent}; "
                                  "write elsewhere (e.g. a new file beside the run folder)")
            return
