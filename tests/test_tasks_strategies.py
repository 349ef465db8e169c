import pytest
import torch
import torch.nn as nn

from tunelab.config import (
    EarlyStoppingSection,
    EvalSection,
    LossSection,
    OptimSection,
    TrainSection,
    load_config,
)
from tunelab.data.base import TensorDataset
from tunelab.engine import Trainer
from tunelab.models import create_model
from tunelab.strategies import build_strategy, layer_groups
from tunelab.tasks import build_task


def _fit(model, task, train, val, tmp_path, lr=1e-2, **train_kw):
    trainer = Trainer(model, task, train, val, optim=OptimSection(name="adamw", lr=lr),
                      train=TrainSection(**{"max_steps": 60, "batch_size": 32, **train_kw}),
                      eval=EvalSection(), output_dir=tmp_path)
    summary = trainer.fit()
    return trainer, summary


def test_regression_metrics(tmp_path):
    torch.manual_seed(0)
    x = torch.randn(512, 4)
    y = x @ torch.tensor([1.0, -2.0, 0.5, 3.0]) + 0.1 * torch.randn(512)
    task = build_task("regression", loss=LossSection(name="huber"))
    trainer, summary = _fit(nn.Linear(4, 1), task, TensorDataset(x[:400], y[:400]),
                            TensorDataset(x[400:], y[400:]), tmp_path, lr=0.1, max_steps=150)
    m = summary["metrics"]
    assert m["r2"] > 0.9 and m["mse"] < 1.0 and m["mae"] < 1.0 and set(m) >= {"loss", "mse", "mae", "r2"}


def test_multilabel(tmp_path):
    torch.manual_seed(0)
    x = torch.randn(600, 6)
    y = torch.stack([x[:, 0] > 0, x[:, 1] + x[:, 2] > 0, x[:, 3] < -0.5], dim=1).float()
    task = build_task("multilabel", loss=LossSection(), num_labels=3)
    _, summary = _fit(nn.Linear(6, 3), task, TensorDataset(x[:500], y[:500]), TensorDataset(x[500:], y[500:]),
                      tmp_path, max_steps=150)
    assert summary["metrics"]["accuracy"] > 0.85 and "f1_macro" in summary["metrics"]


def test_bf16_autocast_on_cpu(tmp_path):
    torch.manual_seed(0)
    x, y = torch.randn(256, 8), torch.randint(0, 3, (256,))
    task = build_task("classification", loss=LossSection(), num_classes=3)
    trainer, summary = _fit(nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3)), task,
                            TensorDataset(x, y), TensorDataset(x, y), tmp_path, max_steps=5, precision="bf16")
    assert trainer.autocast_dtype == torch.bfloat16 and summary["status"] == "completed"


def test_early_stopping_restores_best(tmp_path):
    torch.manual_seed(0)
    # labels are noise: validation loss gets worse as the model memorises the training set
    x, y = torch.randn(64, 32), torch.randint(0, 2, (64,))
    xv, yv = torch.randn(64, 32), torch.randint(0, 2, (64,))
    task = build_task("classification", loss=LossSection(), num_classes=2)
    model = nn.Sequential(nn.Linear(32, 256), nn.ReLU(), nn.Linear(256, 2))
    trainer = Trainer(model, task, TensorDataset(x, y), TensorDataset(xv, yv),
                      optim=OptimSection(name="adam", lr=1e-2),
                      train=TrainSection(max_steps=200, batch_size=16), eval=EvalSection(every=4),
                      early_stopping=EarlyStoppingSection(enabled=True, monitor="loss", patience=3),
                      output_dir=tmp_path)
    summary = trainer.fit()
    es = summary["early_stopping"]
    assert summary["status"] == "stopped_early" and summary["global_step"] < 200
    assert es["stopped_step"] == summary["global_step"] and es["best_step"] < es["stopped_step"]
    assert summary["metrics"]["loss"] == __import__("pytest").approx(es["best"], rel=1e-5)


