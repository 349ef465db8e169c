"""`train.batch_threads`: each micro-batch cut into shards whose forwards and backwards run at once in
threads (engine.step). The update must be the one-thread update up to float rounding, the same bits on
every run, and refused where threads would share state or change the math."""

from __future__ import annotations

from contextlib import nullcontext

import pytest
import torch
import torch.nn as nn

from tunelab.config import load_config
from tunelab.engine.step import TrainStep, resolve_batch_threads, split_batch
from tunelab.errors import ConfigError
from tunelab.models import create_model
from tunelab.models.dropout import use_fast_dropout
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


class _Preference(Task):
    def shard_refusal(self, model: nn.Module) -> str | None:
        return "pairs share state"


def test_auto_and_refusals(monkeypatch):
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    lm = CausalLMTask()

    def resolve(setting, model, task=lm, device=CPU, compiled=False, distributed=False, fast_dropout=True):
        return resolve_batch_threads(setting, model, task, device, compiled=compiled, distributed=distributed,
                                     fast_dropout=fast_dropout)

    assert resolve("auto", gpt()) == 2
    assert resolve(3, gpt()) == 3
    assert resolve("auto", gpt(dropout=0.1)) == 2  # tunelab's dropout: one mask generator per shard
    assert resolve("auto", _WithHead()) == 2  # the head is narrowed per thread
    own = nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.1))  # may checkpoint without replaying the masks
    assert resolve("auto", own, task=ClassificationTask()) == 1
    assert resolve(2, own, task=ClassificationTask()) == 2  # asked for: allowed (the docs say when it is safe)
    bn = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4))
    refused = {
        "BatchNorm": dict(model=bn, task=ClassificationTask()),
        "CPU training": dict(model=gpt(), device=torch.device("cuda")),
        "one process": dict(model=gpt(), distributed=True),
        "torch.compile": dict(model=gpt(), compiled=True),
        "pairs share state": dict(model=gpt(), task=_Preference()),
        r"`drop` \(Dropout\) draws its mask from torch's generator.*train.fast_dropout=true":
            dict(model=gpt(dropout=0.1), fast_dropout=False),
        "`1` \\(Dropout\\) draws": dict(model=nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.1, inplace=True))),
        "attention dropout": dict(model=_Attention(0.1), fast_dropout=False),
        r"`1` \(DropPath\) draws from torch's generator": dict(model=nn.Sequential(nn.Linear(4, 4), DropPath(0.1))),
    }
    assert resolve(2, nn.Sequential(nn.Linear(4, 4), DropPath(0.0))) == 2  # stochastic depth that never drops
    for why, kw in refused.items():
        model = kw.pop("model")
        assert resolve("auto", model, **kw) == 1
        with pytest.raises(ConfigError, match=rf"`train.batch_threads` = 2 cannot be used here: .*{why}"):
            resolve(2, model, **kw)


class DropPath(nn.Module):
    """timm's stochastic depth, by its name and `drop_prob`: it draws from torch's generator."""

    def __init__(self, drop_prob: float):
        super().__init__()
        self.drop_prob = drop_prob


class _Attention(nn.Module):
    """Attention dropout without a dropout module (an sdpa `dropout_p`), as tunelab's GPT attention has."""

    def __init__(self, p: float):
        super().__init__()
        self.dropout = p


def test_hf_checkpointing_not_set_up_by_tunelab_is_refused():
    from tunelab.models.checkpointing import plain_checkpoint_kwargs

    model = tiny_llama_lora(dropout=0.1)
    model.get_base_model().activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    with pytest.raises(ConfigError, match="activation checkpointing was not set up by tunelab"):
        resolve_batch_threads(2, model, CausalLMTask(), CPU, compiled=False, distributed=False)
    model.get_base_model().activation_checkpointing_enable(activation_checkpointing_kwargs=plain_checkpoint_kwargs())
    assert resolve_batch_threads(2, model, CausalLMTask(), CPU, compiled=False, distributed=False) == 2


def gpt_dropout_steps(checkpointing: bool, threads: int = 2) -> list[torch.Tensor]:
    """Two AdamW steps of a GPT with tunelab's dropout (p = 0.2, attention too) over 6-row micro-batches."""
    torch.manual_seed(0)
    model = create_model("gpt", size=None, n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=40,
                         dropout=0.2, activation_checkpointing=checkpointing).train()
    assert use_fast_dropout(model) > 0
    step = TrainStep(model, CausalLMTask(), CPU, optimizer=torch.optim.AdamW(model.parameters(), lr=1e-2))
    step.use_threads(threads)
    g = torch.Generator().manual_seed(1)
    for _ in range(2):
        step([{"input_ids": torch.randint(0, 40, (6, 16), generator=g),
               "labels": torch.randint(0, 40, (6, 16), generator=g)}])
    return [p.detach().clone() for p in model.parameters()]


def test_dropout_under_threads_is_reproducible_and_checkpoints_replay_its_masks(monkeypatch):
    """Each shard draws its masks from its own generator, seeded in shard order: the same bits on every run,
    and an activation checkpoint's recompute draws the masks the forward drew (else the gradient is that
    of other masks)."""
    plain = gpt_dropout_steps(checkpointing=False)
    assert all(torch.equal(a, b) for a, b in zip(plain, gpt_dropout_steps(checkpointing=False)))
    replayed = gpt_dropout_steps(checkpointing=True)
    for a, b in zip(plain, replayed):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
    # a checkpoint that does not replay the shard's generator is stopped with one line, not run
    import tunelab.models.checkpointing as checkpointing
    import tunelab.models.dropout as dropout

    monkeypatch.setattr(checkpointing, "replaying_masks", lambda inner=None: (lambda: (nullcontext(), nullcontext())))
    with pytest.raises(ConfigError, match=r"`train.batch_threads` > 1: .*without replaying.*replaying_masks\(\)"):
        gpt_dropout_steps(checkpointing=True)
    # the check above can fail: let it run, and its recompute draws other masks, so the update differs
    monkeypatch.setattr(dropout, "_in_backward", lambda: False)
    wrong = gpt_dropout_steps(checkpointing=True)
    assert not all(torch.allclose(a, b, rtol=1e-3, atol=1e-4) for a, b in zip(plain, wrong))


