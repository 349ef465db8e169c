"""Image classification data: `image_folder` (class sub-folders) and `image_csv` (`path,label` rows).

Transforms come from the backbone's own preset (the model source's `image_preset` hint: resize, centre
crop, mean/std), optionally at a smaller `image_size`; training adds random-resized-crop, flip, colour
jitter, TrivialAugment/RandAugment and random erasing as options. Decoding happens in `__getitem__`, so in
DataLoader workers when `train.num_workers > 0`.

Files that are not images never crash a run: files with other extensions are ignored, files PIL cannot
open are skipped and counted in `DataBundle.info` (or raise a DataError with `on_bad_image: error`).

Mixup/cutmix make soft targets, which the plain `classification` task does not take; they are options of
the `image_classification` task defined here (mixing happens on the device, per batch, in training only).

At the end of a run the `VisionReport` callback writes `confusion_matrix.png`, `eval_predictions.csv` and
`misclassified.csv` (the most confidently wrong eval images) into the run dir.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn as nn
from pydantic import BaseModel, ConfigDict, Field
from torch.utils.data import DataLoader, Dataset
from torch.utils.data._utils.collate import default_collate

from tunelab.callbacks import Callback
from tunelab.config import RunConfig
from tunelab.data.base import DataBundle, holdout_split, register_data, validate_options
from tunelab.errors import ConfigError, DataError, TunelabError
from tunelab.io import atomic_write
from tunelab.paths import resolve_path
from tunelab.registry import PREDICTORS, model_hint

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
EVAL_SPLIT_NAMES = ("val", "valid", "validation")
CLASSES_FILE = "classes.json"  # written into the run dir; the predictor's class names



class ImageOptions(BaseModel):
    """`data:` keys of the image sources (`name: image_folder` or `name: image_csv`)."""

    model_config = ConfigDict(extra="forbid")

    # image_folder: `root` with train/ and val/ (or class folders directly), or explicit split folders
    root: str | None = None
    train_dir: str | None = None
    eval_dir: str | None = None
    test_dir: str | None = None
    # image_csv: one CSV per split; relative image paths are resolved against `image_root` (default:
    # the CSV's folder)
    train_csv: str | None = None
    eval_csv: str | None = None
    test_csv: str | None = None
    image_root: str | None = None
    path_column: str = "path"
    label_column: str = "label"
    # both
    classes: list[str] | None = None  # class order (default: sorted names found in the train split)
    val_fraction: float = Field(0.0, ge=0.0, lt=1.0)  # carve eval out of train when there is no eval split
    extensions: list[str] = list(IMAGE_EXTENSIONS)
    on_bad_image: Literal["skip", "error"] = "skip"
    verify_images: bool = True  # open every file's header at build time to find undecodable ones
    # transforms (None: the backbone preset)
    image_size: int | None = Field(None, gt=0)
    resize_size: int | None = Field(None, gt=0)
    mean: tuple[float, float, float] | None = None
    std: tuple[float, float, float] | None = None
    # training augmentation
    augment: bool = True  # random resized crop + flip; False: the eval transform
    crop_scale: tuple[float, float] = (0.08, 1.0)
    hflip: float = Field(0.5, ge=0.0, le=1.0)
    color_jitter: float = Field(0.0, ge=0.0)
    auto_augment: Literal["trivial", "randaugment"] | None = None
    randaugment_ops: int = Field(2, gt=0)
    randaugment_magnitude: int = Field(9, ge=0, le=30)
    random_erasing: float = Field(0.0, ge=0.0, le=1.0)
    # end-of-run report
    report: bool = True
    misclassified_top_k: int = Field(25, ge=0)


IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class Preset:
    """How the model expects its images: resize the short side, centre-crop, normalise."""

    crop_size: int = 224
    resize_size: int = 256
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    interpolation: str = "bilinear"

    def scaled(self, crop_size: int) -> Preset:
        """The same preset at another crop size, keeping the resize/crop ratio (224/256 -> 0.875)."""
        resize = round(crop_size * self.resize_size / self.crop_size)
        return Preset(crop_size, resize, self.mean, self.std, self.interpolation)


# -- transforms ------------------------------------------------------------------------------------------
def _preset(cfg: RunConfig, opts: ImageOptions) -> Any:
    """The backbone's preset with the `data:` overrides applied."""
    hint = model_hint(cfg.model.name, cfg.model.kwargs, "image_preset")
    preset = Preset(**hint) if hint else Preset()
    if opts.image_size is not None:
        preset = preset.scaled(opts.image_size)
    return dataclasses.replace(
        preset,
        resize_size=opts.resize_size or preset.resize_size,
        mean=tuple(opts.mean) if opts.mean else preset.mean,
        std=tuple(opts.std) if opts.std else preset.std,
    )


