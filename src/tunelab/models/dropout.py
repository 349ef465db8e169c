"""Dropout whose random mask is cheap on a CPU.

torch's CPU dropout draws its mask with `bernoulli_`, which on CPUs where it does not use MKL's vector
generator (AMD's, for one) draws one element at a time from a serial Mersenne twister: on this project's
machine (AMD EPYC, 2 cores) a dropout over 32 x 24 x 384 activations took 1.86 ms against 32 us for a
multiply of the same tensor, and `scaled_dot_product_attention` with `dropout_p=0.1` took 4x as long as
without (docs/textcls.md, "Dropout on CPU"). BERT's dropouts and the one in front of every LoRA adapter
make that a large share of a CPU training step.

`dropout(x, p)` keeps each element with probability 1 - p and scales it by 1 / (1 - p), as `F.dropout`
does. The mask comes from 32-bit uniforms of NumPy's SFC64 generator, vectorised, seeded by one draw from
torch's default CPU generator: runs stay reproducible under `train.seed`, exact resume (the checkpoint
keeps torch's RNG state) and activation checkpointing (which restores torch's RNG state before it
recomputes) replay the same masks. The keep probability is p rounded to a multiple of 2^-32. The mask is
saved for backward as one byte per element, as torch's own dropout saves it. The multiplies take a {0, 1}
mask that NumPy casts from the bool one: torch's bool-to-float cast (and so `x * bool_mask`) took
137-169 us on a 32 x 16 x 384 tensor, against 15-33 us for a float multiply and 43 us for NumPy's cast
(measured 2026-12-04); outputs and gradients are bit-identical to `x * keep * scale` in every dtype.
Tensors on other devices and `torch.compile`d code take torch's own dropout.

`use_fast_dropout(model)` swaps every `nn.Dropout` of a model for `Dropout` (a subclass, so code that
checks `isinstance(m, nn.Dropout)` still sees one) and routes the attention-probability dropout of
Hugging Face models that use `sdpa` through the same mask.

Shard threads (`train.batch_threads`) run several forwards at once. torch's default generator is one for
the process, so masks drawn from it would depend on which thread draws first, and an activation checkpoint
(which restores that generator before it recomputes) would replay another thread's masks in backward:
wrong gradients. So each shard thread draws its masks from its own generator (`mask_generator(seed)`, the
seeds drawn in shard order by the calling thread), and checkpoints made with `replaying_masks()` as their
`context_fn` put that generator back before they recompute, as torch does for its own. A mask drawn in a
shard thread inside autograd's backward and outside such a replay can only come from a checkpoint that does
not replay (a model's own `torch.utils.checkpoint` call): it is refused (ConfigError) rather than drawn.
"""

from __future__ import annotations

import contextlib
import functools
import threading
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from tunelab.errors import ConfigError

MARK = "tunelab_fast_dropout"  # set on attention modules whose sdpa call takes the fast path
_local = threading.local()  # .generator: this thread's mask generator while it runs a batch shard;
# .replaying: True while a checkpoint made with `replaying_masks` recomputes


@contextlib.contextmanager
def mask_generator(seed: int) -> Iterator[torch.Generator]:
    """While active, this thread's fast-dropout masks come from its own generator seeded with `seed` instead
    of torch's default generator (which all threads share)."""
    before = getattr(_local, "generator", None)
    _local.generator = torch.Generator().manual_seed(seed)
    try:
        yield _local.generator
    finally:
        _local.generator = before


@contextlib.contextmanager
def _replay(generator: torch.Generator, state: torch.Tensor) -> Iterator[None]:
    """`generator` as this thread's mask generator, at `state`, for the block; both put back afterwards."""
    before, now, replaying = getattr(_local, "generator", None), generator.get_state(), _replaying()
    _local.generator, _local.replaying = generator, True
    generator.set_state(state)
    try:
        yield
    finally:
        generator.set_state(now)
        _local.generator, _local.replaying = before, replaying


def _replaying() -> bool:
    """Whether this thread is recomputing under a `replaying_masks` checkpoint right now."""
    return getattr(_local, "replaying", False)


def _in_backward() -> bool:
    """Whether this thread is inside autograd's backward, where a forward runs only to recompute an activation
    checkpoint (torch's own graph-task id; -1 outside backward)."""
    graph_task = getattr(torch._C, "_current_graph_task_id", None)
    return graph_task is not None and graph_task() != -1


@contextlib.contextmanager
def _both(first: Any, second: Any) -> Iterator[None]:
    with first, second:
        yield


def _replaying_contexts(inner: Callable[[], tuple[Any, Any]] | None) -> tuple[Any, Any]:
    forward, recompute = inner() if inner is not None else (contextlib.nullcontext(), contextlib.nullcontext())
    generator = getattr(_local, "generator", None)
    if generator is None:  # masks from torch's default generator, which the checkpoint restores itself
        return forward, recompute
    return forward, _both(recompute, _replay(generator, generator.get_state()))


