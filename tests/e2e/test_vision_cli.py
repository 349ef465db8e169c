"""Acceptance for vision fine-tuning, through the CLI on the real hymenoptera photos.

No ImageNet weights can be downloaded here, so the test writes its own checkpoint in torchvision's format
(a `resnet18` state dict, 1000-class head): random convolutions whose BatchNorm statistics were measured
on a few training images, as any real checkpoint's are. `tunelab train` loads it with a 2-class head (the
load report names the skipped `fc.*`), runs two epochs of linear probe and one unfrozen epoch, and writes the
confusion matrix and predictions; `tunelab predict` labels images from the run.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
RECIPE = REPO / "recipes" / "hymenoptera-resnet18.yaml"
SIZE = 48  # small images keep the CPU run short


def tunelab(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run(
        [sys.executable, "-m", "tunelab.cli", *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
        timeout=900,
    )


def write_torchvision_checkpoint(path: Path, images: Path) -> dict[str, torch.Tensor]:
    """A torchvision resnet18 state dict (1000 classes) with BatchNorm statistics from real images."""
    import torchvision
    from PIL import Image
    from torchvision.transforms import v2 as T

    torch.manual_seed(0)
    model = torchvision.models.resnet18()
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.momentum = None  # cumulative average over the calibration batch
    tf = T.Compose(
        [
            T.Resize(SIZE * 8 // 7),
            T.CenterCrop(SIZE),
            T.ToImage(),
            T.ToDtype(torch.float32, scale=True),
            T.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225]),
        ]
    )
    files = sorted(images.glob("train/*/*.jpg"))[::4]
    with torch.no_grad():
        model.train()(torch.stack([tf(Image.open(f).convert("RGB")) for f in files]))
    state = model.state_dict()
    torch.save(state, path)
    return state


@pytest.fixture(scope="module")
def finetuned(tmp_path_factory, shared_data):
    images = shared_data / "images" / "hymenoptera_data"
    tmp = tmp_path_factory.mktemp("vision")
    ckpt = tmp / "resnet18-torchvision.pth"
    state = write_torchvision_checkpoint(ckpt, images)
    run_dir = tmp / "run"
    result = tunelab(
        "train", str(RECIPE),
        "model.weights=null", f"pretrained.path={ckpt}", "pretrained.allow_missing=[fc.*]",
        f"data.root={images}", f"data.image_size={SIZE}", "data.crop_scale=[0.5,1.0]",
        "strategy.freeze_epochs=2", "train.epochs=3", "train.batch_size=32", "train.num_workers=0",
        "optim.name=adamw", "optim.lr=0.003", "optim.weight_decay=0", "eval.every=1000",
        f"output.dir={run_dir}", "output.progress=false",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    return run_dir, result, state, images


def test_load_report_names_the_replaced_head(finetuned):
    run_dir, result, _, _ = finetuned
    assert "fc.weight: checkpoint [1000, 512] vs model [2, 512] (skipped)" in result.stdout + result.stderr
    report = json.loads((run_dir / "load_report.json").read_text())
    assert {m["key"] for m in report["mismatched"]} == {"fc.weight", "fc.bias"}
    assert report["missing"] == [] and report["unexpected"] == []
    assert report["loaded"] == 120


def test_accuracy_above_chance_and_artefacts_written(finetuned):
    run_dir, _, state, _ = finetuned
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["epoch"] == 3
    # 153 val images, 83 bees: always answering "bees" scores 0.542
    assert summary["metrics"]["accuracy"] > 0.56, summary["metrics"]
    assert len(summary["metrics"]["precision_per_class"]) == 2
    vision = summary["vision_report"]
    assert vision["accuracy"] == pytest.approx(summary["metrics"]["accuracy"], abs=1e-6)
    assert set(vision["recall_per_class"]) == {"ants", "bees"}
    assert (run_dir / "confusion_matrix.png").read_bytes()[:4] == b"\x89PNG"
    rows = (run_dir / "eval_predictions.csv").read_text().splitlines()
    assert rows[0] == "path,label,predicted,confidence,p_label" and len(rows) == 1 + 153
    wrong = (run_dir / "misclassified.csv").read_text().splitlines()[1:]
    confidences = [float(r.split(",")[3]) for r in wrong]
    assert confidences and confidences == sorted(confidences, reverse=True)
    # the unfrozen epoch trained the body too
    from tunelab.weights import load_state_dict_file

    final = load_state_dict_file(run_dir / "final" / "model.safetensors")
    assert not torch.equal(final["conv1.weight"], state["conv1.weight"])
    assert final["fc.weight"].shape == (2, 512)


def test_predict_images(finetuned, capsys):
    from tunelab.cli import main

    run_dir, _, _, images = finetuned
    paths = [str(sorted((images / "val" / c).glob("*.jpg"))[0]) for c in ("ants", "bees")]
    assert main(["predict", str(run_dir), "--image", *paths]) == 0
    out = capsys.readouterr().out
    rows = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    assert [r["image"] for r in rows] == paths
    for r in rows:
        assert r["label"] in ("ants", "bees")
        assert sum(r["probabilities"].values()) == pytest.approx(1.0, abs=1e-4)
    table = run_dir.parent / "predictions.csv"  # one column per class, as text predictions have
    assert main(["predict", str(run_dir), "--image", *paths, "--output", str(table)]) == 0
    with open(table, newline="") as f:
        read = list(csv.DictReader(f))
    assert [r["image"] for r in read] == paths and {"prob_ants", "prob_bees"} <= set(read[0])
    assert float(read[0]["prob_ants"]) == pytest.approx(rows[0]["probabilities"]["ants"])


def test_mismatched_num_classes_is_a_clear_cli_error(tmp_path, shared_data, capsys):
    from tunelab.cli import main

    images = shared_data / "images" / "hymenoptera_data"
    args = ["train", str(RECIPE), "model.weights=null", "model.num_classes=3", f"data.root={images}",
            f"output.dir={tmp_path / 'run'}"]  # fmt: skip
    assert main(args) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("error: `model.num_classes` = 3") and "set model.num_classes: 2" in last
