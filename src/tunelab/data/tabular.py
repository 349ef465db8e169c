"""Small in-memory image/feature datasets: scikit-learn's digits and MNIST from its IDX `.gz` files."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field

from tunelab.config import RunConfig
from tunelab.data.base import DataBundle, TensorDataset, register_data, split_indices, validate_options
from tunelab.errors import DataError
from tunelab.paths import resolve_path


class _Options(BaseModel):
    model_config = ConfigDict(extra="forbid")
    val_fraction: float = Field(0.2, ge=0, lt=1)
    test_fraction: float = Field(0.0, ge=0, lt=1)
    classes: list[int] | None = None  # keep only these labels (e.g. digits 0-4 for pre-training)
    split_seed: int = 0
    flatten: bool = False


def _subset(x: torch.Tensor, y: torch.Tensor, classes: list[int] | None) -> tuple[torch.Tensor, torch.Tensor]:
    if classes is None:
        return x, y
    keep = torch.isin(y, torch.tensor(classes))
    return x[keep], y[keep]


def _bundle(x: torch.Tensor, y: torch.Tensor, opts: _Options, source: str) -> DataBundle:
    if len(y) == 0:
        raise DataError(f"{source}: the dataset is empty" + (f" after keeping classes {opts.classes}"
                                                              if opts.classes is not None else ""))
    if opts.flatten:
        x = x.reshape(len(x), -1)
    train_idx, test_idx, val_idx = split_indices(len(y), [opts.val_fraction, opts.test_fraction], opts.split_seed)
    part = lambda idx: TensorDataset(x[idx], y[idx]) if len(idx) else None  # noqa: E731
    return DataBundle(
        train=part(train_idx),
        eval=part(val_idx),
        test=part(test_idx),
        num_classes=int(y.max()) + 1,
        info={"source": source, "train": len(train_idx), "eval": len(val_idx), "test": len(test_idx)},
    )


def load_digits_tensors() -> tuple[torch.Tensor, torch.Tensor]:
    """The 1,797 8x8 handwritten digits that scikit-learn ships (no network), scaled to [0, 1]."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0
    return x, torch.tensor(d.target, dtype=torch.long)


@register_data("digits")
def digits(cfg: RunConfig) -> DataBundle:
    opts = validate_options(_Options, cfg)
    x, y = _subset(*load_digits_tensors(), opts.classes)
    return _bundle(x, y, opts, "sklearn digits")


# -- MNIST IDX ------------------------------------------------------------------------------------------


def read_idx(path: Path) -> np.ndarray:
    """Read an IDX file (optionally gzip-compressed): magic, dims, then big-endian data."""
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as e:
        raise DataError(f"{path}: cannot read ({e}); expected an IDX file, optionally .gz") from e
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise DataError(f"{path}: not an IDX file (bad magic number)")
    dtypes = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
    if data[2] not in dtypes:
        raise DataError(f"{path}: unknown IDX data type 0x{data[2]:02x}")
    ndim = data[3]
    dims = struct.unpack(f">{ndim}I", data[4 : 4 + 4 * ndim])
    arr = np.frombuffer(data, dtype=dtypes[data[2]], offset=4 + 4 * ndim)
    if arr.size != int(np.prod(dims)):
        raise DataError(f"{path}: truncated IDX file ({arr.size} values, header says {int(np.prod(dims))})")
    return arr.reshape(dims)


class _MnistOptions(_Options):
    path: str
    images: str = "train-images-idx3-ubyte.gz"
    labels: str = "train-labels-idx1-ubyte.gz"
    normalize: bool = True


@register_data("mnist")
def mnist(cfg: RunConfig) -> DataBundle:
    opts = validate_options(_MnistOptions, cfg)
    root = resolve_path(opts.path)
    images = read_idx(root / opts.images)
    labels = read_idx(root / opts.labels)
    if len(images) != len(labels):
        raise DataError(f"{root}: {opts.images} has {len(images)} images but {opts.labels} has {len(labels)} labels")
    x = torch.tensor(images, dtype=torch.float32).unsqueeze(1) / 255.0
    if opts.normalize:
        x = (x - 0.1307) / 0.3081
    y = torch.tensor(labels.astype(np.int64))
    x, y = _subset(x, y, opts.classes)
    return _bundle(x, y, opts, str(root))