def build_transforms(cfg: RunConfig, opts: ImageOptions) -> tuple[Callable, Callable]:
    """(train, eval) transforms from PIL images to normalised float tensors."""
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms import v2 as T

    p = _preset(cfg, opts)
    interp = InterpolationMode(p.interpolation)
    to_tensor = [T.ToImage(), T.ToDtype(torch.float32, scale=True), T.Normalize(p.mean, p.std)]
    eval_tf = T.Compose(
        [T.Resize(p.resize_size, interpolation=interp, antialias=True), T.CenterCrop(p.crop_size)] + to_tensor
    )
    if not opts.augment:
        return eval_tf, eval_tf
    ops: list[Any] = [
        T.RandomResizedCrop(p.crop_size, scale=opts.crop_scale, interpolation=interp, antialias=True)
    ]
    if opts.hflip > 0:
        ops.append(T.RandomHorizontalFlip(opts.hflip))
    if opts.color_jitter > 0:
        cj = opts.color_jitter
        ops.append(T.ColorJitter(brightness=cj, contrast=cj, saturation=cj))
    if opts.auto_augment == "trivial":
        ops.append(T.TrivialAugmentWide(interpolation=interp))
    elif opts.auto_augment == "randaugment":
        ops.append(T.RandAugment(opts.randaugment_ops, opts.randaugment_magnitude, interpolation=interp))
    ops += to_tensor
    if opts.random_erasing > 0:
        ops.append(T.RandomErasing(opts.random_erasing))
    return T.Compose(ops), eval_tf


# -- files -> examples -----------------------------------------------------------------------------------
def open_rgb(path: str | Path):
    """Decode one image as RGB (raises OSError/ValueError for files PIL cannot read)."""
    from PIL import Image

    with Image.open(path) as img:
        return img.convert("RGB")


def _is_decodable(path: Path) -> bool:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            img.verify()
        return True
    except (OSError, ValueError, UnidentifiedImageError, Image.DecompressionBombError, SyntaxError):
        return False


class Skipped:
    """Files left out of a split, by reason, for the log."""

    def __init__(self) -> None:
        self.by_reason: dict[str, list[str]] = {}

    def add(self, reason: str, path: Path | str) -> None:
        self.by_reason.setdefault(reason, []).append(str(path))

    def summary(self) -> dict[str, Any]:
        return {r: {"count": len(p), "files": p[:10]} for r, p in self.by_reason.items()}


def _check_image(path: Path, opts: ImageOptions, skipped: Skipped, where: str) -> bool:
    if not opts.verify_images or _is_decodable(path):
        return True
    if opts.on_bad_image == "error":
        raise DataError(
            f"{where}: `{path}` is not a decodable image; remove it or set data.on_bad_image: skip"
        )
    skipped.add("undecodable", path)
    return False


