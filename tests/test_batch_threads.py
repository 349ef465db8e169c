"""`train.batch_threads`: each micro-batch cut into shards whose forwards and backwards run at once in
threads (engine.step). The update must be the one-thread update up to float rounding, the same bits on
every run, and refused where threads would share state or change the math."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from tunelab.config import load_config
from tunelab.engine.step import TrainStep, resolve_batch_threads, split_batch
from tunelab.errors import ConfigError
from tunelab.models import create_model
from tunelab.tasks.base import Task
from tunelab.tasks.causal_lm import CausalLMTask
from tunelab.tasks.classification import ClassificationTask

CPU = torch.device("cpu")


def gpt(dropout: float = 0.0) -> nn.Module:
    torch.manual_seed(0)
    return create_model("gpt", size=None, n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=40,
                        dropout=dropout)


def train_steps(threads: int, steps: int = 3, accumulation: int = 2) -> tuple[nn.Module, list[float]]:
    """`steps` updates of AdamW with clipping over windows of `accumulation` micro-batches of 5 rows (odd,
    so the shards differ in size)."""
    model = gpt()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    step = TrainStep(model, CausalLMTask(), CPU, optimizer=opt, clip_grad_norm=1.0)
    step.use_threads(threads)
    g = torch.Generator().manual_seed(1)
    losses = []
    for _ in range(steps):
        micro = []
        for _ in range(accumulation):
            ids = torch.randint(0, 40, (5, 16), generator=g)
            labels = torch.randint(0, 40, (5, 16), generator=g)
            labels[0, :7] = -100  # targets differ between shards: the scale is over the whole window
            micro.append({"input_ids": ids, "labels": labels})
        r = step(micro)
        losses.append(float(r.loss_sum / r.targets))
        assert r.samples == 5 * accumulation and r.tokens == 5 * 16 * accumulation
    return model, losses


def test_threads_give_the_one_thread_update():
    one, losses_one = train_steps(1)
    two, losses_two = train_steps(2)
    assert losses_two == pytest.approx(losses_one, rel=1e-5)
    assert losses_one[-1] < losses_one[0]  # it trains
    for (name, a), b in zip(one.named_parameters(), two.parameters()):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5, msg=name)


class _Shared(nn.Module):
    """`a + b`: autograd hands both parameters the same gradient tensor."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Parameter(torch.ones(3)), nn.Parameter(torch.full((3,), 2.0))

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return inputs * (self.a + self.b)


class _SquaredError(Task):
    def loss_sum(self, outputs: torch.Tensor, batch: dict) -> torch.Tensor:
        return ((outputs - batch["labels"]) ** 2).sum()


def test_parameters_handed_one_gradient_tensor_get_their_own():
    """Clipping scales every `.grad` in place and the second shard adds into them: a shared tensor would be
    scaled and added twice."""
    grads = {}
    for threads in (1, 2):
        model = _Shared()
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        step = TrainStep(model, _SquaredError(), CPU, optimizer=opt, clip_grad_norm=0.5)
        step.use_threads(threads)
        step([{"inputs": torch.arange(12.0).view(4, 3), "labels": torch.zeros(4, 3)}])
        grads[threads] = [p.detach().clone() for p in model.parameters()]
    for a, b in zip(grads[1], grads[2]):
        torch.testing.assert_close(b, a)


def test_threaded_runs_are_bit_identical():
    """Each shard's gradient is added in shard order, whichever thread finishes first."""
    a, losses_a = train_steps(3)
    b, losses_b = train_steps(3)
    assert losses_a == losses_b
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


def test_threads_leave_the_callers_thread_count():
    before = torch.get_num_threads()
    step = TrainStep(gpt(), CausalLMTask(), CPU)
    step.use_threads(2)
    assert torch.get_num_threads() == before
    assert step.threads.map(lambda _: torch.get_num_threads(), [{}, {}]) == [1, 1]


def test_split_batch():
    batch = {"input_ids": torch.arange(13).view(13, 1), "texts": [str(i) for i in range(13)],
             "scale": torch.tensor(2.0), "name": "x"}
    shards = split_batch(batch, 2)
    assert [len(s["input_ids"]) for s in shards] == [6, 7]
    assert torch.equal(torch.cat([s["input_ids"] for s in shards]), batch["input_ids"])
    assert shards[1]["texts"] == [str(i) for i in range(6, 13)]
    assert all(s["scale"] is batch["scale"] and s["name"] == "x" for s in shards)
    assert len(split_batch(batch, 20)) == 13  # one row per shard at most
    assert split_batch({"input_ids": torch.zeros(1, 4)}, 2)[0]["input_ids"].shape == (1, 4)
    ragged = {"input_ids": torch.zeros(4, 2), "labels": torch.zeros(3)}
    assert split_batch(ragged, 2) == [ragged]  # rows it cannot match up: left whole


class _WithHead(nn.Module):
    """A Hugging Face-style model: the causal LM task narrows its output head per batch."""

    def __init__(self):
        super().__init__()
        self.head = nn.Linear(4, 4)

    def get_output_embeddings(self) -> nn.Module:
        return self.head


def test_auto_and_refusals(monkeypatch):
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    lm = CausalLMTask()

    def resolve(setting, model, task=lm, device=CPU, compiled=False, distributed=False):
        return resolve_batch_threads(setting, model, task, device, compiled=compiled, distributed=distributed)

    assert resolve("auto", gpt()) == 2
    assert resolve(3, gpt()) == 3
    assert resolve("auto", gpt(dropout=0.1)) == 1  # masks would depend on thread timing
    assert resolve(2, gpt(dropout=0.1)) == 2  # asked for: allowed (docs say it is not reproducible)
    bn = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4))
    refused = {
        "BatchNorm": dict(model=bn, task=ClassificationTask()),
        "CPU training": dict(model=gpt(), device=torch.device("cuda")),
        "one process": dict(model=gpt(), distributed=True),
        "torch.compile": dict(model=gpt(), compiled=True),
        "output head": dict(model=_WithHead()),
    }
    for why, kw in refused.items():
        model = kw.pop("model")
        assert resolve("auto", model, **kw) == 1
        with pytest.raises(ConfigError, match=rf"`train.batch_threads` = 2 cannot be used here: .*{why}"):
            resolve(2, model, **kw)
    assert resolve(2, _WithHead(), task=CausalLMTask(target_logits=False)) == 2


BASE = {"name": "t", "model": {"name": "gpt"}, "data": {"name": "tokens", "path": "x.txt"}}


@pytest.mark.parametrize("value", [0, -1, "many", 1.5, True, 1000])
def test_bad_value_names_key_and_range(value):
    with pytest.raises(ConfigError, match=rf"`train.batch_threads` = '?{value}'? is invalid: a number of threads"):
        load_config(BASE, [f"train.batch_threads={value}"])
    assert load_config(BASE, ["train.batch_threads=auto"]).train.batch_threads == "auto"