class _OwnCheckpointed(nn.Module):
    """A user's own model that calls torch.utils.checkpoint around a dropout itself."""

    def __init__(self, **checkpoint_kwargs):
        super().__init__()
        torch.manual_seed(0)
        self.first = nn.Linear(8, 8)  # so the checkpoint's input needs a gradient, as in a real model
        self.inner = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Dropout(0.3), nn.Linear(16, 8))
        self.head = nn.Linear(8, 2)
        self.kw = checkpoint_kwargs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.first(x)
        if self.kw:
            x = torch.utils.checkpoint.checkpoint(self.inner, x, **self.kw)
        else:
            x = self.inner(x)
        return self.head(x)


def own_model_steps(**checkpoint_kwargs) -> list[torch.Tensor]:
    model = _OwnCheckpointed(**checkpoint_kwargs).train()
    use_fast_dropout(model)
    step = TrainStep(model, ClassificationTask(), CPU, optimizer=torch.optim.AdamW(model.parameters(), lr=1e-2))
    step.use_threads(2)
    g = torch.Generator().manual_seed(1)
    for _ in range(2):
        step([{"inputs": torch.randn(6, 8, generator=g), "labels": torch.randint(0, 2, (6,), generator=g)}])
    return [p.detach().clone() for p in model.parameters()]


def test_own_checkpoint_without_mask_replay_is_stopped_under_threads():
    """A model of the user's own that checkpoints a dropout itself, under an explicit `train.batch_threads`:
    with `replaying_masks` its update is the one without checkpointing; without it the run stops with one line
    instead of taking the gradient of other masks."""
    from tunelab.models.dropout import replaying_masks

    plain = own_model_steps()
    replayed = own_model_steps(use_reentrant=False, context_fn=replaying_masks())
    for a, b in zip(plain, replayed):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
    with pytest.raises(ConfigError, match="replaying_masks"):
        own_model_steps(use_reentrant=False)
    with pytest.raises(RuntimeError, match="use_reentrant=True"):  # torch's own: no reentrant checkpoint under .grad()
        own_model_steps(use_reentrant=True)


def tiny_llama_lora(dropout: float = 0.0) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    from tunelab.strategies.lora import LoRA

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         tie_word_embeddings=False, attn_implementation="sdpa")  # fmt: skip
    model, _ = LoRA(r=4, alpha=8, dropout=dropout, target_modules="all-linear").setup(LlamaForCausalLM(config))
    return model.train()


def sft_steps(threads: int, dropout: float = 0.0, selective: bool = False) -> tuple[list[float], list[torch.Tensor]]:
    """Two AdamW steps of LoRA SFT on a tiny Llama through the fused head (narrowed to the target rows per
    thread), prompts masked, over 4-row micro-batches."""
    from tunelab.models.checkpointing import selective_checkpoint_kwargs

    model = tiny_llama_lora(dropout)
    if selective:
        model.get_base_model().activation_checkpointing_enable(
            activation_checkpointing_kwargs=selective_checkpoint_kwargs(min_inner=32))
    use_fast_dropout(model)
    task = CausalLMTask()
    trainable = [p for p in model.parameters() if p.requires_grad]
    step = TrainStep(model, task, CPU, optimizer=torch.optim.AdamW(trainable, lr=1e-2), clip_grad_norm=1.0)
    step.use_threads(threads)
    g, losses = torch.Generator().manual_seed(1), []
    for _ in range(2):
        ids = torch.randint(0, 300, (4, 24), generator=g)
        labels = ids.roll(-1, dims=1)
        labels[:, :9] = -100
        labels[3, 15:] = -100
        r = step([{"input_ids": ids, "labels": labels}])
        losses.append(float(r.loss_sum / r.targets))
    assert task.fused_loss  # the fused head ran (in both threads at once when threaded)
    return losses, [p.detach().clone() for p in trainable]


def test_sft_through_the_narrowed_head_gives_the_one_thread_update():
    losses_one, one = sft_steps(1)
    losses_two, two = sft_steps(2)
    assert losses_two == pytest.approx(losses_one, rel=1e-5)
    for a, b in zip(one, two):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)


def test_sft_with_lora_dropout_and_selective_checkpointing_under_threads():
    losses, plain = sft_steps(2, dropout=0.1)
    again, replayed = sft_steps(2, dropout=0.1, selective=True)
    assert again == pytest.approx(losses, rel=1e-5)
    for a, b in zip(plain, replayed):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)
    assert losses != sft_steps(2, dropout=0.0)[0]  # the dropout ran


BASE = {"name": "t", "model": {"name": "gpt"}, "data": {"name": "tokens", "path": "x.txt"}}


@pytest.mark.parametrize("value", [0, -1, "many", 1.5, True, 1000])
def test_bad_value_names_key_and_range(value):
    with pytest.raises(ConfigError, match=rf"`train.batch_threads` = '?{value}'? is invalid: a number of threads"):
        load_config(BASE, [f"train.batch_threads={value}"])
    assert load_config(BASE, ["train.batch_threads=auto"]).train.batch_threads == "auto"
