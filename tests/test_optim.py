import math

import pytest
import torch
import torch.nn as nn

from tunelab.config import LossSection, OptimSection, ScheduleSection, TrainSection
from tunelab.data.base import TensorDataset
from tunelab.engine import Trainer
from tunelab.errors import ConfigError
from tunelab.optim import build_optimizer, lr_lambda, param_groups
from tunelab.tasks.classification import ClassificationTask


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(10, 4)
        self.lin = nn.Linear(4, 4)
        self.norm = nn.LayerNorm(4)
        self.head = nn.Linear(4, 3)


def test_no_decay_on_bias_norm_embedding():
    groups = param_groups(Net(), OptimSection(weight_decay=0.1), lr=1e-3)
    by_wd = {g["weight_decay"]: set(g["names"]) for g in groups}
    assert by_wd[0.1] == {"lin.weight", "head.weight"}
    assert by_wd[0.0] == {"emb.weight", "lin.bias", "norm.weight", "norm.bias", "head.bias"}


def test_no_decay_is_configurable_and_rules_set_lr():
    cfg = OptimSection(weight_decay=0.1, no_decay=["bias"],
                       param_groups=[{"pattern": "head.*", "lr": 0.5}, {"pattern": "emb.*", "lr_scale": 0.1}])
    groups = param_groups(Net(), cfg, lr=1e-2)
    lr_of = {n: g["lr"] for g in groups for n in g["names"]}
    wd_of = {n: g["weight_decay"] for g in groups for n in g["names"]}
    assert lr_of["head.weight"] == 0.5 and lr_of["emb.weight"] == pytest.approx(1e-3) and lr_of["lin.weight"] == 1e-2
    assert wd_of["norm.weight"] == 0.1 and wd_of["emb.weight"] == 0.1 and wd_of["lin.bias"] == 0.0


def test_rule_matching_nothing_is_an_error():
    with pytest.raises(ConfigError, match="matches no parameter"):
        param_groups(Net(), OptimSection(param_groups=[{"pattern": "decoder.*", "lr": 1.0}]), lr=1e-3)


def test_sgd_nesterov_needs_momentum():
    with pytest.raises(ConfigError, match="nesterov"):
        build_optimizer(Net(), OptimSection(name="sgd", nesterov=True))


@pytest.mark.parametrize("name", ["sgd", "adam", "adamw"])
def test_optimizers_build(name):
    opt = build_optimizer(Net(), OptimSection(name=name, lr=0.1, momentum=0.9 if name == "sgd" else 0.0))
    assert opt.param_groups[0]["lr"] == 0.1


def test_schedules():
    f = lr_lambda(ScheduleSection(name="cosine", warmup_steps=10, min_lr_ratio=0.1), 110)
    assert f(0) == pytest.approx(1 / 11) and f(9) == pytest.approx(10 / 11)
    assert f(10) == pytest.approx(1.0) and f(60) == pytest.approx(0.55) and f(110) == pytest.approx(0.1)
    lin = lr_lambda(ScheduleSection(name="linear", warmup_ratio=0.1), 100)
    assert lin(10) == pytest.approx(1.0) and lin(55) == pytest.approx(0.5) and lin(100) == 0.0
    step = lr_lambda(ScheduleSection(name="step", step_size=10, gamma=0.5), 100)
    assert step(9) == 1.0 and step(10) == 0.5 and step(25) == 0.25
    one = lr_lambda(ScheduleSection(name="onecycle", pct_start=0.3), 100)
    assert one(0) == pytest.approx(0.04) and one(30) == pytest.approx(1.0) and one(100) < 1e-5
    assert lr_lambda(ScheduleSection(name="constant"), 100)(50) == 1.0
    assert all(math.isfinite(f(s)) for s in range(200))


def _train_once(tmp_path, batch_size, grad_accum, labels, name):
    torch.manual_seed(0)
    model = nn.Linear(4, 3)
    x = torch.randn(len(labels), 4)
    data = TensorDataset(x, torch.tensor(labels))
    trainer = Trainer(model, ClassificationTask(LossSection(), num_classes=3), data,
                      optim=OptimSection(name="sgd", lr=1.0, fused=False),
                      train=TrainSection(max_steps=1, batch_size=batch_size, grad_accum=grad_accum),
                      output_dir=tmp_path / name)
    trainer.fit()
    return model.weight.detach().clone()


def test_accumulation_normalises_by_total_target_count(tmp_path):
    # 8 examples, 3 of them ignored (-100): the two micro-batches hold different numbers of targets
    labels = [0, 1, 2, 0, 1, -100, -100, -100]
    big = _train_once(tmp_path, 8, 1, labels, "big")
    accum = _train_once(tmp_path, 4, 2, labels, "accum")
    assert torch.allclose(big, accum, atol=1e-6)

    # the mean of the two micro-batch means (the common bug) gives a different update
    torch.manual_seed(0)
    model = nn.Linear(4, 3)
    w0 = model.weight.detach().clone()
    x, y = torch.randn(8, 4), torch.tensor(labels)
    order = torch.randperm(8, generator=torch.Generator().manual_seed(0))
    means = [nn.functional.cross_entropy(model(x[idx]), y[idx]) for idx in (order[:4], order[4:])]
    counts = [(y[idx] != -100).sum().item() for idx in (order[:4], order[4:])]
    assert counts[0] != counts[1]
    (sum(means) / 2).backward()
    mean_of_means = w0 - 1.0 * model.weight.grad
    assert not torch.allclose(big, mean_of_means, atol=1e-4)


def test_one_warmup_setting_and_a_warning_when_it_covers_the_run(capsys):
    from tunelab.config import load_config

    base = {"model": {"name": "cnn"}, "data": {"name": "digits"}}
    with pytest.raises(ConfigError, match="set one of schedule.warmup_steps and schedule.warmup_ratio"):
        load_config({**base, "schedule": {"name": "cosine", "warmup_steps": 5, "warmup_ratio": 0.1}})
    with pytest.raises(ConfigError, match="onecycle` has its own warm-up"):
        load_config({**base, "schedule": {"name": "onecycle", "warmup_steps": 5}})
    lr_lambda(ScheduleSection(name="cosine", warmup_steps=100), 6)
    assert "the warm-up (100 steps) covers the whole run (6 steps)" in capsys.readouterr().err
