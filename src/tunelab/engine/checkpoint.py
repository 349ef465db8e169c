"""Atomic, verified checkpoints with the full training state, for exact resume.

`save_checkpoint(trainer)` and `resume_newest(trainer)` are what the loop calls; `CheckpointManager` keeps
the `step-N` folders.

Layout: `checkpoints/step-<N>/` holding model.safetensors, optimizer.pt, trainer_state.pt and
manifest.json (sha256 of every file). A checkpoint is written into a temporary folder, each file fsynced,
the manifest written last, then the folder renamed into place: a crash leaves either the old set or the
new one, never a half-written `step-N`. On load the manifest is checked; a truncated or tampered
checkpoint is refused and resume falls back to the previous good one.
"""

from __future__ import annotations

import json
import random
import shutil
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tunelab.errors import CheckpointError, DataError, TunelabError
from tunelab.io import verify_folder, write_dir_atomically
from tunelab.weights import load_exact_state_dict, load_state_dict_file, save_state_dict


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
    def local(v: torch.Tensor) -> torch.Tensor:
        return v.to_local() if hasattr(v, "to_local") else v  # a rank's shard of a DTensor

    return [k for k, v in tensors.items() if v.is_floating_point() and not bool(torch.isfinite(local(v)).all())]


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
        self.prune()
        return final

    def prune(self) -> None:
        for old in self.steps()[: -self.keep_last]:
            shutil.rmtree(self.path(old), ignore_errors=True)

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


# -- the training state of a run ---------------------------------------------------------------------------
# Two formats. A single process or DDP writes `model.safetensors` + `optimizer.pt` from rank 0 ("full"). FSDP
# writes with torch.distributed.checkpoint ("dcp"): every rank its shards in parallel, rank 0 the training
# state and the manifest, then renames the folder into place. Either loads into either engine and any number
# of ranks: DCP reshards, a full checkpoint is sharded as it loads. The sampler's position is kept in global
# samples, so a resume on another number of ranks neither skips nor repeats an example.


def training_state(trainer: Any) -> dict[str, Any]:
    """Everything besides weights and optimizer that an exact resume needs (weights-only loadable)."""
    return {
        "global_step": trainer.global_step,
        "epoch": trainer.epoch,
        "batch_in_epoch": trainer.batch_in_epoch,
        "samples_in_epoch": trainer.batch_in_epoch * trainer.dist.world_size * trainer.train_cfg.batch_size,
        "scheduler": trainer.scheduler.state_dict(),
        "scaler": trainer.step.scaler.state_dict() if trainer.step.scaler is not None else None,
        "rng": rng_state(),
        "best": json.dumps(trainer.best),
        "last_eval": json.dumps(trainer.last_eval, default=float),
        "window": trainer.meter.window,
        "callbacks": [cb.state_dict() for cb in trainer.callbacks],
        "trainable_only": trainer.strategy.checkpoint_trainable_only,
        "data": json.dumps(trainer.data_fingerprint),
        "format": "dcp" if trainer.sharded else "full",
        "world_size": trainer.dist.world_size,
    }


def _frozen(model: torch.nn.Module) -> set[str]:
    return {n for n, p in model.named_parameters(remove_duplicate=False) if not p.requires_grad}


def save_checkpoint(trainer: Any, manager: CheckpointManager) -> Path:
    """Write `step-N/`: the weights (only the trainable ones and buffers for LoRA-style strategies, whose
    frozen base is rebuilt from its source on resume), the optimizer and the training state."""
    if trainer.sharded:
        return _save_sharded(trainer, manager)
    model = trainer.raw_model
    frozen = _frozen(model) if trainer.strategy.checkpoint_trainable_only else set()
    state = {k: v.detach().cpu() for k, v in model.state_dict().items() if k not in frozen}
    return manager.save(trainer.global_step, {
        "model.safetensors": lambda p: save_state_dict(state, p),
        "optimizer.pt": torch_save(trainer.optimizer.state_dict()),
        "trainer_state.pt": torch_save(training_state(trainer)),
    })


def _dcp_state(trainer: Any) -> dict[str, Any]:
    """The model's and optimizer's state dicts keyed by parameter name (sharded under FSDP, whole otherwise)."""
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_sd, optim_sd = get_state_dict(trainer.raw_model, trainer.optimizer)
    if trainer.strategy.checkpoint_trainable_only:
        frozen = _frozen(trainer.raw_model)
        model_sd = {k: v for k, v in model_sd.items() if k not in frozen}
    return {"model": model_sd, "optimizer": optim_sd}


