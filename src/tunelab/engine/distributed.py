"""torchrun support: process group from the environment, rank-aware helpers."""

from __future__ import annotations

import atexit
import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class DistInfo:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def initialized(self) -> bool:
        return dist.is_available() and dist.is_initialized()


def init_distributed(one_rank: bool = False, timeout_s: float = 1800) -> DistInfo:
    """Initialise the default process group when launched by torchrun (WORLD_SIZE > 1; with `one_rank`, also
    a 1-rank job, which FSDP needs to shard on one GPU)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1 and not (one_rank and "RANK" in os.environ and "MASTER_ADDR" in os.environ):
        return DistInfo()
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(local)
        timeout = datetime.timedelta(seconds=timeout_s)
        store = _attempt_store(timeout)
        if store is None:
            dist.init_process_group(backend, timeout=timeout)
        else:
            dist.init_process_group(backend, store=store, rank=rank, world_size=world, timeout=timeout)
        # Tear the group down before interpreter exit: left to C++ static destruction, the backend's
        # threads can still be joinable and the process aborts ("terminate called without an active
        # exception"), failing the job after training finished.
        atexit.register(_destroy)
    return DistInfo(rank, local, world)


def _attempt_store(timeout: datetime.timedelta) -> dist.Store | None:
    """The store this attempt's process group meets on, with keys of its own.

    torchrun's agent keeps one TCP store for all attempts of a job (`TORCHELASTIC_USE_AGENT_STORE=True`), and
    the ranks' env:// rendezvous adds no per-attempt prefix. The ranks of a restarted attempt (`--max-restarts`)
    could then read the keys the previous attempt's process group left there, among them the dead rank's
    address, and wait in gloo's connectFullMesh forever (seen on this machine under load; the group's
    timeout does not bound that wait). Prefixing the store with the restart count gives every attempt its
    own keys. Without the agent's store (a plain env:// launch) this returns None and init is unchanged."""
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return None
    store, _, _ = next(dist.rendezvous("env://", timeout=timeout))
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    return dist.PrefixStore(f"tunelab/attempt-{attempt}", store)


def _destroy() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def exit_process(code: int) -> int:
    """End a torchrun rank: the ranks leave together (a barrier, when the command succeeded), Python's exit
    handlers run while the interpreter is whole (the group is torn down there), then the process exits
    without C++ static destruction. Left to the interpreter's own finalization, a gloo rank was seen to abort
    ("terminate called without an active exception", SIGABRT) after its training had finished, failing the
    job. Outside a process group this only returns `code`."""
    if not (dist.is_available() and dist.is_initialized()):
        return code
    import sys

    if code == 0:
        try:
            dist.barrier()
        except Exception:  # a peer already gone: nothing to wait for
            pass
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:
            pass
    os._exit(code)


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t)
    return t


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
