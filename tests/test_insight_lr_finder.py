"""LR range test: restores the model and optimizer, suggests a sane LR, CLI and `optim.lr: auto`."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn as nn
import yaml

from tunelab.cli import main
from tunelab.config import OptimSection, load_config
from tunelab.data.base import TensorDataset
from tunelab.errors import ConfigError
from tunelab.insight.lr_finder import lr_range_test, min_div10_lr, steepest_lr, valley_lr
from tunelab.tasks.classification import ClassificationTask

torch.set_num_threads(1)


def _blobs(n: int = 256) -> TensorDataset:
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(4, 8, generator=torch.Generator().manual_seed(1)) * 3
    y = torch.randint(0, 4, (n,), generator=g)
    return TensorDataset(centres[y] + 2.0 * torch.randn(n, 8, generator=g), y)  # overlapping classes


def test_range_test_restores_model_optimizer_and_rng():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 4))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(4, 8)).sum().backward()
    opt.step()
    opt.zero_grad()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    momentum = [s["momentum_buffer"].clone() for s in opt.state.values()]
    rng = torch.get_rng_state()
    result = lr_range_test(
        model,
        ClassificationTask(num_classes=4),
        _blobs(),
        optim=OptimSection(name="sgd", momentum=0.9),
        batch_size=32,
        num_steps=40,
        start_lr=1e-5,
        end_lr=100.0,
        optimizer=opt,
    )
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    for s, m in zip(opt.state.values(), momentum):
        assert torch.equal(s["momentum_buffer"], m)
    assert torch.equal(torch.get_rng_state(), rng)
    assert result.diverged  # lr 100 on SGD blows up, and the sweep stops there
    assert len(result.lrs) < 40 and result.lrs == sorted(result.lrs)
    assert all(math.isfinite(v) for v in result.smoothed)
    assert 1e-3 < result.suggestion < 10  # neither the flat start nor the divergence


def test_rules_on_a_synthetic_curve():
    lrs = [10 ** (-6 + 6 * i / 99) for i in range(100)]
    # a loss that falls around lr=1e-3 (a sigmoid in log-lr) and rises again past 1e-1
    loss = [
        2 - 1.5 / (1 + math.exp(-3 * (math.log10(lr) + 3))) + (max(0, math.log10(lr) + 1) ** 2) for lr in lrs
    ]
    steep = steepest_lr(lrs, loss, skip_start=5)
    assert 5e-4 < steep < 2e-3
    low = min(range(100), key=lambda i: loss[i])
    assert min_div10_lr(lrs, loss) == pytest.approx(lrs[low] / 10)
    assert lrs[0] < valley_lr(lrs, loss) < lrs[low]


def test_bad_arguments_are_config_errors():
    model = nn.Linear(8, 4)
    with pytest.raises(ConfigError, match="start_lr < end_lr"):
        lr_range_test(
            model, ClassificationTask(num_classes=4), _blobs(), optim=OptimSection(), start_lr=1.0, end_lr=0.1
        )
    with pytest.raises(ConfigError, match="unknown rule"):
        lr_range_test(model, ClassificationTask(num_classes=4), _blobs(), optim=OptimSection(), rule="magic")


def test_cli_lr_find_writes_curve_and_json(tmp_path, capsys):
    rc = main(["lr-find", "recipes/digits-cnn.yaml", "--steps", "30", "--output", str(tmp_path)])
    assert rc == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    saved = json.loads((tmp_path / "lr_finder.json").read_text())
    assert printed["suggestion"] == saved["suggestion"] > 0
    assert (tmp_path / "lr_finder.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(saved["lrs"]) == len(saved["smoothed"]) <= 30


def test_optim_lr_auto_trains_with_the_suggestion(tmp_path):
    from tunelab.run import train

    out = tmp_path / "auto"
    cfg = load_config(
        "recipes/digits-cnn.yaml",
        [
            "optim.lr=auto",
            "train.max_steps=10",
            f"output.dir={out}",
            "output.tensorboard=false",
            "output.progress=false",
            "doctor.enabled=false",
        ],
    )
    train(cfg, log=lambda m: None)
    suggestion = json.loads((out / "lr_finder.json").read_text())["suggestion"]
    used = yaml.safe_load((out / "config.yaml").read_text())["optim"]["lr"]
    assert used == pytest.approx(suggestion)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    first = next(r for r in records if r["event"] == "train")
    assert first["lr"] <= suggestion  # the schedule starts from it (warmup)
    assert "LR range test" in (out / "report.html").read_text()