def _save_sharded(trainer: Any, manager: CheckpointManager) -> Path:
    import torch.distributed.checkpoint as dcp

    from tunelab.engine.distributed import barrier
    from tunelab.io import fsync_dir, replace_dir, write_manifest

    final = manager.path(trainer.global_step)
    tmp = final.with_name(f".tmp-{final.name}-dcp")  # one name every rank agrees on (the run folder is locked)
    if trainer.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    barrier()
    dcp.save(_dcp_state(trainer), checkpoint_id=str(tmp))
    barrier()
    if trainer.is_main:
        torch.save(training_state(trainer), tmp / "trainer_state.pt")
        write_manifest(tmp)
        fsync_dir(tmp)
        replace_dir(tmp, final)  # visible only when every rank's shards are in
        manager.prune()
    barrier()
    return final


def resume_newest(trainer: Any, manager: CheckpointManager) -> Path:
    """Restore the newest checkpoint that verifies and loads; a damaged one (truncated, tampered, a
    pickle that is not weights-only) is reported and an older one is tried."""
    for path in manager.candidates():
        try:
            verify_folder(path)
            state = torch_load(path / "trainer_state.pt")
            if not isinstance(state, dict) or "global_step" not in state:
                raise CheckpointError(f"{path / 'trainer_state.pt'}: not a tunelab training state")
            files = None
            if state.get("format", "full") == "full":
                files = (load_state_dict_file(path / "model.safetensors", verified=True),
                         torch_load(path / "optimizer.pt"))
        except CheckpointError as e:
            print(f"warning: checkpoint {path.name} refused: {e}; falling back to an older one", file=sys.stderr)
            continue
        _restore(trainer, path, state, files)
        return path
    raise TunelabError(
        f"{trainer.output_dir}: no valid checkpoint to resume from (checkpoints are written every "
        "train.checkpoint_every steps, else at each epoch end, and at the end of the run; this run stopped "
        "before its first one, its checkpoints are damaged, or it had train.checkpoints=false); "
        "start it afresh with --overwrite"
    )


def _check_data(trainer: Any, saved: dict[str, Any] | None) -> None:
    """Refuse to resume on data that changed since the checkpoint (or note it with allow_data_change)."""
    from tunelab.data.base import fingerprint_changes

    changes = fingerprint_changes(saved or {}, trainer.data_fingerprint)
    if not changes:
        return
    if not trainer.allow_data_change:
        raise DataError(f"{changes[0]}; resume on the data the run started with, or pass --allow-data-change "
                        "to continue on the new data")
    print("warning: resuming on changed data: " + "; ".join(changes), file=sys.stderr)
    trainer.log_on_resume = {**trainer.log_on_resume, "data_changed": changes}


def _load_full(trainer: Any, weights: dict[str, torch.Tensor], optim_state: dict[str, Any],
               trainable_only: bool, path: Path) -> list[set[str]]:
    """A rank-0 checkpoint into this run's model (sharded as it loads under FSDP); returns the saved
    optimizer's parameter-group keys."""
    model, optimizer = trainer.raw_model, trainer.optimizer
    saved_keys = [set(g) - {"params"} for g in optim_state.get("param_groups", [])]
    if trainer.sharded:
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            set_model_state_dict,
            set_optimizer_state_dict,
        )

        options = StateDictOptions(full_state_dict=True, strict=not trainable_only)
        set_model_state_dict(model, weights, options=options)
        if any(isinstance(v, torch.Tensor) for st in optim_state.get("state", {}).values() for v in st.values()):
            set_optimizer_state_dict(model, optimizer, _by_name(optimizer, model, optim_state), options=options)
        return saved_keys  # (a stateless optimizer, plain SGD, has nothing to load)
    if trainable_only:  # frozen base weights come from the pretrained source the run was rebuilt from
        missing, unexpected = model.load_state_dict(weights, strict=False)
        bad = sorted(set(missing) - _frozen(model)) + sorted(unexpected)
        if bad:
            raise TunelabError(f"{path}: the checkpoint does not fit this model (e.g. {bad[0]!r}); was the run's "
                               "model or strategy changed since it was saved?")
    else:
        load_exact_state_dict(model, weights, path, "was the run's model changed since it was saved? "
                              "resume with the run's own model settings")
    if len(saved_keys) == len(optimizer.param_groups) and all(
            k == set(g) - {"params"} for k, g in zip(saved_keys, optimizer.param_groups)):
        optimizer.load_state_dict(optim_state)
    return saved_keys