def test_layer_groups_and_strategies():
    model = create_model("cnn", num_classes=4)
    groups = layer_groups(model)
    assert groups[-1] == ["fc.weight", "fc.bias"] and groups[0][0] == "features.0.weight"
    cfg = load_config({"model": {"name": "cnn"}, "data": {"name": "digits"},
                       "strategy": {"name": "finetune", "freeze_epochs": 1, "lr_decay": 0.5}})
    strategy = build_strategy(cfg)
    model, scales = strategy.setup(model)
    assert scales["fc.weight"] == 1.0 and scales["features.0.weight"] < scales["features.4.weight"] < 1.0
    strategy.on_epoch_start(model, 0)
    model.train()
    strategy.on_train_mode(model)
    assert [n for n, p in model.named_parameters() if p.requires_grad] == ["fc.weight", "fc.bias"]
    assert not model.features[1].training  # frozen BatchNorm keeps its running statistics
    strategy.on_epoch_start(model, 1)
    model.train()
    strategy.on_train_mode(model)
    assert all(p.requires_grad for p in model.parameters()) and model.features[1].training


def test_layer_groups_without_numbered_parents():
    """Modules beside the blocks under one parent (BERT's pooler, Llama's final norm) form their own
    group in model order, not the embeddings' group; the stem's modules merge into one group."""
    import torchvision
    from transformers import BertConfig, BertForSequenceClassification

    bert = BertForSequenceClassification(
        BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32)
    )
    groups = layer_groups(bert)
    assert [g[0] for g in groups] == [
        "bert.embeddings.word_embeddings.weight",
        "bert.encoder.layer.0.attention.self.query.weight",
        "bert.encoder.layer.1.attention.self.query.weight",
        "bert.pooler.dense.weight",
        "classifier.weight",
    ]
    assert all(n.startswith("bert.embeddings.") for n in groups[0])
    resnet = layer_groups(torchvision.models.resnet18(num_classes=2))
    assert resnet[0] == ["conv1.weight", "bn1.weight", "bn1.bias"] and len(resnet) == 10
    assert resnet[1][0] == "layer1.0.conv1.weight" and resnet[-1] == ["fc.weight", "fc.bias"]


def test_gradual_unfreeze_and_llrd():
    model = create_model("mlp", in_features=8, hidden=[8, 8], num_classes=2)
    base = {"model": {"name": "mlp"}, "data": {"name": "digits"}}
    gu = build_strategy(load_config({**base, "strategy": {"name": "gradual_unfreeze", "every": 1}}))
    gu.setup(model)
    counts = []
    for epoch in range(4):
        gu.on_epoch_start(model, epoch)
        counts.append(sum(p.requires_grad for p in model.parameters()))
    assert counts == sorted(counts) and counts[0] == 2 and counts[-1] == len(list(model.parameters()))
    _, scales = build_strategy(load_config({**base, "strategy": {"name": "layerwise_lr", "lr_decay": 0.5}})).setup(model)
    assert sorted(set(scales.values())) == [0.25, 0.5, 1.0]


