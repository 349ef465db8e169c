"""tunelab.models.dropout: the same distribution as F.dropout, reproducible masks, the same masks when
activation checkpointing recomputes, and Hugging Face attention-probability dropout routed through it."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from tunelab.models.checkpointing import selective_checkpoint_kwargs
from tunelab.models.dropout import Dropout, _keep_mask, dropout, use_fast_dropout


@pytest.mark.parametrize("p", [0.05, 0.1, 0.5])
def test_keep_rate_and_scale_match_torch_dropout(p: float) -> None:
    torch.manual_seed(0)
    x = torch.ones(1_000_003)
    y = dropout(x, p)
    kept = (y != 0).double().mean().item()
    sigma = math.sqrt(p * (1 - p) / x.numel())
    assert abs(kept - (1 - p)) < 5 * sigma
    assert torch.allclose(y[y != 0], torch.full_like(y[y != 0], 1 / (1 - p)))
    assert abs(y.double().mean().item() - 1.0) < 6 * sigma / (1 - p)  # unbiased, as F.dropout is


def test_masks_are_independent_across_positions_and_calls() -> None:
    torch.manual_seed(0)
    a, b = dropout(torch.ones(200_000), 0.5), dropout(torch.ones(200_000), 0.5)
    both = ((a != 0) & (b != 0)).double().mean().item()
    assert abs(both - 0.25) < 0.005  # two calls draw different masks
    neighbours = ((a[:-1] != 0) & (a[1:] != 0)).double().mean().item()
    assert abs(neighbours - 0.25) < 0.005  # adjacent elements (the two halves of one 64-bit draw) too


def test_masks_follow_torch_seed_and_eval_is_identity() -> None:
    x = torch.randn(64, 33)
    torch.manual_seed(3)
    a = dropout(x, 0.2)
    torch.manual_seed(3)
    b = dropout(x, 0.2)
    torch.manual_seed(4)
    c = dropout(x, 0.2)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert dropout(x, 0.2, training=False) is x
    assert dropout(x, 0.0) is x


def test_gradient_is_mask_times_scale() -> None:
    torch.manual_seed(0)
    x = torch.randn(4096, requires_grad=True)
    y = dropout(x, 0.3)
    y.sum().backward()
    keep = y.detach() != 0
    assert torch.allclose(x.grad, keep.float() / 0.7)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_every_dtype_gets_x_times_keep_times_the_exact_scale(dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    x = (torch.rand(512, 64, dtype=dtype) + 0.5).requires_grad_()  # no zeros: y == 0 means dropped
    y = dropout(x, 0.1)
    assert y.dtype == dtype
    keep, scale = y.detach() != 0, _keep_mask(torch.Size([1]), 0.1)[1]  # 1 / P(keep), P on a 2^-32 grid
    assert abs(scale - 1 / 0.9) < 1e-8
    # the scale is applied as torch applies a Python scalar (in float opmath), not rounded to `dtype`
    # first: with bf16, 1/0.9 rounded to 1.109 would bias every kept activation by 0.16%
    assert torch.equal(y.detach(), x.detach() * keep * scale)
    g = torch.randn(512, 64, dtype=dtype)
    y.backward(g)
    assert x.grad.dtype == dtype
    assert torch.equal(x.grad, g * keep * scale)


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.drop = nn.Linear(16, 64), nn.Linear(64, 16), nn.Dropout(0.3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(self.drop(torch.relu(self.a(x))))


@pytest.mark.parametrize("mode", ["full", "selective"])
def test_checkpoint_recompute_replays_the_mask(mode: str) -> None:
    torch.manual_seed(0)
    net = _Net()
    assert use_fast_dropout(net) == 1 and isinstance(net.drop, Dropout) and isinstance(net.drop, nn.Dropout)
    x = torch.randn(8, 16)

    def grads(wrap: bool) -> list[torch.Tensor]:
        net.zero_grad()
        torch.manual_seed(1)
        if wrap:
            kwargs = selective_checkpoint_kwargs() if mode == "selective" else {"use_reentrant": False}
            out = checkpoint(net, x, **kwargs)
        else:
            out = net(x)
        out.square().sum().backward()
        return [p.grad.clone() for p in net.parameters()]

    for plain, recomputed in zip(grads(False), grads(True)):
        assert torch.allclose(plain, recomputed)


def test_swap_keeps_state_dict_and_eval_outputs(minilm_path) -> None:
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(str(minilm_path), num_labels=2,
                                                               attn_implementation="sdpa")
    ids = torch.randint(1000, 2000, (4, 12))
    mask = torch.ones_like(ids)
    mask[:2, 7:] = 0
    model.eval()
    before = model(input_ids=ids, attention_mask=mask).logits
    keys = set(model.state_dict())
    swapped = use_fast_dropout(model)
    # embeddings + 6 x (attention probabilities, attention output, FFN output) + the classifier's
    assert swapped == 1 + 6 * 3 + 1
    assert not any(type(m) is nn.Dropout for m in model.modules())
    assert set(model.state_dict()) == keys
    assert torch.equal(model(input_ids=ids, attention_mask=mask).logits, before)
    model.train()
    loss = model(input_ids=ids, attention_mask=mask, labels=torch.tensor([0, 1, 0, 1])).loss
    loss.backward()
    assert torch.isfinite(loss) and model.classifier.weight.grad is not None


def test_hf_attention_dropout_is_the_math_path_with_the_fast_mask() -> None:
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    use_fast_dropout(_Net())  # installs the sdpa route
    sdpa = ALL_ATTENTION_FUNCTIONS["sdpa"]

    class SelfAttention(nn.Module):
        is_causal = False

    module = SelfAttention()
    use_fast_dropout(module)
    q, k, v = (torch.randn(2, 3, 5, 8) for _ in range(3))
    attend = torch.ones(2, 1, 5, 5, dtype=torch.bool)
    attend[1, :, :, 3:] = False
    torch.manual_seed(7)
    out, _ = sdpa(module, q, k, v, attend, dropout=0.25, scaling=0.5)
    torch.manual_seed(7)
    keep, scale = _keep_mask(torch.Size([2, 3, 5, 5]), 0.25)
    scores = (q @ k.transpose(-1, -2) * 0.5).masked_fill(~attend, float("-inf"))
    expected = ((scores.softmax(-1) * keep * scale) @ v).transpose(1, 2)
    assert torch.allclose(out, expected, atol=1e-6)
    # without dropout, or for modules tunelab did not mark, transformers' own function runs
    plain, _ = sdpa(SelfAttention(), q, k, v, attend, dropout=0.0, scaling=0.5)
    reference = F.scaled_dot_product_attention(q, k, v, attn_mask=attend, scale=0.5).transpose(1, 2)
    assert torch.allclose(plain, reference, atol=1e-6)


def test_gpt_attention_dropout_path() -> None:
    from tunelab.models.dropout import attention_with_dropout
    from tunelab.models.gpt import GPT, gpt_config

    q, k, v = torch.randn(2, 4, 9, 8), torch.randn(2, 2, 9, 8), torch.randn(2, 2, 9, 8)
    reference = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    assert torch.allclose(attention_with_dropout(q, k, v, 0.0, causal=True), reference, atol=1e-6)

    torch.manual_seed(0)
    model = GPT(gpt_config("baby-llama", dropout=0.1))
    assert use_fast_dropout(model) > 0 and model.blocks[0].attn.tunelab_fast_dropout
    ids = torch.randint(0, 65, (2, 16))
    torch.manual_seed(1)
    a = model(ids)
    torch.manual_seed(1)
    b = model(ids)
    assert torch.equal(a, b) and torch.isfinite(a).all()
    a.sum().backward()
    assert model.blocks[0].attn.qkv.weight.grad.abs().sum() > 0
    model.eval()
    torch.manual_seed(2)
    assert torch.allclose(model(ids), model(ids))


@pytest.mark.parametrize("fast", [True, False])
def test_trainer_swaps_dropout_on_cpu_unless_switched_off(tmp_path, fast: bool) -> None:
    import json

    from tunelab.config import load_config
    from tunelab.data.base import TensorDataset
    from tunelab.engine import Trainer
    from tunelab.tasks.classification import ClassificationTask

    cfg = load_config({
        "model": {"name": "linear"}, "data": {"name": "digits"}, "optim": {"name": "adam", "lr": 1e-2},
        "train": {"max_steps": 4, "batch_size": 8, "fast_dropout": fast, "checkpoints": False},
        "output": {"dir": str(tmp_path), "tensorboard": False, "progress": False},
    })
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Dropout(0.2), nn.Linear(32, 4))
    data = TensorDataset(torch.randn(32, 16), torch.randint(0, 4, (32,)))
    Trainer(model, ClassificationTask(num_classes=4), data, None, config=cfg).fit()
    start = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[0])
    assert isinstance(model[2], Dropout) is fast
    assert start.get("fast_dropout") == (1 if fast else None)