def _by_name(optimizer: torch.optim.Optimizer, model: torch.nn.Module, state: dict[str, Any]) -> dict[str, Any]:
    """torch's index-keyed optimizer state dict re-keyed by parameter name (what FSDP's loader takes); the
    indices count the parameters of the groups in order, as this run's optimizer holds the same ones."""
    names = {id(p): n for n, p in model.named_parameters()}
    order = [names[id(p)] for g in optimizer.param_groups for p in g["params"]]
    groups = [{**g, "params": [order[i] for i in g["params"]]} for g in state["param_groups"]]
    return {"state": {order[i]: v for i, v in state["state"].items()}, "param_groups": groups}


def _load_dcp(trainer: Any, path: Path, trainable_only: bool) -> list[set[str]]:
    """A sharded checkpoint into this run's model, whatever its number of ranks (DCP reshards)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

    target = _dcp_state(trainer)
    dcp.load(target, checkpoint_id=str(path))
    set_state_dict(trainer.raw_model, trainer.optimizer, model_state_dict=target["model"],
                   optim_state_dict=target["optimizer"], options=StateDictOptions(strict=not trainable_only))
    return [set(g) - {"params"} for g in target["optimizer"].get("param_groups", [])]


def _restore(trainer: Any, path: Path, state: dict[str, Any], files: tuple[Any, Any] | None) -> None:
    _check_data(trainer, json.loads(state["data"]) if "data" in state else None)
    # The optimizer's settings (lr, weight decay, betas, momentum) are this run's, not the checkpoint's: a
    # resume with optim.lr=X trains at X (the changed setting is logged), never only reports it.
    optimizer, scheduler = trainer.optimizer, trainer.scheduler
    fresh = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
    trainable_only = bool(state.get("trainable_only"))
    saved_keys = (_load_full(trainer, *files, trainable_only, path) if files is not None
                  else _load_dcp(trainer, path, trainable_only))
    if len(saved_keys) != len(fresh) or any(k != set(f) for k, f in zip(saved_keys, fresh)):
        raise TunelabError(f"{path}: the checkpoint's optimizer does not fit this run's (optim.name, "
                           "param_groups or the strategy changed); resume with the run's own settings")
    for group, settings in zip(optimizer.param_groups, fresh):
        group.update(settings)
    scheduler.load_state_dict(state["scheduler"])
    scheduler.base_lrs = [g["initial_lr"] for g in fresh]
    # The next step's learning rate on this run's schedule (also when --resume extends max_steps).
    for group, base, fn in zip(optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas):
        group["lr"] = base * fn(scheduler.last_epoch)
    scheduler._last_lr = [g["lr"] for g in optimizer.param_groups]
    if trainer.step.scaler is not None and state["scaler"]:
        trainer.step.scaler.load_state_dict(state["scaler"])
    trainer.global_step, trainer.epoch = state["global_step"], state["epoch"]
    trainer.batch_in_epoch = _batch_position(trainer, state, path)
    trainer.best = json.loads(state["best"])
    trainer.last_eval = json.loads(state.get("last_eval", "null"))
    trainer.meter.window = state["window"]
    for cb, cb_state in zip(trainer.callbacks, state["callbacks"]):
        cb.load_state_dict(cb_state)
    set_rng_state(state["rng"])


def _batch_position(trainer: Any, state: dict[str, Any], path: Path) -> int:
    """This rank's micro-batches into the epoch, from the global samples the checkpoint had consumed."""
    samples = state.get("samples_in_epoch")
    if samples is None:
        return state["batch_in_epoch"]
    per_batch = trainer.dist.world_size * trainer.train_cfg.batch_size
    if samples % per_batch:
        raise TunelabError(
            f"{path}: the run stopped {samples} examples into epoch {state['epoch']}, which is not a whole number "
            f"of global batches of {per_batch} (train.batch_size x ranks); resume with a global batch that divides "
            f"it (it was {state.get('world_size', 1)} ranks x the run's batch_size)")
    return samples // per_batch
