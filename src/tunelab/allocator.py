"""mimalloc for CPU training on Linux: the `tunelab` CLI re-executes itself with it preloaded.

Why: PyTorch's CPU tensors come from the C library's malloc. On glibc (2.36 measured), a training step that
frees and reallocates activations of similar sizes leaves the heap full of free holes it does not reuse
or give back: LoRA SFT of SmolLM2-135M held ~300 MB of live allocations while its RSS peaked near 3.8 GB.
With mimalloc preloaded the same run peaked at 1.7 GB, at the same speed (`bench/sft.py`, docs/benchmarks.md).
glibc's own knobs cost speed instead (a fixed MALLOC_MMAP_THRESHOLD_: 34-40% slower; malloc_trim per
decoder layer: 13% slower).

mimalloc's purge delay is raised from 10 ms to 10 s (`MIMALLOC_PURGE_DELAY=10000`, unless set): with the
default, the ~47 MB gradient of BERT's word embeddings, freed and allocated again every step, went back to
the OS in between, and zero-filling it again cost 40-50 ms of page faults per step (~15% of a MiniLM step
at 16 tokens; 1-2 ms with the longer delay). Memory free for more than 10 s is still returned.

The library comes from the `cmeel-mimalloc` wheel (a core dependency on Linux; ~0.5 MB). Preloading
has to happen before the interpreter starts, so `tunelab train | lr-find | eval | quickstart` re-execute
the same command line once with LD_PRELOAD set. `TUNELAB_MALLOC=system` keeps glibc's malloc. From Python,
start the interpreter as `LD_PRELOAD=$(python -m tunelab.allocator) python script.py` to get the same.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

ENV = "TUNELAB_MALLOC"  # "mimalloc" (default) or "system"
PURGE_DELAY_MS = "10000"  # see the module docstring
_NAMES = ("libmimalloc.so.3", "libmimalloc.so.2", "libmimalloc.so")


def library() -> str | None:
    """Path of the packaged libmimalloc, or None (not Linux, or the wheel is not installed)."""
    if not sys.platform.startswith("linux"):
        return None
    for entry in sys.path:
        lib = Path(entry or ".") / "cmeel.prefix" / "lib"
        for name in _NAMES:
            if (lib / name).is_file():
                return str(lib / name)
    return None


def preload_env(env: dict[str, str] | None = None) -> dict[str, str] | None:
    """`env` (default: os.environ) with mimalloc added to LD_PRELOAD; None when it does not apply
    (switched off with TUNELAB_MALLOC=system, not available, or already preloaded)."""
    env = dict(os.environ if env is None else env)
    if env.get(ENV, "mimalloc").lower() in ("system", "glibc", "0", "off", "false"):
        return None
    lib = library()
    if lib is None:
        return None
    preload = env.get("LD_PRELOAD", "")
    if "mimalloc" in preload:
        return None
    env["LD_PRELOAD"] = f"{lib}:{preload}" if preload else lib
    env.setdefault("MIMALLOC_PURGE_DELAY", PURGE_DELAY_MS)
    return env


def active() -> str:
    """The malloc this process runs on: "mimalloc" when it is mapped in, else "system"."""
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return "system"
    return "mimalloc" if "libmimalloc" in maps else "system"


def reexec_with_mimalloc() -> None:
    """Replace this process by the same command line with mimalloc preloaded (no-op when it does not apply).
    Only call it before any work has started: the process image, and everything in it, is replaced."""
    env = preload_env()
    if env is None or active() == "mimalloc":
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, list(sys.orig_argv), env)


if __name__ == "__main__":  # `MIMALLOC_PURGE_DELAY=10000 LD_PRELOAD=$(python -m tunelab.allocator) python train.py`
    print(library() or "")