def _folder_examples(
    folder: Path,
    opts: ImageOptions,
    classes: list[str] | None,
    skipped: Skipped,
    on_classes: Callable[[list[str]], None] | None = None,
) -> tuple[list[Path], list[int], list[str]]:
    """(paths, labels, classes) of an ImageFolder-layout folder; `classes` fixes the order (eval splits)."""
    if not folder.is_dir():
        raise DataError(
            f"image folder `{folder}` does not exist; set data.root (or data.train_dir / eval_dir)"
        )
    found = sorted(d.name for d in folder.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not found:
        raise DataError(
            f"image folder `{folder}` has no class sub-folders; expected {folder}/<class name>/<image files>"
        )
    if classes is None:
        classes = list(opts.classes) if opts.classes else found
        missing = [c for c in classes if c not in found]
        if missing:
            raise DataError(
                f"data.classes names `{missing[0]}`, but `{folder}` has no such folder (has {', '.join(found)})"
            )
        if on_classes is not None:
            on_classes(classes)
    else:
        extra = [c for c in found if c not in classes]
        if extra:
            raise DataError(
                f"`{folder / extra[0]}` is a class the train split does not have ({', '.join(classes)}); "
                "rename or remove it"
            )
    exts = tuple(e.lower() for e in opts.extensions)
    paths: list[Path] = []
    labels: list[int] = []
    for idx, name in enumerate(classes):
        class_dir = folder / name
        if not class_dir.is_dir():
            continue
        n_before = len(paths)
        for f in sorted(p for p in class_dir.rglob("*") if p.is_file()):
            if f.suffix.lower() not in exts:
                skipped.add("other_extension", f)
            elif _check_image(f, opts, skipped, str(class_dir)):
                paths.append(f)
                labels.append(idx)
        if len(paths) == n_before:
            raise DataError(
                f"class folder `{class_dir}` has no images ({', '.join(exts)}); add images or remove the folder"
            )
    return paths, labels, classes


def _read_csv_rows(csv_path: Path, opts: ImageOptions) -> list[tuple[int, str, str]]:
    """(line number, image path, label) of each row."""
    if not csv_path.is_file():
        raise DataError(f"CSV file `{csv_path}` not found; set data.train_csv / eval_csv to an existing file")
    with open(csv_path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        cols = reader.fieldnames or []
        for key, col in (("path_column", opts.path_column), ("label_column", opts.label_column)):
            if col not in cols:
                raise DataError(f"{csv_path}: no `{col}` column (columns: {', '.join(cols)}); set data.{key}")
        rows = [(i + 2, r[opts.path_column], r[opts.label_column]) for i, r in enumerate(reader)]
    if not rows:
        raise DataError(f"{csv_path}: no rows below the header")
    return rows


def _sort_class_names(names: set[str]) -> list[str]:
    if all(n.lstrip("-").isdigit() for n in names):
        return sorted(names, key=int)
    return sorted(names)


def _csv_examples(
    csv_path: Path,
    opts: ImageOptions,
    classes: list[str] | None,
    skipped: Skipped,
    on_classes: Callable[[list[str]], None] | None = None,
) -> tuple[list[Path], list[int], list[str]]:
    rows = _read_csv_rows(csv_path, opts)
    root = Path(resolve_path(opts.image_root)) if opts.image_root else csv_path.parent
    if classes is None:
        classes = list(opts.classes) if opts.classes else _sort_class_names({r[2] for r in rows})
        if on_classes is not None:
            on_classes(classes)
    index = {c: i for i, c in enumerate(classes)}
    paths: list[Path] = []
    labels: list[int] = []
    for line, rel, label in rows:
        if label not in index:
            raise DataError(
                f"{csv_path} line {line}: label `{label}` is not one of the classes ({', '.join(classes)})"
            )
        path = Path(rel) if Path(rel).is_absolute() else root / rel
        if not path.is_file():
            raise DataError(f"{csv_path} line {line}: image `{rel}` not found (looked for {path})")
        if _check_image(path, opts, skipped, f"{csv_path} line {line}"):
            paths.append(path)
            labels.append(index[label])
    return paths, labels, classes


# -- dataset ---------------------------------------------------------------------------------------------
class ImageDataset(Dataset):
    """Decodes and transforms one image per item: `{"inputs", "labels", "index"}`.

    A file that fails to decode here (after passing the build-time check) gives `None`, which
    `collate_images` drops, with a warning naming the file."""

    def __init__(
        self, paths: Sequence[Path], labels: Sequence[int], transform: Callable, on_bad_image: str = "skip"
    ):
        self.paths = [str(p) for p in paths]
        self.labels = list(labels)
        self.transform = transform
        self.on_bad_image = on_bad_image

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> dict[str, Any] | None:
        try:
            img = open_rgb(self.paths[i])
        except (OSError, ValueError, SyntaxError) as e:
            if self.on_bad_image == "error":
                raise DataError(f"`{self.paths[i]}` is not a decodable image ({e})") from e
            warnings.warn(f"skipping undecodable image {self.paths[i]} ({e})", stacklevel=2)
            return None
        return {"inputs": self.transform(img), "labels": self.labels[i], "index": i}


def collate_images(samples: list[dict[str, Any] | None]) -> dict[str, Any]:
    """default_collate, without the images that failed to decode."""
    kept = [s for s in samples if s is not None]
    if not kept:
        raise DataError("every image in a batch failed to decode; check the image files (see the warnings)")
    return default_collate(kept)


def _subset(ds: ImageDataset, idx: list[int], transform: Callable) -> ImageDataset:
    return ImageDataset([ds.paths[i] for i in idx], [ds.labels[i] for i in idx], transform, ds.on_bad_image)


def _check_num_classes(cfg: RunConfig, classes: list[str], where: str) -> None:
    """A recipe's `num_classes` must match the classes found in the data (unset, the run fills it)."""
    for section in ("model", "task"):
        n = getattr(cfg, section).kwargs.get("num_classes")
        if n is not None and n != len(classes):
            raise ConfigError(
                f"`{section}.num_classes` = {n}, but {where} has {len(classes)} classes "
                f"({', '.join(classes[:10])}); set {section}.num_classes: {len(classes)} or leave it out"
            )


def _build(cfg: RunConfig, kind: str) -> DataBundle:
    opts = validate_options(ImageOptions, cfg)
    train_tf, eval_tf = build_transforms(cfg, opts)
    skipped = Skipped()
    if kind == "folder":
        train_dir, eval_dir, test_dir = _split_dirs(opts)
        splits = {"train": train_dir, "eval": eval_dir, "test": test_dir}
        read = _folder_examples
        where = str(train_dir)
    else:
        if not opts.train_csv:
            raise ConfigError(
                "data source `image_csv` needs `data.train_csv` (a CSV with path,label columns)"
            )
        splits = {
            "train": resolve_path(opts.train_csv),
            "eval": resolve_path(opts.eval_csv) if opts.eval_csv else None,
            "test": resolve_path(opts.test_csv) if opts.test_csv else None,
        }
        read = _csv_examples
        where = str(splits["train"])
    paths, labels, classes = read(
        Path(splits["train"]), opts, None, skipped, lambda c: _check_num_classes(cfg, c, where)
    )
    train = ImageDataset(paths, labels, train_tf, opts.on_bad_image)
    datasets: dict[str, ImageDataset | None] = {"eval": None, "test": None}
    for split in ("eval", "test"):
        if splits[split] is not None:
            p, lab, _ = read(Path(splits[split]), opts, classes, skipped)
            datasets[split] = ImageDataset(p, lab, eval_tf, opts.on_bad_image)
    if datasets["eval"] is None and opts.val_fraction > 0:
        kept, held = holdout_split(len(train), opts.val_fraction, cfg.train.seed, "data.val_fraction")
        datasets["eval"] = _subset(train, held, eval_tf)
        train = _subset(train, kept, train_tf)
    counts = {s: len(d) for s, d in (("train", train), *datasets.items()) if d is not None}
    info: dict[str, Any] = {"images": counts, "classes": classes}
    if skipped.by_reason:
        info["skipped"] = skipped.summary()
        n = sum(len(v) for v in skipped.by_reason.values())
        warnings.warn(f"image data: skipped {n} file(s): {info['skipped']}", stacklevel=2)
    report_on = datasets["eval"] if opts.report else None
    batch_size = cfg.eval.batch_size or cfg.train.batch_size
    callbacks = [VisionReport(report_on, classes, batch_size, opts.misclassified_top_k)]
    return DataBundle(
        train=train,
        eval=datasets["eval"],
        test=datasets["test"],
        collate_fn=collate_images,
        num_classes=len(classes),
        label_names=classes,
        info=info,
        callbacks=callbacks,
    )


def _split_dirs(opts: ImageOptions) -> tuple[Path, Path | None, Path | None]:
    """train/eval/test folders: explicit `*_dir` keys win; else root/train + root/val (+ root/test), or root."""
    if opts.root is None and opts.train_dir is None:
        raise ConfigError("data source `image_folder` needs `data.root` (or `data.train_dir`)")
    root = resolve_path(opts.root) if opts.root else None
    if root is not None and not root.is_dir():
        raise DataError(f"`data.root` = {opts.root!r}: folder not found")

    def pick(explicit: str | None, names: Sequence[str]) -> Path | None:
        if explicit:
            return resolve_path(explicit)
        if root is not None:
            for n in names:
                if (root / n).is_dir():
                    return root / n
        return None

    train = pick(opts.train_dir, ("train",)) or root
    return train, pick(opts.eval_dir, EVAL_SPLIT_NAMES), pick(opts.test_dir, ("test",))


@register_data("image_folder")
def image_folder(cfg: RunConfig) -> DataBundle:
    """Images in class sub-folders: ROOT/{train,val,test}/<class>/<image>, or ROOT/<class>/<image>."""
    return _build(cfg, "folder")


@register_data("image_csv")
def image_csv(cfg: RunConfig) -> DataBundle:
    """Images listed in CSV files with `path,label` columns."""
    return _build(cfg, "csv")


# -- end-of-run report -----------------------------------------------------------------------------------
def _atomic_write(path: Path, write: Callable[[Any], None], mode: str = "w") -> None:
    def fill(tmp: Path) -> None:
        with open(tmp, mode, **({"newline": ""} if "b" not in mode else {})) as f:
            write(f)

    atomic_write(path, fill)


@torch.no_grad()
def predict_dataset(
    model: nn.Module, dataset: ImageDataset, batch_size: int, device: torch.device | str,
    forward: Callable[[nn.Module, dict[str, Any]], torch.Tensor],
) -> tuple[list[int], torch.Tensor]:
    """(dataset indices, class probabilities) over `dataset`, in eval mode, without holding the images.
    `forward(model, batch)` is the task's (logits from whatever the model returns)."""
    was_training = model.training
    model.eval()
    indices: list[int] = []
    probs: list[torch.Tensor] = []
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=collate_images)
    try:
        for batch in loader:
            logits = forward(model, {"inputs": batch["inputs"].to(device)})
            probs.append(torch.softmax(logits.float(), dim=-1).cpu())
            indices += batch["index"].tolist()
    finally:
        model.train(was_training)
    return indices, torch.cat(probs) if probs else torch.empty(0)


def confusion_matrix(labels: Sequence[int], preds: Sequence[int], n: int) -> torch.Tensor:
    """counts[true, predicted]."""
    cm = torch.zeros(n, n, dtype=torch.long)
    for t, p in zip(labels, preds):
        cm[t, p] += 1
    return cm


def plot_confusion_matrix(cm: torch.Tensor, classes: list[str], path: Path, title: str = "") -> bool:
    """Write the matrix as a PNG (False when matplotlib is missing)."""
    try:
        import matplotlib

        matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt
    except ImportError:
        warnings.warn(
            "matplotlib is not installed: no confusion_matrix.png (pip install 'tunelab[report]')",
            stacklevel=2,
        )
        return False
    n = len(classes)
    size = min(3 + 0.5 * n, 20)
    fig, ax = plt.subplots(figsize=(size, size))
    ax.imshow(cm.numpy(), cmap="Blues")
    ax.set_xticks(range(n), classes, rotation=45, ha="right")
    ax.set_yticks(range(n), classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    if n <= 30:
        high = cm.max().item() / 2 if cm.numel() else 0
        for i in range(n):
            for j in range(n):
                v = cm[i, j].item()
                ax.text(j, i, str(v), ha="center", va="center", color="white" if v > high else "black")
    fig.tight_layout()
    _atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=100), mode="wb")
    plt.close(fig)
    return True


