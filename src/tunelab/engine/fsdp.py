"""Sharded training with PyTorch's FSDP2 (`torch.distributed.fsdp.fully_shard`), as torchtitan does it.

`train.distributed.strategy: fsdp` under torchrun shards each transformer block and then the root over a
device mesh (1-D, or 2-D for HSDP: replicate across `replicas` groups, shard inside each), with bf16
parameters and fp32 gradient reduction when `train.precision` is bf16, optional CPU offload, and
`torch.compile` per block before sharding. A model built on the meta device (`build_on_meta`) is
materialised after sharding and gets its weights shard by shard (`load_shards`): each rank reads only its
rows of each tensor from the safetensors files, so no rank ever holds the whole model.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from tunelab.config import DistributedSection
from tunelab.engine.distributed import DistInfo
from tunelab.errors import ConfigError


def device_mesh(dist: DistInfo, cfg: DistributedSection, device: torch.device) -> Any:
    """The mesh FSDP shards over: all ranks, or (replicas, world / replicas) for HSDP."""
    from torch.distributed.device_mesh import init_device_mesh

    if dist.world_size % cfg.replicas:
        raise ConfigError(f"`train.distributed.replicas` = {cfg.replicas} does not divide the {dist.world_size} "
                          "ranks; use a divisor (e.g. the number of nodes)")
    if cfg.replicas == 1:
        return init_device_mesh(device.type, (dist.world_size,), mesh_dim_names=("shard",))
    return init_device_mesh(device.type, (cfg.replicas, dist.world_size // cfg.replicas),
                            mesh_dim_names=("replicate", "shard"))


def transformer_blocks(model: nn.Module) -> list[nn.Module]:
    """The repeated blocks to shard one by one: the longest ModuleList whose items share one class (the
    native GPT's `blocks`, a Hugging Face decoder's `layers`, a BERT encoder's `layer`), through peft
    wrappers too. Empty when the model has none (it is then sharded as one unit)."""
    best: list[nn.Module] = []
    for module in model.modules():
        if isinstance(module, nn.ModuleList) and len(module) > len(best) and len(module) >= 2:
            if len({type(m) for m in module}) == 1:
                best = list(module)
    return best


def is_sharded(model: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def shard(model: nn.Module, mesh: Any, cfg: DistributedSection, autocast_dtype: torch.dtype | None,
          compile_blocks: bool = False) -> nn.Module:
    """fully_shard each transformer block, then the root (in place; returns the model)."""
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard

    kw: dict[str, Any] = {"mesh": mesh, "reshard_after_forward": cfg.reshard_after_forward}
    if autocast_dtype == torch.bfloat16:
        kw["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    if cfg.cpu_offload:
        kw["offload_policy"] = CPUOffloadPolicy()
    if not all(p.is_contiguous() for p in model.parameters()):  # channels_last CNN weights: FSDP2 needs
        model.to(memory_format=torch.contiguous_format)  # contiguous ones (the inputs may stay NHWC)
    for block in transformer_blocks(model):
        if compile_blocks:
            block.compile()
        fully_shard(block, **kw)
    fully_shard(model, **kw)
    return model


@contextlib.contextmanager
def gradient_sync(model: nn.Module, sync: bool) -> Iterator[None]:
    """FSDP's `no_sync`: reduce-scatter gradients only on the accumulation window's last backward."""
    model.set_requires_gradient_sync(sync)
    yield


def local_bytes(model: nn.Module) -> int:
    """Bytes of parameters this rank holds (its shards)."""
    total = 0
    for p in model.parameters():
        local = p.to_local() if hasattr(p, "to_local") else p
        total += local.numel() * local.element_size()
    return total


# -- building on the meta device, then loading shard by shard ------------------------------------------------


def materialize(model: nn.Module, device: torch.device) -> None:
    """Give a sharded meta-device model real (uninitialised) storage, then recompute what is not loaded:
    parameters by the model's own init, and non-persistent buffers (rotary tables) that were meta."""
    model.to_empty(device=device)
    with torch.no_grad():
        if hasattr(model, "reset_parameters"):
            model.reset_parameters()
        for module in model.modules():
            if hasattr(module, "tunelab_init_buffers"):
                module.tunelab_init_buffers()
            elif getattr(module, "_non_persistent_buffers_set", None) and hasattr(module, "config"):
                fresh = type(module)(config=module.config)  # e.g. a Hugging Face rotary embedding
                for name in module._non_persistent_buffers_set:
                    getattr(module, name).copy_(getattr(fresh, name))


def _slices(param: torch.Tensor) -> tuple[tuple[slice, ...], torch.Tensor]:
    """The global index ranges of this rank's shard of `param`, and that shard's local tensor."""
    if not hasattr(param, "to_local"):
        return tuple(slice(0, n) for n in param.shape), param
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    shape, offset = compute_local_shape_and_global_offset(param.shape, param.device_mesh, param.placements)
    return tuple(slice(o, o + n) for o, n in zip(offset, shape)), param.to_local()


def load_shards(model: nn.Module, files: list[Path], names: dict[str, tuple[Path, str]]) -> None:
    """Copy into each of this rank's shards the rows it owns, read as slices from safetensors `files`
    (`names`: model key -> (file, key in the file)). Nothing else of a tensor is read."""
    from safetensors import safe_open

    handles = {f: safe_open(str(f), framework="pt") for f in files}
    state = model.state_dict(keep_vars=True)
    with torch.no_grad():
        for key, (file, source_key) in names.items():
            index, local = _slices(state[key])
            if local.numel() == 0:
                continue
            piece = handles[file].get_slice(source_key)[index] if index else handles[file].get_tensor(source_key)
            local.copy_(piece.to(local.dtype))


def param_bytes_full(model: nn.Module) -> int:
    """Bytes of the whole (unsharded) model's parameters."""
    return sum(math.prod(p.shape) * p.element_size() for p in model.parameters())


def load_pretrained_shards(model: nn.Module, path: str | Path, *, allow_missing: Any = (),
                           rename: dict[str, str] | None = None, strict: bool = True) -> Any:
    """`load_pretrained` for a sharded model: the same key accounting (LoadReport, strictness), from the
    safetensors headers, then each rank reads only its own rows (`load_shards`)."""
    from safetensors import safe_open

    from tunelab.io import verify_beside_manifest
    from tunelab.weights import checkpoint_files, match_checkpoint

    files = checkpoint_files(path)
    found: dict[str, tuple[int, ...]] = {}
    where: dict[str, Path] = {}
    for f in files:
        verify_beside_manifest(f)
        with safe_open(str(f), framework="pt") as h:
            for key in h.keys():
                found[key], where[key] = tuple(h.get_slice(key).get_shape()), f
    state = model.state_dict(keep_vars=True)
    own = {k: tuple(v.shape) for k, v in state.items()}
    # Tied tensors (a Llama's lm_head and embeddings) are one tensor under two names; a checkpoint stores one.
    twins: dict[int, list[str]] = {}
    for k, v in state.items():
        twins.setdefault(id(v), []).append(k)
    tied = {k: names for names in twins.values() if len(names) > 1 for k in names}
    with_twins = {k: v for k, v in found.items()}
    for key in list(found):
        for twin in tied.get(key, []):
            with_twins.setdefault(twin, found[key])
            where.setdefault(twin, where[key])
    report, fills = match_checkpoint(own, with_twins, str(path), allow_missing=allow_missing, rename=rename,
                                     strict=strict)
    load_shards(model, files, {k: (where[src], src if src in found else next(t for t in tied[src] if t in found))
                               for k, src in fills.items()})
    return report
