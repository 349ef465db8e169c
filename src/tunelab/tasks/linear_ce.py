"""The output head and the cross-entropy in one pass over row chunks: full logits are never materialised.

`linear_cross_entropy(hidden, weight, bias, targets)` equals
`F.cross_entropy(F.linear(hidden, weight, bias).float(), targets, reduction="sum")`, but works through
`hidden`'s rows a chunk at a time (about 32 MiB of fp32 logits per chunk). Each chunk's logits become the
gradient of the loss with respect to them (softmax minus one-hot) in place, and that gradient is turned into
the gradients for `hidden`, `weight` and `bias` right away, inside the forward: backward only scales them
by the incoming gradient. The FLOPs are those of the plain head + loss (one forward and two backward
matmuls), with no recompute; the memory is one chunk of logits instead of three (targets x vocab) tensors
(the logits, the saved log-softmax and the logits' gradient). For SmolLM2's 49k vocabulary and 1k target
tokens the plan's SFT estimate fell by 488 MiB (docs/insight.md). The idea is Liger Kernel's fused linear
cross-entropy (and torchtune's chunked output loss), written here in plain PyTorch so it runs on any device.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

CHUNK_ELEMENTS = 1 << 23  # fp32 logits per chunk: 32 MiB


def chunk_rows(vocab: int) -> int:
    return max(1, CHUNK_ELEMENTS // max(1, vocab))


class LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, label_smoothing, grad):  # type: ignore[override]
        device = hidden.device.type
        autocast = torch.is_autocast_enabled(device)
        dtype = torch.get_autocast_dtype(device) if autocast else hidden.dtype  # the matmul dtype
        need_h, need_w = grad and hidden.requires_grad, grad and weight.requires_grad
        need_b = grad and bias is not None and bias.requires_grad
        n, vocab = hidden.shape[0], weight.shape[0]
        eps = float(label_smoothing)
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = torch.zeros_like(weight, dtype=torch.float32) if need_w else None
        grad_b = torch.zeros_like(bias, dtype=torch.float32) if need_b else None
        with torch.autocast(device, enabled=False):
            w = weight.to(dtype)
            b = bias.to(dtype) if bias is not None else None
            step = chunk_rows(vocab)
            for s in range(0, n, step):
                h, t = hidden[s : s + step].to(dtype), targets[s : s + step]
                logits = F.linear(h, w, b).float()
                lse = torch.logsumexp(logits, dim=-1)
                loss = lse - logits.gather(1, t[:, None]).squeeze(1)
                if eps:
                    loss = (1 - eps) * loss + eps * (lse - logits.mean(dim=-1))
                total += loss.sum()
                if not (need_h or need_w or need_b):
                    continue
                # d(sum of losses)/d(logits) = softmax - (1 - eps) * one_hot - eps / vocab, in place
                g = logits.sub_(lse[:, None]).exp_()
                g.scatter_add_(1, t[:, None], g.new_full((len(t), 1), -(1 - eps)))
                if eps:
                    g.sub_(eps / vocab)
                g = g.to(dtype)
                if need_h:
                    grad_h[s : s + step] = g @ w
                if need_w:
                    if g.dtype == torch.float32 and h.dtype == torch.float32:
                        grad_w.addmm_(g.t(), h)
                    else:
                        grad_w += (g.t() @ h).float()
                if need_b:
                    grad_b += g.float().sum(0)
        ctx.save_for_backward(grad_h, grad_w, grad_b)  # intermediates: visible to saved-tensor hooks
        ctx.dtypes = (weight.dtype, bias.dtype if bias is not None else None)
        return total

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        grad_h, grad_w, grad_b = ctx.saved_tensors
        w_dtype, b_dtype = ctx.dtypes
        return (
            grad_h * grad_out.to(grad_h.dtype) if grad_h is not None else None,
            (grad_w * grad_out).to(w_dtype) if grad_w is not None else None,
            (grad_b * grad_out).to(b_dtype) if grad_b is not None else None,
            None,
            None,
            None,
        )


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    targets: torch.Tensor,
    label_smoothing: float = 0.0,
) -> torch.Tensor:
    """Sum over rows of cross_entropy(hidden @ weight.T + bias, targets), in fp32. `hidden` is (N, H)
    and every target is a valid class index (select the rows that carry a loss first)."""
    # Function.forward runs with grad mode off: whether gradients will be wanted is decided out here
    return LinearCrossEntropy.apply(hidden, weight, bias, targets, label_smoothing, torch.is_grad_enabled())


class LinearLogProbs(torch.autograd.Function):
    """Per-row log-probabilities of the targets, `log_softmax(hidden @ weight.T + bias)[i, targets[i]]`,
    a chunk of rows at a time. The gradient for `hidden` is made in the forward (row i's gradient is linear
    in the incoming gradient of row i, so backward only scales it); the gradients for `weight` and `bias`
    sum over rows with each row's own incoming gradient, so backward recomputes the chunk's logits for them
    (only full fine-tuning of the head pays for that; LoRA keeps the head frozen)."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, grad):  # type: ignore[override]
        device = hidden.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else hidden.dtype
        need_h = grad and hidden.requires_grad
        need_wb = grad and (weight.requires_grad or (bias is not None and bias.requires_grad))
        n, vocab = hidden.shape[0], weight.shape[0]
        out = torch.empty(n, dtype=torch.float32, device=hidden.device)
        grad_h = torch.empty_like(hidden) if need_h else None
        with torch.autocast(device, enabled=False):
            w = weight.to(dtype)
            b = bias.to(dtype) if bias is not None else None
            step = chunk_rows(vocab)
            for s in range(0, n, step):
                t = targets[s : s + step]
                logits = F.linear(hidden[s : s + step].to(dtype), w, b).float()
                lse = torch.logsumexp(logits, dim=-1)
                out[s : s + step] = logits.gather(1, t[:, None]).squeeze(1) - lse
                if need_h:  # d(log p)/d(logits) = one_hot - softmax, in place
                    g = logits.sub_(lse[:, None]).exp_().neg_()
                    g.scatter_add_(1, t[:, None], g.new_ones((len(t), 1)))
                    grad_h[s : s + step] = g.to(dtype) @ w
        ctx.save_for_backward(grad_h, hidden if need_wb else None, weight, bias, targets)
        ctx.need_wb = need_wb
        return out

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        grad_h, hidden, weight, bias, targets = ctx.saved_tensors
        gh = grad_h * grad_out[:, None].to(grad_h.dtype) if grad_h is not None else None
        gw = gb = None
        if ctx.need_wb:
            gw = torch.zeros_like(weight, dtype=torch.float32) if weight.requires_grad else None
            gb = torch.zeros_like(bias, dtype=torch.float32) if bias is not None and bias.requires_grad else None
            step = chunk_rows(weight.shape[0])
            for s in range(0, hidden.shape[0], step):
                h, t = hidden[s : s + step].float(), targets[s : s + step]
                logits = F.linear(h, weight.float(), bias.float() if bias is not None else None)
                g = torch.softmax(logits, dim=-1).neg_()
                g.scatter_add_(1, t[:, None], g.new_ones((len(t), 1)))
                g.mul_(grad_out[s : s + step, None].float())
                if gw is not None:
                    gw.addmm_(g.t(), h)
                if gb is not None:
                    gb += g.sum(0)
            gw = gw.to(weight.dtype) if gw is not None else None
            gb = gb.to(bias.dtype) if gb is not None else None
        return gh, gw, gb, None, None


def linear_log_probs(
    hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, targets: torch.Tensor
) -> torch.Tensor:
    """log_softmax(hidden @ weight.T + bias)[i, targets[i]] for each row i, in fp32, without the (N, vocab)
    logits: `hidden` is (N, H), each target a valid class index. Preference losses sum these per sequence."""
    return LinearLogProbs.apply(hidden, weight, bias, targets, torch.is_grad_enabled())
