"""Vision fine-tuning pieces on their own: backbones and heads, image sources, soft-target task, report."""

from __future__ import annotations

import csv
import importlib.util
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from PIL import Image

from tunelab.config import load_config
from tunelab.data.base import build_data
from tunelab.data.images import (
    ImageDataset,
    collate_images,
    predict_images,
    write_report,
)
from tunelab.errors import ConfigError, DataError, TunelabError
from tunelab.models import create_model
from tunelab.models.vision import backbone_preset, use_channels_last
from tunelab.tasks.image_classification import ImageClassificationTask


@pytest.fixture(scope="module")
def hymenoptera(shared_data: Path) -> Path:
    return shared_data / "images" / "hymenoptera_data"


def _cfg(data: dict, model: dict | None = None, task: dict | None = None):
    return load_config(
        {
            "model": model or {"name": "torchvision:resnet18", "num_classes": 2},
            "data": data,
            "task": task or {"name": "classification"},
        }
    )


def _make_folder(root: Path, classes: dict[str, int], size: int = 40) -> Path:
    for c, (name, n) in enumerate(classes.items()):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            Image.new("RGB", (size + i, size), (60 * c, 100, 30 * i)).save(root / name / f"{i}.png")
    return root


# -- models ----------------------------------------------------------------------------------------------
def test_torchvision_head_replaced_and_named():
    model = create_model("torchvision:resnet18", num_classes=3)
    assert model.fc.out_features == 3 and model.fc.in_features == 512
    assert model.tunelab_head_patterns == ["fc.*"]
    assert model(torch.randn(2, 3, 64, 64)).shape == (2, 3)
    other = create_model("torchvision:mobilenet_v3_small", num_classes=4)
    assert other.tunelab_head_patterns == ["classifier.3.*"]
    assert other.classifier[3].out_features == 4


def test_channels_last_same_outputs():
    torch.manual_seed(0)
    plain = create_model("torchvision:resnet18", num_classes=2, channels_last=False).eval()
    fast = create_model("torchvision:resnet18", num_classes=2, channels_last=True).eval()
    fast.load_state_dict(plain.state_dict())
    assert plain.conv1.weight.is_contiguous()  # NCHW, so the comparison is between the two layouts
    assert fast.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    x = torch.randn(2, 3, 64, 64)
    torch.testing.assert_close(fast(x), plain(x), rtol=1e-4, atol=1e-4)


def test_channels_last_is_the_default_for_convnets_only():
    """`channels_last` unset: on for a CNN (faster convolutions), off for a model with one conv (a ViT's
    patch embedding) or none; an explicit false keeps the contiguous layout."""
    net = create_model("torchvision:resnet18", num_classes=2)
    assert net.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    assert not net.conv1.weight.is_contiguous()
    off = create_model("torchvision:resnet18", num_classes=2, channels_last=False)
    assert off.conv1.weight.is_contiguous()
    one_conv = use_channels_last(torch.nn.Sequential(torch.nn.Conv2d(3, 8, 4, stride=4), torch.nn.Flatten()), None)
    assert one_conv[0].weight.is_contiguous()
    two = use_channels_last(torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.Conv2d(8, 8, 3)), None)
    assert two[0].weight.is_contiguous(memory_format=torch.channels_last)
    assert two(torch.randn(1, 3, 8, 8)).is_contiguous(memory_format=torch.channels_last)  # the hook converts inputs


