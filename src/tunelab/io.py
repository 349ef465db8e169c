"""The file writes a run depends on, in one place: an atomic writer (temporary file beside the target,
fsync of the file and of its folder, rename; the temporary removed on any failure), atomic folders with a
sha256 manifest, and the manifest checks that every reader applies.

Files end with the mode the process's umask gives, as any other tool's output: writers that create a
private temporary file (safetensors, Hugging Face's save_pretrained) would leave 0600 (`follow_umask`).
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
import time
from collections.abc import Callable
from pathlib import Path

from tunelab.errors import CheckpointError, TunelabError

MANIFEST = "manifest.json"
RUN_MARKER = ".tunelab"  # the file that says tunelab made a run folder (engine/rundir.py)
# Every temporary name starts with this, so a killed write's leftovers can be found and removed.
TMP_PREFIX = ".tmp-"


def sha256_file(path: str | os.PathLike) -> str:
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


def tmp_path(final: Path) -> Path:
    """A unique temporary name beside `final` (same filesystem, so the rename is atomic)."""
    return final.with_name(f"{TMP_PREFIX}{final.name}-{os.getpid()}-{time.time_ns()}")


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        try:
            path.unlink()
        except OSError:
            pass


def process_umask() -> int:
    """The process's umask, read from /proc where Linux has it (setting it to read it races with threads)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def follow_umask(path: Path) -> None:
    """Give file `path`, or every file under folder `path`, the mode a plain `open()` gives: 0666 less the
    umask."""
    mode = 0o666 & ~process_umask()
    files = [path] if not path.is_dir() else [p for p in path.rglob("*") if p.is_file() and not p.is_symlink()]
    for f in files:
        os.chmod(f, mode)


def atomic_write(path: str | os.PathLike, write: Callable[[Path], None]) -> None:
    """Create or replace file `path` atomically: `write(tmp)` fills a temporary file beside it, which is
    fsynced and renamed over `path`. Readers see the old file or the new one, never a part."""
    path = Path(path)
    tmp = tmp_path(path)
    try:
        write(tmp)
        follow_umask(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except BaseException as e:
        _remove(tmp)
        # Writers in Rust (safetensors, tokenizers) report a failed write as their own error type with the
        # OS error inside: surface it as the OSError it is, so a full disk reads the same from every writer.
        code = re.search(r"\(os error (\d+)\)", str(e)) if not isinstance(e, OSError) else None
        if code:
            raise OSError(int(code[1]), os.strerror(int(code[1])), str(path)) from e
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write(path, lambda p: p.write_text(text))


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    atomic_write(path, lambda p: p.write_bytes(data))


def replace_dir(tmp: Path, final: Path) -> None:
    """Move folder `tmp` to `final`, replacing an existing `final` without ever leaving neither."""
    old = None
    if final.exists():
        old = tmp_path(final.with_name(f"{final.name}.old"))
        os.replace(final, old)
    os.replace(tmp, final)
    fsync_dir(final.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def write_manifest(folder: Path) -> None:
    """`manifest.json`: the sha256 of every file under `folder` (each fsynced first)."""
    digests = {}
    for f in sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST):
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
        digests[str(f.relative_to(folder))] = sha256_file(f)
    atomic_write_text(folder / MANIFEST, json.dumps({"files": digests, "created": time.time()}, indent=1))


def write_dir_atomically(final: Path, fill: Callable[[Path], None], manifest: bool = True) -> None:
    """Create folder `final` by letting `fill(tmp_dir)` write into a temporary folder, then add a sha256
    manifest of every file, fsync, and rename into place (replacing an older `final`)."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = tmp_path(final)
    tmp.mkdir()
    try:
        fill(tmp)
        follow_umask(tmp)
        if manifest:
            write_manifest(tmp)
        fsync_dir(tmp)
        replace_dir(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def remove_stale_tmp(folder: Path) -> list[Path]:
    """Delete the temporary files and folders that killed writes left in `folder`; returns them. Call it
    only where no other process writes (a run folder under its lock, a cache entry being rebuilt)."""
    removed = []
    if folder.is_dir():
        for p in folder.iterdir():
            if p.name.startswith(TMP_PREFIX):
                _remove(p)
                removed.append(p)
    return removed


def _manifest_files(folder: Path) -> dict[str, str]:
    manifest = folder / MANIFEST
    try:
        files = json.loads(manifest.read_text())["files"]
        if not isinstance(files, dict):
            raise TypeError
        return files
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{manifest}: unreadable manifest") from e


def manifest_expected(folder: Path) -> bool:
    """Whether tunelab wrote `folder` with a manifest: a run's final/ or best/ (the run folder above it
    carries tunelab's marker; every such folder is written with a manifest)."""
    return folder.name in ("final", "best") and (folder.parent / RUN_MARKER).is_file()


def verify_if_manifested(folder: Path) -> bool:
    """Check `folder` against its manifest when it has one (hand-made folders have none) and refuse a run's
    final/ or best/ whose manifest was removed. Returns whether the folder was verified."""
    if (folder / MANIFEST).is_file():
        verify_folder(folder)
        return True
    if manifest_expected(folder):
        raise CheckpointError(
            f"{folder}: {MANIFEST} is missing, but tunelab writes one into every run's final/ and best/: the "
            "folder was changed after tunelab wrote it; use an intact copy (or copy the files to a folder "
            "outside the run to load them unverified)")
    return False


def verify_folder(folder: Path) -> None:
    """Raise CheckpointError when the manifest is missing or any file is missing or altered."""
    if not (folder / MANIFEST).is_file():
        raise CheckpointError(f"{folder}: no {MANIFEST} (incomplete checkpoint)")
    for name, digest in _manifest_files(folder).items():
        path = folder / name
        if not path.is_file():
            raise CheckpointError(f"{folder}: file {name} listed in the manifest is missing")
        if sha256_file(path) != digest:
            raise CheckpointError(f"{path}: sha256 does not match the manifest (truncated or tampered)")


def verify_beside_manifest(path: Path) -> bool:
    """When a tunelab manifest sits beside file `path` (a run's final/, best/ or checkpoint), check the file
    against it: a tampered or unlisted file is refused. Returns whether a manifest was there."""
    folder = path.parent
    if not (folder / MANIFEST).is_file():
        return verify_if_manifested(folder)  # refuses a run's final/ or best/ that lost its manifest
    files = _manifest_files(folder)
    name = path.name
    if name not in files:
        raise CheckpointError(f"{path}: not listed in {folder / MANIFEST}; the folder was changed after "
                              "tunelab wrote it")
    if sha256_file(path) != files[name]:
        raise CheckpointError(f"{path}: sha256 does not match {folder / MANIFEST} (truncated or tampered); "
                              "use an intact copy")
    return True


# -- errors from the filesystem ------------------------------------------------------------------------------

_DISK_ERRORS = {
    errno.ENOSPC: "the disk is full",
    errno.EDQUOT: "the disk quota is exceeded",
    errno.EFBIG: "the file is larger than this system allows",
    errno.EROFS: "the filesystem is read-only",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
}


def disk_error(e: OSError) -> TunelabError | None:
    """A one-line error for an OSError the user must fix on their side (disk full, read-only or
    permission-denied folder), or None for other errors."""
    why = _DISK_ERRORS.get(e.errno)
    if why is None:
        return None
    where = e.filename or "a file"
    return TunelabError(f"{where}: {why} ({e.strerror}); free space or choose a writable output.dir=...")
