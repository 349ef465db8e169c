"""Selective activation checkpointing: keep what is expensive to recompute, recompute what is cheap.

Full checkpointing saves only each block's input and runs the whole block forward again in backward
(~+50% compute for LoRA, whose backward is about one forward). Most of a block's activation memory,
though, is elementwise work: norms, RoPE, dropout copies in front of every LoRA adapter, the SiLU and the
gating product. `selective_checkpoint_kwargs()` keeps the outputs of the large matmuls and of attention
(the FLOPs) and recomputes everything else in backward: roughly a third of the activation memory for a
few per cent more time. Pass it to `torch.utils.checkpoint.checkpoint(..., **kwargs)`.
"""

from __future__ import annotations

import functools
from typing import Any

import torch

from tunelab.models.dropout import checkpoint_inner_context, replaying_masks

_MATMULS = {"mm", "addmm", "bmm", "baddbmm"}
_ATTENTION = {
    "_scaled_dot_product_flash_attention_for_cpu",
    "_scaled_dot_product_flash_attention",
    "_scaled_dot_product_efficient_attention",
    "_scaled_dot_product_cudnn_attention",
    "_flash_attention_forward",
    "_efficient_attention_forward",
}


def _policy(min_inner: int, ctx: Any, op: Any, *args: Any, **kwargs: Any):
    from torch.utils.checkpoint import CheckpointPolicy

    name = op.overloadpacket.__name__ if hasattr(op, "overloadpacket") else str(op)
    if name in _ATTENTION:
        return CheckpointPolicy.MUST_SAVE
    if name in _MATMULS:
        a = args[1] if name in ("addmm", "baddbmm") else args[0]
        # The inner (reduction) size: a low-rank adapter's matmuls (r = 8..64) are cheap to redo.
        if isinstance(a, torch.Tensor) and a.shape[-1] >= min_inner:
            return CheckpointPolicy.MUST_SAVE
    return CheckpointPolicy.PREFER_RECOMPUTE


def plain_checkpoint_kwargs() -> dict[str, Any]:
    """Keyword arguments for `torch.utils.checkpoint.checkpoint` that keep only the input (non-reentrant:
    works with frozen embeddings, e.g. LoRA), and replay a shard thread's dropout masks. Under torch.compile
    (which runs no shard threads) torch's own checkpointing, unchanged."""
    if torch.compiler.is_compiling():
        return {"use_reentrant": False}
    return {"use_reentrant": False, "context_fn": replaying_masks()}


def selective_checkpoint_kwargs(min_inner: int = 128) -> dict[str, Any]:
    """Keyword arguments for `torch.utils.checkpoint.checkpoint` that save matmul and attention outputs."""
    import inspect

    from torch.utils.checkpoint import checkpoint, create_selective_checkpoint_contexts

    policy = functools.partial(_policy, min_inner)
    kwargs: dict[str, Any] = {
        "use_reentrant": False,
        # the recompute replays a shard thread's dropout masks (models/dropout.py)
        "context_fn": replaying_masks(functools.partial(create_selective_checkpoint_contexts, policy)),
    }
    if "respect_saved_tensors_hooks" in inspect.signature(checkpoint).parameters:
        # The outputs the policy keeps stay outside saved-tensor hooks (the plan's probe counts them
        # separately, see insight/plan.py); torch >= 2.14 warns unless this is chosen explicitly.
        kwargs["respect_saved_tensors_hooks"] = False
    return kwargs


def selective_policy(checkpoint_fn: Any) -> Any:
    """The policy inside a checkpoint function built with `selective_checkpoint_kwargs` (e.g. a Hugging Face
    layer's `_gradient_checkpointing_func`), or None for plain checkpointing."""
    context_fn = checkpoint_inner_context(getattr(checkpoint_fn, "keywords", {}).get("context_fn"))
    policy = getattr(context_fn, "args", (None,))[0]  # partial(create_selective_checkpoint_contexts, policy)
    return policy if callable(policy) else None