def test_lora_checkpoints_hold_only_the_adapters_and_resume_exactly(tmp_path):
    import shutil

    from safetensors.torch import load_file

    from tunelab.run import train

    def config(out):
        return load_config({
            "name": "lora-digits", "model": {"name": "cnn", "num_classes": 10, "width": 8},
            "data": {"name": "digits", "val_fraction": 0.2}, "task": {"name": "classification"},
            "strategy": {"name": "lora", "r": 2, "dropout": 0.1, "target_modules": ["fc"]},
            "optim": {"name": "adamw", "lr": 1e-2},
            "train": {"max_steps": 6, "batch_size": 32, "checkpoint_every": 3, "log_every": 1},
            "eval": {"every": 3},
            "output": {"dir": str(out), "progress": False, "tensorboard": False},
            "doctor": {"enabled": False}, "report": {"enabled": False},
        })  # fmt: skip

    full = tmp_path / "full"
    s_full = train(config(full))
    saved = load_file(str(full / "checkpoints" / "step-3" / "model.safetensors"))
    # adapters and BatchNorm buffers; the frozen conv/linear base weights are not in the checkpoint
    assert any("lora_" in k for k in saved) and all("lora_" in k or "running_" in k or "batches" in k for k in saved)
    part = tmp_path / "part"
    shutil.copytree(full, part)
    shutil.rmtree(part / "checkpoints" / "step-6")
    shutil.rmtree(part / "final")
    s_part = train(config(part), resume=True)
    assert s_part["global_step"] == 6
    assert s_part["metrics"]["loss"] == s_full["metrics"]["loss"]
    a = load_file(str(full / "checkpoints" / "step-6" / "model.safetensors"))
    b = load_file(str(part / "checkpoints" / "step-6" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


class _Augmented(torch.utils.data.Dataset):
    """Random augmentation from torch, random and numpy RNGs, as image transforms draw it."""

    def __init__(self, n: int = 40):
        g = torch.Generator().manual_seed(0)
        self.x, self.y = torch.randn(n, 6, generator=g), torch.randint(0, 3, (n,), generator=g)

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        import random

        import numpy as np

        noise = torch.randn(6) * 0.1 + random.random() * 0.01 + float(np.random.rand()) * 0.01
        return {"inputs": self.x[i] + noise, "labels": self.y[i]}


def test_workers_resume_exactly_across_epoch_boundaries(tmp_path):
    """Two DataLoader workers live for the whole run (one iterator over every epoch's batches); a run
    resumed mid-epoch sees the same augmented samples and ends with the same weights."""
    import shutil

    from tunelab.engine.trainer import Trainer
    from tunelab.tasks.base import build_task

    def fit(out, resume=False):
        cfg = load_config({
            "model": {"name": "linear"}, "data": {"name": "digits"},
            "optim": {"name": "adamw", "lr": 1e-2},
            "train": {"max_steps": 12, "batch_size": 8, "num_workers": 2, "checkpoint_every": 7, "log_every": 1},
            "output": {"dir": str(out), "progress": False, "tensorboard": False},
            "doctor": {"enabled": False}, "report": {"enabled": False},
        })  # fmt: skip
        torch.manual_seed(0)
        model = torch.nn.Linear(6, 3)
        trainer = Trainer(model, build_task("classification", num_classes=3), _Augmented(), None, config=cfg, output_dir=out)
        trainer.fit(resume=resume)
        return model, trainer

    full = tmp_path / "full"
    model_full, trainer = fit(full)  # 5 batches an epoch: 12 steps cross two epoch boundaries
    assert trainer.epoch == 2 and trainer.global_step == 12
    part = tmp_path / "part"
    shutil.copytree(full / "checkpoints" / "step-7", part / "checkpoints" / "step-7")
    model_part, _ = fit(part, resume=True)
    for a, b in zip(model_full.state_dict().values(), model_part.state_dict().values()):
        assert torch.equal(a, b)
    from tunelab.engine.batches import SeededSamples

    seeded = SeededSamples(_Augmented(), seed=0)  # index 3 in epochs 0, 0 and 1: same, same, different
    a, b, c = (seeded[k]["inputs"] for k in (3, 3, 40 + 3))
    assert torch.equal(a, b) and not torch.equal(a, c)


class _Niceness(torch.utils.data.Dataset):
    """Each sample is the nice value of the process that loaded it."""

    def __len__(self):
        return 8

    def __getitem__(self, i):
        import os

        return {"inputs": torch.full((6,), float(os.nice(0))), "labels": torch.tensor(0)}


@pytest.mark.parametrize(("setting", "added"), [("auto", 19), (5, 5), (0, 0)])
def test_loader_workers_lower_their_priority_as_configured(tmp_path, setting, added):
    """`train.worker_nice`: on CPU the workers step aside for the step's compute threads by default."""
    import os

    from tunelab.engine.trainer import Trainer
    from tunelab.tasks.base import build_task

    cfg = load_config({
        "model": {"name": "linear"}, "data": {"name": "digits"},
        "train": {"max_steps": 2, "batch_size": 4, "num_workers": 2, "worker_nice": setting, "device": "cpu"},
        "output": {"dir": str(tmp_path), "progress": False, "tensorboard": False},
        "doctor": {"enabled": False}, "report": {"enabled": False},
    })  # fmt: skip
    trainer = Trainer(nn.Linear(6, 3), build_task("classification", num_classes=3), _Niceness(), _Niceness(),
                      config=cfg, output_dir=tmp_path)
    parent = os.nice(0)
    want = min(19, parent + added)
    trainer.sampler = trainer._train_sampler()  # what fit() sets up first
    window = next(trainer._windows())
    assert window.batches[0]["inputs"].unique().tolist() == [want]
    assert {b["inputs"][0, 0].item() for b in trainer._make_eval_loader(trainer.eval_data)} == {want}
    assert os.nice(0) == parent  # the training process keeps its priority
    assert cfg.train.resolved_worker_nice("cuda") == (0 if setting == "auto" else setting)