def replaying_masks(inner: Callable[[], tuple[Any, Any]] | None = None) -> Callable[[], tuple[Any, Any]]:
    """A `context_fn` for `torch.utils.checkpoint.checkpoint(..., use_reentrant=False)`: the recompute draws
    the same masks as the forward did in a shard thread (see the module docstring). `inner`: another
    context_fn to combine with (selective checkpointing's)."""
    return functools.partial(_replaying_contexts, inner)


def _made_by_replaying_masks(context_fn: Any) -> bool:
    """Whether a checkpoint's `context_fn` is one `replaying_masks` made."""
    return isinstance(context_fn, functools.partial) and context_fn.func is _replaying_contexts


def checkpoint_inner_context(context_fn: Any) -> Any:
    """The context_fn `replaying_masks` wraps, or `context_fn` itself when it is not one."""
    return context_fn.args[0] if _made_by_replaying_masks(context_fn) else context_fn


def replays_masks(checkpoint_fn: Any) -> bool:
    """Whether a checkpoint function (a Hugging Face layer's `_gradient_checkpointing_func`) was made with
    `replaying_masks`."""
    return _made_by_replaying_masks(getattr(checkpoint_fn, "keywords", {}).get("context_fn"))


def _keep_mask(shape: torch.Size, p: float) -> tuple[torch.Tensor, float]:
    """A bool mask (True = keep) with P(keep) = 1 - p, and the scale 1 / P(keep)."""
    n = int(np.prod(shape))
    threshold = min(int(round(p * 2**32)), 2**32 - 1)  # uniform u32 >= threshold: keep
    generator = getattr(_local, "generator", None)
    if generator is not None and not _replaying() and _in_backward():
        # a checkpoint not made with `replaying_masks` recomputes in a shard thread: it would draw other masks
        # than its forward did, and the gradient would be that of other masks
        raise ConfigError(
            "`train.batch_threads` > 1: the model recomputes a dropout in backward (activation checkpointing) "
            "without replaying the shard's masks; pass context_fn=tunelab.models.dropout.replaying_masks() to "
            "torch.utils.checkpoint.checkpoint(..., use_reentrant=False), or set train.batch_threads=1")
    seed = int(torch.randint(0, 2**63 - 1, (), dtype=torch.int64, generator=generator))
    raw = np.random.SFC64(seed).random_raw((n + 1) // 2).view(np.uint32)[:n]
    keep = torch.from_numpy(raw >= np.uint32(threshold)).view(shape)
    return keep, 2**32 / (2**32 - threshold)


def _masked_scale(x: torch.Tensor, keep: torch.Tensor, scale: float) -> torch.Tensor:
    """`x * keep * scale`, with the bool mask cast to {0, 1} by NumPy (see the module docstring). The scale
    stays a separate multiply: folded into the mask it would be rounded to x's dtype (bf16: 1/0.9 -> 1.109)."""
    mask = torch.from_numpy(keep.numpy().astype(np.float32))
    return (x * mask.to(x.dtype)).mul_(scale)


class _MaskedScale(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, keep: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.save_for_backward(keep)
        ctx.scale = scale
        return _masked_scale(x, keep, scale)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        (keep,) = ctx.saved_tensors
        return _masked_scale(grad, keep, ctx.scale), None, None


def _fast_path(x: torch.Tensor, p: float) -> bool:
    return x.device.type == "cpu" and 0.0 < p < 1.0 and not torch.compiler.is_compiling()


def dropout(x: torch.Tensor, p: float, training: bool = True) -> torch.Tensor:
    """`F.dropout(x, p, training)` with a cheap mask on CPU (see the module docstring)."""
    if not training or p == 0.0:
        return x
    if not _fast_path(x, p):
        return F.dropout(x, p, training)
    keep, scale = _keep_mask(x.shape, p)
    return _MaskedScale.apply(x, keep, scale)


class Dropout(nn.Dropout):
    """`nn.Dropout` with `dropout`'s cheap CPU mask; the same `p` and `inplace` attributes."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.inplace or not _fast_path(x, self.p):
            return F.dropout(x, self.p, self.training, self.inplace)
        return dropout(x, self.p, self.training)


def use_fast_dropout(model: nn.Module) -> int:
    """Swap the model's `nn.Dropout` modules (exactly that class, p > 0) for `Dropout`, and mark its
    attention modules for the sdpa path below. Returns how many modules were swapped."""
    swapped = 0
    for parent in list(model.modules()):
        for name, child in list(parent._modules.items()):
            if type(child) is nn.Dropout and child.p > 0:
                parent._modules[name] = Dropout(child.p, child.inplace)
                parent._modules[name].train(child.training)
                swapped += 1
        if "Attention" in type(parent).__name__:
            setattr(parent, MARK, True)
    if swapped:
        _route_hf_sdpa()
    return swapped


# -- Hugging Face attention: the dropout on the attention probabilities -----------------------------------

_ORIGINAL_SDPA: Any = None


def _route_hf_sdpa() -> None:
    """Register a wrapper as transformers' `sdpa` attention: for marked modules training on CPU with
    attention dropout, it computes attention as sdpa's math path does (scores, mask, softmax, dropout,
    weighted sum) with the cheap mask; every other call goes to transformers' own function unchanged."""
    global _ORIGINAL_SDPA
    if _ORIGINAL_SDPA is not None:
        return
    try:
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
    except ImportError:
        return
    _ORIGINAL_SDPA = ALL_ATTENTION_FUNCTIONS["sdpa"]
    ALL_ATTENTION_FUNCTIONS["sdpa"] = _sdpa_attention


def _sdpa_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                    attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                    is_causal: bool | None = None, **kwargs: Any) -> tuple[torch.Tensor, None]:
    plain = (
        not getattr(module, MARK, False)
        or not _fast_path(query, dropout)
        or kwargs.get("position_bias") is not None
        or kwargs.get("softcap") is not None
        or key.shape[-2] != query.shape[-2]
    )
    if plain:
        return _ORIGINAL_SDPA(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                              is_causal=is_causal, **kwargs)
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    out = attention_with_dropout(query, key, value, dropout, attention_mask, causal, scaling)
    return out.transpose(1, 2).contiguous(), None