def write_report(
    run_dir: Path,
    dataset: ImageDataset,
    classes: list[str],
    indices: list[int],
    probs: torch.Tensor,
    top_k: int = 25,
) -> dict[str, Any]:
    """Confusion matrix PNG, per-image predictions and the most confidently wrong images; returns the
    headline numbers (accuracy, per-class precision and recall)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    n = len(classes)
    labels = [dataset.labels[i] for i in indices]
    conf, preds = probs.max(dim=-1) if len(indices) else (torch.empty(0), torch.empty(0, dtype=torch.long))
    preds_l = preds.tolist()
    cm = confusion_matrix(labels, preds_l, n)
    tp = cm.diag().float()
    precision = (tp / cm.sum(0).clamp(min=1)).tolist()
    recall = (tp / cm.sum(1).clamp(min=1)).tolist()
    accuracy = float(tp.sum() / max(len(labels), 1))

    rows = [
        (dataset.paths[i], classes[t], classes[p], float(c), float(probs[k, t]))
        for k, (i, t, p, c) in enumerate(zip(indices, labels, preds_l, conf.tolist()))
    ]
    header = ["path", "label", "predicted", "confidence", "p_label"]

    def write_rows(f, items):
        w = csv.writer(f)
        w.writerow(header)
        w.writerows([(a, b, c, f"{d:.4f}", f"{e:.4f}") for a, b, c, d, e in items])

    _atomic_write(run_dir / "eval_predictions.csv", lambda f: write_rows(f, rows))
    wrong = sorted((r for r in rows if r[1] != r[2]), key=lambda r: -r[3])[:top_k]
    _atomic_write(run_dir / "misclassified.csv", lambda f: write_rows(f, wrong))
    png = plot_confusion_matrix(
        cm, classes, run_dir / "confusion_matrix.png", f"accuracy {accuracy:.3f} (n={len(labels)})"
    )
    return {
        "accuracy": accuracy,
        "precision_per_class": dict(zip(classes, precision)),
        "recall_per_class": dict(zip(classes, recall)),
        "confusion_matrix": cm.tolist(),
        "misclassified": int(sum(r[1] != r[2] for r in rows)),
        "files": ["eval_predictions.csv", "misclassified.csv"] + (["confusion_matrix.png"] if png else []),
    }


def _is_rank_zero() -> bool:
    dist = torch.distributed
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


class VisionReport(Callback):
    """Writes classes.json at the start of fit; at the end, predicts the eval split with the final model
    and writes the report files into the run dir (the image counts and skipped files are in
    `DataBundle.info`, which the run logs)."""

    def __init__(self, dataset: ImageDataset | None, classes: list[str], batch_size: int, top_k: int = 25):
        self.dataset, self.classes = dataset, classes
        self.batch_size, self.top_k = batch_size, top_k

    def on_fit_start(self, trainer: Any) -> None:
        if trainer.output_dir is not None and _is_rank_zero():  # `tunelab predict` reads the class names
            text = json.dumps(self.classes)
            _atomic_write(Path(trainer.output_dir) / CLASSES_FILE, lambda f: f.write(text))

    def on_fit_end(self, trainer: Any, summary: dict[str, Any]) -> None:
        if self.dataset is None or not _is_rank_zero():
            return
        model = getattr(trainer, "raw_model", None) or trainer.model
        device = getattr(trainer, "device", None) or next(model.parameters()).device
        indices, probs = predict_dataset(model, self.dataset, self.batch_size, device, trainer.task.forward)
        result = write_report(
            Path(trainer.output_dir), self.dataset, self.classes, indices, probs, self.top_k
        )
        summary["vision_report"] = {k: v for k, v in result.items() if k != "confusion_matrix"}
        if hasattr(trainer, "log"):
            trainer.log("vision_report", **result)


# -- tunelab predict RUN_DIR --image PATH ... ------------------------------------------------------------
def _image_args(args: Any) -> list[str]:
    for key in ("image", "images", "inputs", "input"):
        value = getattr(args, key, None)
        if value:
            return [value] if isinstance(value, str) else list(value)
    raise ConfigError("predict: give images with --image PATH [PATH ...]")


def _run_class_names(run: Any, opts: ImageOptions) -> list[str] | None:
    """The run's class names: its data bundle, classes.json in the run dir, the task, else the data files."""
    data = getattr(run, "data", None)
    if data is not None and data.label_names:
        return list(data.label_names)
    saved = Path(getattr(run, "run_dir", None) or ".") / CLASSES_FILE
    if getattr(run, "run_dir", None) and saved.is_file():
        return list(json.loads(saved.read_text()))
    if getattr(run.task, "label_names", None):
        return list(run.task.label_names)
    if opts.classes:
        return list(opts.classes)
    try:
        if opts.train_csv:
            rows = _read_csv_rows(resolve_path(opts.train_csv), opts)
            return _sort_class_names({r[2] for r in rows})
        train_dir = _split_dirs(opts)[0]
        return sorted(d.name for d in train_dir.iterdir() if d.is_dir() and not d.name.startswith("."))
    except (TunelabError, OSError):
        return None


