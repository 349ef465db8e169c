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
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

MARK = "tunelab_fast_dropout"  # set on attention modules whose sdpa call takes the fast path


def _keep_mask(shape: torch.Size, p: float) -> tuple[torch.Tensor, float]:
    """A bool mask (True = keep) with P(keep) = 1 - p, and the scale 1 / P(keep)."""
    n = int(np.prod(shape))
    threshold = min(int(round(p * 2**32)), 2**32 - 1)  # uniform u32 >= threshold: keep
    seed = int(torch.randint(0, 2**63 - 1, (), dtype=torch.int64))
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