def test_fsdp_shards_a_channels_last_convnet(tmp_path):
    """FSDP2 refuses non-contiguous parameters: the sharded engine turns NHWC weights back, same outputs."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    from tunelab.config import DistributedSection
    from tunelab.engine.fsdp import shard

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(), torch.nn.Conv2d(8, 4, 3),
                              torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())  # fmt: skip
    x = torch.randn(2, 3, 12, 12)
    expected = net(x)
    use_channels_last(net, None)
    assert not all(p.is_contiguous() for p in net.parameters())
    dist.init_process_group("gloo", rank=0, world_size=1, init_method=f"file://{tmp_path / 'rdzv'}")
    try:
        mesh = init_device_mesh("cpu", (1,))
        shard(net, mesh, DistributedSection(strategy="fsdp"), None)
        out = net(x)
        out.sum().backward()
        torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    finally:
        dist.destroy_process_group()


def test_bad_model_names_and_weights():
    with pytest.raises(ConfigError, match="did you mean `resnet18`"):
        create_model("torchvision:resnet81")
    with pytest.raises(ConfigError, match="IMAGENET1K_V1"):
        create_model("torchvision:resnet18", weights="IMAGENET")
    with pytest.raises(ConfigError, match="num_classes"):
        create_model("torchvision:resnet18", num_classes=0)


@pytest.mark.skipif(importlib.util.find_spec("timm") is not None, reason="checks the message without timm")
def test_timm_missing_is_a_clear_error():
    with pytest.raises(TunelabError, match="needs timm"):
        create_model("timm:resnet18", num_classes=2)


def test_backbone_preset():
    from tunelab.data.images import Preset
    from tunelab.registry import model_hint

    p = Preset(**backbone_preset("torchvision:resnet18"))
    assert (p.crop_size, p.resize_size) == (224, 256)
    assert p.mean == pytest.approx((0.485, 0.456, 0.406))
    assert (p.scaled(112).crop_size, p.scaled(112).resize_size) == (112, 128)
    assert backbone_preset("cnn") is None and Preset().crop_size == 224  # ImageNet defaults otherwise
    # the image data sources ask through the registry, importing no model code
    assert model_hint("torchvision:resnet18", {}, "image_preset") == backbone_preset("torchvision:resnet18")


# -- data sources ----------------------------------------------------------------------------------------
def test_image_folder_on_hymenoptera(hymenoptera):
    cfg = _cfg(
        {"name": "image_folder", "root": str(hymenoptera), "image_size": 64, "auto_augment": "trivial"}
    )
    with pytest.warns(UserWarning, match="imageNotFound.gif"):
        bundle = build_data(cfg)
    assert bundle.label_names == ["ants", "bees"] and bundle.num_classes == 2
    assert bundle.info["images"] == {"train": 244, "eval": 153}
    assert bundle.info["skipped"]["other_extension"]["count"] == 1
    sample = bundle.train[0]
    assert sample["inputs"].shape == (3, 64, 64) and sample["labels"] == 0
    assert bundle.eval[0]["inputs"].shape == (3, 64, 64)
    batch = bundle.collate_fn([bundle.eval[i] for i in (0, 1, 100)])
    assert batch["labels"].tolist() == [0, 0, 1]
    assert len(bundle.callbacks) == 1  # the end-of-run report


def test_randaugment_and_val_fraction(tmp_path):
    root = _make_folder(tmp_path / "imgs", {"cat": 6, "dog": 4})
    cfg = _cfg(
        {
            "name": "image_folder",
            "root": str(root),
            "image_size": 32,
            "auto_augment": "randaugment",
            "color_jitter": 0.2,
            "random_erasing": 0.5,
            "val_fraction": 0.3,
        }
    )
    bundle = build_data(cfg)
    assert bundle.info["images"] == {"train": 7, "eval": 3}
    assert bundle.train[0]["inputs"].shape == (3, 32, 32)
    assert set(bundle.train.paths).isdisjoint(bundle.eval.paths)


def test_undecodable_files_skipped_counted_or_error(tmp_path):
    root = _make_folder(tmp_path / "imgs", {"a": 2, "b": 2})
    (root / "a" / "broken.jpg").write_bytes(b"this is not a jpeg")
    cfg = _cfg({"name": "image_folder", "root": str(root), "image_size": 32})
    with pytest.warns(UserWarning, match="broken.jpg"):
        bundle = build_data(cfg)
    assert bundle.info["skipped"]["undecodable"]["count"] == 1
    assert len(bundle.train) == 4
    cfg = _cfg({"name": "image_folder", "root": str(root), "on_bad_image": "error"})
    with pytest.raises(DataError, match="broken.jpg.*not a decodable image"):
        build_data(cfg)


def test_decode_failure_at_load_time_is_dropped_from_the_batch(tmp_path):
    root = _make_folder(tmp_path / "imgs", {"a": 2})
    bad = root / "a" / "late.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"0" * 20)
    ds = ImageDataset([root / "a" / "0.png", bad], [0, 0], lambda im: torch.zeros(3, 4, 4))
    with pytest.warns(UserWarning, match="late.png"):
        batch = collate_images([ds[0], ds[1]])
    assert batch["inputs"].shape == (1, 3, 4, 4)
    assert batch["index"].tolist() == [0]


def test_bad_layouts_are_clear_errors(tmp_path):
    flat = tmp_path / "flat"
    flat.mkdir()
    Image.new("RGB", (8, 8)).save(flat / "x.png")
    with pytest.raises(DataError, match="no class sub-folders"):
        build_data(_cfg({"name": "image_folder", "root": str(flat)}))
    root = _make_folder(tmp_path / "imgs", {"a": 2})
    (root / "empty").mkdir()
    with pytest.raises(DataError, match="class folder .*empty.* has no images"):
        build_data(_cfg({"name": "image_folder", "root": str(root)}))


def test_num_classes_mismatch(tmp_path):
    root = _make_folder(tmp_path / "imgs", {"a": 2, "b": 2})
    cfg = _cfg(
        {"name": "image_folder", "root": str(root)}, model={"name": "torchvision:resnet18", "num_classes": 3}
    )
    with pytest.raises(ConfigError, match="model.num_classes` = 3.*2 classes.*num_classes: 2"):
        build_data(cfg)
    # unset, the head and the mixup task get the data's class count, and config.yaml records it
    from tunelab.run import build_run

    cfg = _cfg(
        {"name": "image_folder", "root": str(root)},
        model={"name": "torchvision:resnet18"},
        task={"name": "image_classification", "mixup_alpha": 0.2},
    )
    run = build_run(cfg, log=lambda m: None)
    assert run.model.fc.out_features == 2 and cfg.model.kwargs["num_classes"] == 2
    assert run.task.num_classes == 2 and run.task.mixer.num_classes == 2


def test_image_csv(tmp_path, hymenoptera):
    rows = [("train/ants/0013035.jpg", "ant"), ("train/bees/16838648_415acd9e3f.jpg", "bee")]
    train_csv = tmp_path / "train.csv"
    with open(train_csv, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "label"])
        w.writerows(rows * 3)
    cfg = _cfg(
        {
            "name": "image_csv",
            "train_csv": str(train_csv),
            "eval_csv": str(train_csv),
            "image_root": str(hymenoptera),
            "image_size": 32,
        }
    )
    bundle = build_data(cfg)
    assert bundle.label_names == ["ant", "bee"]
    assert bundle.train.labels == [0, 1] * 3 and len(bundle.eval) == 6
    with open(train_csv, "a", newline="") as f:
        csv.writer(f).writerow(["train/ants/missing.jpg", "ant"])
    with pytest.raises(DataError, match=r"train.csv line 8: image `train/ants/missing.jpg` not found"):
        build_data(cfg)
    with pytest.raises(DataError, match="nope.csv.*not found"):
        build_data(_cfg({"name": "image_csv", "train_csv": str(tmp_path / "nope.csv")}))


# -- soft-target task ------------------------------------------------------------------------------------
def test_mixup_task_soft_targets():
    torch.manual_seed(0)
    task = ImageClassificationTask(num_classes=3, mixup_alpha=0.4, cutmix_alpha=1.0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 3))
    batch = {"inputs": torch.randn(6, 3, 8, 8), "labels": torch.tensor([0, 1, 2, 0, 1, 2])}
    assert task.count_targets(batch) == 6
    out = task.forward(model.train(), batch)
    soft = batch["soft_labels"]
    assert soft.shape == (6, 3) and torch.allclose(soft.sum(-1), torch.ones(6))
    assert not torch.equal(soft, torch.nn.functional.one_hot(batch["labels"], 3).float())
    expected = -(soft * torch.log_softmax(out, -1)).sum()
    torch.testing.assert_close(task.loss_sum(out, batch), expected)
    out = task.forward(model.eval(), batch)  # evaluation: hard labels, no mixing
    assert "soft_labels" not in batch
    torch.testing.assert_close(
        task.loss_sum(out, batch), torch.nn.functional.cross_entropy(out, batch["labels"], reduction="sum")
    )
    from tunelab.config import LossSection

    with pytest.raises(ConfigError, match="class_weights"):
        ImageClassificationTask(LossSection(class_weights=[1, 2, 3]), num_classes=3, mixup_alpha=0.2)


# -- report and predictor --------------------------------------------------------------------------------
def test_write_report(tmp_path):
    ds = ImageDataset([f"img{i}.jpg" for i in range(4)], [0, 0, 1, 1], lambda im: im)
    probs = torch.tensor([[0.9, 0.1], [0.2, 0.8], [0.4, 0.6], [0.97, 0.03]])
    result = write_report(tmp_path, ds, ["ants", "bees"], [0, 1, 2, 3], probs)
    assert result["accuracy"] == 0.5
    assert result["confusion_matrix"] == [[1, 1], [1, 1]]
    assert result["precision_per_class"] == {"ants": 0.5, "bees": 0.5}
    png = (tmp_path / "confusion_matrix.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    with open(tmp_path / "misclassified.csv") as f:
        wrong = list(csv.DictReader(f))
    assert [r["path"] for r in wrong] == ["img3.jpg", "img1.jpg"]  # most confident first
    assert wrong[0]["label"] == "bees" and wrong[0]["predicted"] == "ants"
    assert len((tmp_path / "eval_predictions.csv").read_text().splitlines()) == 5


def test_predictor(hymenoptera, tmp_path):
    cfg = _cfg({"name": "image_folder", "root": str(hymenoptera), "image_size": 32})
    model = create_model("torchvision:resnet18", num_classes=2)
    task = ImageClassificationTask(num_classes=2)
    run = SimpleNamespace(cfg=cfg, model=model, task=task, data=SimpleNamespace(label_names=["ants", "bees"]))
    images = sorted((hymenoptera / "val" / "bees").glob("*.jpg"))[:3]
    out = predict_images(run, SimpleNamespace(image=[str(p) for p in images]))
    assert [r["image"] for r in out] == [str(p) for p in images]
    for r in out:
        assert r["label"] in ("ants", "bees")
        assert sum(r["probabilities"].values()) == pytest.approx(1.0, abs=1e-4)
        assert r["probability"] == max(r["probabilities"].values())
    not_image = tmp_path / "notes.jpg"
    not_image.write_text("hello")
    with pytest.raises(DataError, match="notes.jpg.*not a decodable image"):
        predict_images(run, SimpleNamespace(image=[str(not_image)]))
    with pytest.raises(DataError, match="nope.jpg` not found"):
        predict_images(run, SimpleNamespace(image=[str(tmp_path / "nope.jpg")]))


# -- staged unfreezing through the engine ----------------------------------------------------------------
def _body_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items() if not k.startswith("fc.")}


def test_finetune_probe_then_unfreeze_with_discriminative_lrs(tmp_path):
    from tunelab.callbacks import Callback
    from tunelab.run import build_run, make_trainer

    class AfterProbe(Callback):
        def on_epoch_start(self, trainer, epoch):
            if epoch == 1:
                self.body = _body_state(trainer.raw_model)
                self.head = trainer.raw_model.fc.weight.detach().clone()

    root = _make_folder(tmp_path / "imgs", {"a": 8, "b": 8})
    cfg = load_config(
        {
            "model": {"name": "torchvision:resnet18", "num_classes": 2},
            "data": {"name": "image_folder", "root": str(root), "image_size": 32, "val_fraction": 0.25},
            "optim": {"name": "sgd", "lr": 0.05, "momentum": 0.9},
            "strategy": {"name": "finetune", "freeze_epochs": 1, "lr_decay": 0.5},
            "train": {"epochs": 2, "batch_size": 6},
            "output": {"dir": str(tmp_path / "run"), "progress": False},
        }
    )
    run = build_run(cfg, log=lambda *_: None)
    start, head_start = _body_state(run.model), run.model.fc.weight.detach().clone()
    probe = AfterProbe()
    trainer = make_trainer(run, [probe])
    trainer.fit()
    # epoch 0 is the linear probe: the body (weights and BatchNorm statistics) stays as loaded
    assert all(torch.equal(start[k], probe.body[k]) for k in start if not k.endswith("num_batches_tracked"))
    assert not torch.equal(head_start, probe.head)
    # epoch 1 trains everything; BatchNorm statistics move again; earlier layers get smaller LRs
    assert not torch.equal(probe.body["conv1.weight"], run.model.conv1.weight)
    assert not torch.equal(probe.body["bn1.running_mean"], run.model.bn1.running_mean)
    names = {id(p): n for n, p in run.model.named_parameters()}
    lr_of = {
        names[id(p)]: g.get("initial_lr", g["lr"])
        for g in trainer.optimizer.param_groups
        for p in g["params"]
    }
    assert lr_of["conv1.weight"] < lr_of["layer4.1.conv2.weight"] < lr_of["fc.weight"] == 0.05
    assert (tmp_path / "run" / "confusion_matrix.png").is_file()