def attention_with_dropout(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, p: float,
                           mask: torch.Tensor | None = None, causal: bool = False,
                           scale: float | None = None) -> torch.Tensor:
    """sdpa's math path with `dropout`'s mask on the probabilities: softmax(q k^T * scale + mask) v, with
    keys/values repeated for grouped-query attention. `mask`: bool (True = attend) or additive; without
    one, `causal` hides future positions. (B, H, T, D) in and out."""
    if k.shape[1] != q.shape[1]:
        k, v = (t.repeat_interleave(q.shape[1] // k.shape[1], dim=1) for t in (k, v))
    length = q.shape[-2]
    scores = torch.matmul(q, k.transpose(-1, -2)) * (scale if scale is not None else q.shape[-1] ** -0.5)
    if mask is not None:
        if mask.dtype == torch.bool:
            scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
        else:
            scores = scores + mask
    elif causal and length > 1:
        future = torch.ones(length, length, dtype=torch.bool, device=q.device).triu(1)
        scores = scores.masked_fill(future, torch.finfo(scores.dtype).min)
    probs = scores.softmax(dim=-1, dtype=torch.float32).to(q.dtype)
    return torch.matmul(dropout(probs, p), v)


# -- which dropout a model draws, for shard threads (engine/step.py) ------------------------------------------

_RANDOM_DEPTH = ("DropPath", "StochasticDepth")  # timm's and torchvision's, drawn with torch's generator
_ATTENTION_P = ("attention_dropout", "attention_probs_dropout_prob", "attn_pdrop")


def _attention_p(module: nn.Module) -> float:
    """The attention-probability dropout of a Hugging Face model (its config) or of tunelab's GPT attention."""
    config = getattr(module, "config", None)
    values = [getattr(config, k, 0.0) for k in _ATTENTION_P] if config is not None else []
    if "Attention" in type(module).__name__ and isinstance(getattr(module, "dropout", None), float):
        values.append(module.dropout)
    return max((v for v in values if isinstance(v, (int, float))), default=0.0)


def _random_depth_p(module: nn.Module) -> float:
    """The drop probability of a stochastic-depth module (timm's `DropPath`, torchvision's `StochasticDepth`),
    else 0."""
    if type(module).__name__ not in _RANDOM_DEPTH:
        return 0.0
    p = getattr(module, "p", getattr(module, "drop_prob", 0.0))
    return float(p) if isinstance(p, (int, float)) else 0.0


def has_dropout(model: nn.Module) -> bool:
    """Whether training draws any random mask: dropout modules, attention dropout, stochastic depth."""
    return any((isinstance(m, nn.modules.dropout._DropoutNd) and m.p > 0) or _random_depth_p(m) > 0
               or _attention_p(m) > 0 for m in model.modules())


def shared_generator_dropout(model: nn.Module, fast: bool) -> str | None:
    """Where training would draw masks from torch's default generator, which threads share, or would replay
    them wrongly: None when every mask comes from `dropout` (with `fast`: after `use_fast_dropout`) and every
    Hugging Face activation checkpoint replays them (`replaying_masks`). Otherwise what and where, in words."""
    for name, m in model.named_modules():
        where = f"`{name or type(m).__name__}` ({type(m).__name__})"
        if isinstance(m, nn.modules.dropout._DropoutNd) and m.p > 0:
            swappable = type(m) is nn.Dropout or isinstance(m, Dropout)
            if not (fast and swappable and not m.inplace):
                return f"{where} draws its mask from torch's generator"
        p = getattr(m, "p", getattr(m, "drop_prob", 0.0))
        if type(m).__name__ in _RANDOM_DEPTH and isinstance(p, (int, float)) and p > 0:
            return f"{where} draws from torch's generator"
        if _attention_p(m) > 0:
            config = getattr(m, "config", None)
            sdpa = config is None or getattr(config, "_attn_implementation", "sdpa") == "sdpa"
            if not (fast and sdpa):
                return f"{where}'s attention dropout draws from torch's generator"
        if getattr(m, "gradient_checkpointing", False) is True and has_dropout(m):
            if not replays_masks(getattr(m, "_gradient_checkpointing_func", None)):
                return f"{where}'s activation checkpointing was not set up by tunelab and would replay other masks"
    return None