def predict_images(run: Any, args: Any) -> list[dict[str, Any]]:
    """Labels and probabilities for image files, with the run's eval transform."""
    cfg = run.cfg
    opts = validate_options(ImageOptions, cfg)
    _, eval_tf = build_transforms(cfg, opts)
    classes = _run_class_names(run, opts)
    model = run.model
    device = next(model.parameters()).device
    paths = _image_args(args)
    top_k = int(getattr(args, "top_k", None) or 5)
    chunk_size = int(getattr(args, "batch_size", None) or 32)
    results: list[dict[str, Any]] = []
    model.eval()
    for start in range(0, len(paths), chunk_size):
        chunk = paths[start : start + chunk_size]
        images = []
        for p in chunk:
            if not Path(p).is_file():
                raise DataError(f"predict: image `{p}` not found")
            try:
                images.append(eval_tf(open_rgb(p)))
            except (OSError, ValueError, SyntaxError) as e:
                raise DataError(f"predict: `{p}` is not a decodable image ({e})") from e
        with torch.no_grad():
            logits = run.task.forward(model, {"inputs": torch.stack(images).to(device)})
            probs = torch.softmax(logits.float(), -1).cpu()
        for p, row in zip(chunk, probs):
            names = classes or [str(i) for i in range(len(row))]
            order = row.argsort(descending=True)[:top_k].tolist()
            results.append(
                {
                    "image": p,
                    "label": names[order[0]],
                    "probability": round(float(row[order[0]]), 6),
                    "probabilities": {names[i]: round(float(row[i]), 6) for i in order},
                }
            )
    return results


PREDICTORS.register("image_folder", predict_images)
PREDICTORS.register("image_csv", predict_images)
