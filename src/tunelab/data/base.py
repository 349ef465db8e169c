"""Data-source interface and the resumable batch samplers the trainer uses.

A data source is a function registered by name, `build(cfg: RunConfig) -> DataBundle`, that reads its own
options from `cfg.data` (validate them with `validate_options`). Datasets are map-style and return dicts
of tensors (a `(x, y)` tuple is turned into `{"inputs": x, "labels": y}`). The trainer owns batching:
a `ResumableBatchSampler` whose batch order is a pure function of (seed, epoch), so a resumed run can
start in the middle of an epoch and see exactly the batches the uninterrupted run saw.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset, Sampler
from torch.utils.data._utils.collate import default_collate

from tunelab.config import RunConfig, validate_options  # noqa: F401 (data sources import it from here)
from tunelab.errors import ConfigError, DataError, TunelabError
from tunelab.registry import DATA


@dataclass
class GenerationPrompts:
    """Held-out prompts that a generative run answers at each eval (logged as `samples` by the insight
    layer's sample callback), with what it takes to encode them as training did."""

    prompts: list[str]
    tokenizer: Any
    template: str = "chat"
    system: str | None = None
    max_new_tokens: int = 128


@dataclass
class DataBundle:
    train: Dataset | None
    eval: Dataset | None = None
    test: Dataset | None = None
    collate_fn: Callable[[list[Any]], dict[str, Any]] | None = None
    num_classes: int | None = None
    label_names: list[str] | None = None
    vocab_size: int | None = None  # a token source's vocabulary (the model's embedding rows)
    # Per-example lengths of `train` (for length-grouped batching) and of `eval` (for sorted eval batches).
    train_lengths: Sequence[int] | None = None
    eval_lengths: Sequence[int] | None = None
    info: dict[str, Any] = field(default_factory=dict)  # counts, skipped files, ... logged once
    callbacks: list[Any] = field(default_factory=list)  # Callbacks the source adds (e.g. artefact writers)
    generation: GenerationPrompts | None = None  # prompts to answer at each eval (generative runs)
    tokens_per_sample: int | None = None  # fixed-length token windows: the run logs model FLOP/s and MFU


def register_data(name: str):
    return DATA.register(name)


def build_data(cfg: RunConfig) -> DataBundle:
    """The DataBundle of the source `data.name` names (registered, or `pkg.module:build` registered with
    @register_data in that module)."""
    name = cfg.data.kwargs["name"]
    bundle = DATA.resolve(name)(cfg)
    if not isinstance(bundle, DataBundle):
        raise ConfigError(f"data source `{name}` returned a {type(bundle).__name__}, not a tunelab DataBundle")
    return bundle


def collate_dicts(samples: list[Any]) -> dict[str, Any]:
    """default_collate, with `(x, y)` samples named `inputs` / `labels`. A dict is an already collated
    batch (from a dataset's `__getitems__` fast path) and passes through."""
    if isinstance(samples, dict):
        return samples
    if isinstance(samples[0], (tuple, list)) and len(samples[0]) == 2:
        x, y = default_collate(samples)
        return {"inputs": x, "labels": y}
    return default_collate(samples)


class TensorDataset(Dataset):
    """In-memory `inputs`/`labels` tensors, fetched a whole batch at a time (`__getitems__`)."""

    def __init__(self, inputs: torch.Tensor, labels: torch.Tensor):
        if len(inputs) != len(labels):
            raise ValueError(f"{len(inputs)} inputs but {len(labels)} labels")
        self.inputs, self.labels = inputs, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"inputs": self.inputs[i], "labels": self.labels[i]}

    def __getitems__(self, idx: list[int]) -> dict[str, torch.Tensor]:
        t = torch.as_tensor(idx)
        return {"inputs": self.inputs[t], "labels": self.labels[t]}


def holdout_split(n: int, size: float, seed: int, option: str) -> tuple[list[int], list[int]]:
    """A seeded (kept, held-out) split of range(n), each ascending: `size` below 1 is a fraction of n
    (rounded, at least one example), 1 or more a count. The one rule of every source that carves its eval
    split out of the training data; `option` names the setting for the error."""
    n_held = max(1, round(size * n)) if size < 1 else int(size)
    if n_held >= n:
        raise DataError(f"`{option}` = {size} leaves no training examples out of {n}; lower it")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    return sorted(order[n_held:]), sorted(order[:n_held])


def split_indices(n: int, fractions: Sequence[float], seed: int) -> list[torch.Tensor]:
    """Seeded random split of range(n) into len(fractions)+1 parts (the last takes the rest)."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    out, start = [], 0
    for f in fractions:
        k = int(round(f * n))
        out.append(perm[start : start + k])
        start += k
    out.append(perm[start:])
    return out[::-1]  # the remainder (train) first


class ResumableBatchSampler(Sampler[list[int]]):
    """Batches of indices; order is a function of (seed, epoch) only. Shards batches across ranks.

    `start` skips the first batches of the epoch (for resuming mid-epoch). Subclasses override
    `epoch_batches` to change the batching (see LengthGroupedBatchSampler).
    """

    def __init__(
        self,
        n: int,
        batch_size: int,
        shuffle: bool = True,
        seed: int = 0,
        drop_last: bool = False,
        rank: int = 0,
        world_size: int = 1,
    ):
        self.n, self.batch_size, self.shuffle, self.seed = n, batch_size, shuffle, seed
        self.drop_last, self.rank, self.world_size = drop_last, rank, world_size
        self.epoch = 0
        self.start = 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch, self.start = epoch, start

    def _permutation(self) -> list[int]:
        if not self.shuffle:
            return list(range(self.n))
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        return torch.randperm(self.n, generator=g).tolist()

    def epoch_batches(self) -> list[list[int]]:
        order = self._permutation()
        bs = self.batch_size
        batches = [order[i : i + bs] for i in range(0, len(order), bs)]
        if self.drop_last and batches and len(batches[-1]) < bs:
            batches.pop()
        return batches

    def _rank_batches(self) -> list[list[int]]:
        batches = self.epoch_batches()
        if self.world_size > 1:
            per_rank = len(batches) // self.world_size  # equal counts keep ranks in step
            batches = batches[self.rank : per_rank * self.world_size : self.world_size]
        return batches

    def __iter__(self) -> Iterator[list[int]]:
        yield from self._rank_batches()[self.start :]

    def __len__(self) -> int:
        if type(self).epoch_batches is ResumableBatchSampler.epoch_batches:  # plain batching: count, don't build
            full, rest = divmod(self.n, self.batch_size)
            batches = full + (1 if rest and not self.drop_last else 0)
            return batches // self.world_size if self.world_size > 1 else batches
        return len(self._rank_batches())


class LengthGroupedBatchSampler(ResumableBatchSampler):
    """Shuffled batches of similar length (less padding): sort within mega-batches of 50 batches,
    then shuffle the batches. The longest batch goes first so memory problems show at step 1."""

    def __init__(self, lengths: Sequence[int], batch_size: int, mega: int = 50, **kw: Any):
        super().__init__(len(lengths), batch_size, **kw)
        self.lengths = list(lengths)
        self.mega = mega

    def epoch_batches(self) -> list[list[int]]:
        order = self._permutation()
        bs, span = self.batch_size, self.batch_size * self.mega
        batches: list[list[int]] = []
        for i in range(0, len(order), span):
            chunk = sorted(order[i : i + span], key=lambda j: -self.lengths[j])
            batches += [chunk[k : k + bs] for k in range(0, len(chunk), bs)]
        if self.drop_last and batches and len(batches[-1]) < bs:
            batches.pop()
        if self.shuffle and len(batches) > 1:
            rng = random.Random(self.seed * 7919 + self.epoch)
            longest = max(range(len(batches)), key=lambda b: max(self.lengths[j] for j in batches[b]))
            first = batches.pop(longest)
            rng.shuffle(batches)
            batches.insert(0, first)
        return batches


class SortedEvalBatchSampler(ResumableBatchSampler):
    """Evaluation batches sorted by length (order does not matter for metrics; padding does)."""

    def __init__(self, lengths: Sequence[int], batch_size: int, **kw: Any):
        super().__init__(len(lengths), batch_size, shuffle=False, **kw)
        self.lengths = list(lengths)

    def epoch_batches(self) -> list[list[int]]:
        order = sorted(range(self.n), key=lambda j: self.lengths[j])
        return [order[i : i + self.batch_size] for i in range(0, self.n, self.batch_size)]


# -- what the data was, for resume ----------------------------------------------------------------------------

_HASH_LIMIT = 256 * 2**20  # files up to this size are hashed in full; larger ones by size and mtime


def _file_print(path: Path) -> dict[str, Any]:
    from tunelab.io import sha256_file

    st = path.stat()
    if path.is_dir():  # an image folder: the names and sizes of every file under it
        import hashlib

        h = hashlib.sha256()
        for p in sorted(path.rglob("*")):
            if p.is_file():
                h.update(f"{p.relative_to(path)}\0{p.stat().st_size}\n".encode())
        return {"listing": h.hexdigest()}
    if st.st_size <= _HASH_LIMIT:
        return {"size": st.st_size, "sha256": sha256_file(path)}
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns}


def describe_splits(data: DataBundle) -> str:
    """The console's account of the data: `train 1,914 records packed into 894 rows, eval 100 records in 45
    rows; 7 records cut to data.max_length; 3 records dropped (why)` for a source that reports records and rows in `info` (packing), else
    `train 894 examples, eval 45`."""
    n = {split: len(ds) if ds is not None else 0 for split, ds in (("train", data.train), ("eval", data.eval))}
    records, rows = data.info.get("records"), data.info.get("rows")
    if not (isinstance(records, dict) and isinstance(rows, dict)):
        return f"train {n['train']:,} examples, eval {n['eval']:,}"
    text = ", ".join(f"{split} {records.get(split, 0):,} records {'packed into' if split == 'train' else 'in'} "
                     f"{rows.get(split, 0):,} rows" for split in ("train", "eval"))
    if data.info.get("truncated"):
        text += f"; {data.info['truncated']:,} records cut to data.max_length"
    if data.info.get("dropped"):
        text += f"; {data.info['dropped']:,} records dropped ({data.info.get('dropped_why', 'see the data source')})"
    return text


def is_labelled(dataset: Dataset) -> bool:
    """Whether a split's examples carry targets (a test file may come without its label column): dict
    examples have `labels`, tuple examples a second item."""
    if len(dataset) == 0:
        return False
    item = dataset[0]
    if isinstance(item, dict):
        return "labels" in item or "chosen" in item  # preference pairs carry their own targets
    return not isinstance(item, (tuple, list)) or len(item) > 1


def data_fingerprint(cfg: RunConfig, bundle: DataBundle) -> dict[str, Any]:
    """What a run's data was: each file or folder the `data:` section names (content hash, or for large files
    size and mtime) and the row count of each split. Saved in checkpoints; a resume compares it."""
    from tunelab.paths import resolve_path

    files: dict[str, Any] = {}
    for key, value in sorted(cfg.data.kwargs.items()):
        if "cache" in key:
            continue  # where tunelab keeps derived files, not the data (the caches check themselves)
        for i, v in enumerate(value if isinstance(value, list) else [value]):
            if not isinstance(v, str) or not v or ("://" in v and not v.startswith("pkg://")):
                continue
            try:
                path = resolve_path(v)
                if path.exists():
                    files[f"data.{key}" + (f"[{i}]" if isinstance(value, list) else "")] = {"path": str(path),
                                                                                         **_file_print(path)}
            except (OSError, ValueError, TunelabError):
                continue
    rows = {split: len(ds) for split, ds in (("train", bundle.train), ("eval", bundle.eval)) if ds is not None}
    return {"files": files, "rows": rows}


def fingerprint_changes(saved: dict[str, Any], now: dict[str, Any]) -> list[str]:
    """One phrase per difference between two `data_fingerprint`s (a checkpoint's and this start's)."""
    changes = []
    before, after = saved.get("files", {}), now.get("files", {})
    for key in sorted(set(before) | set(after)):
        a, b = before.get(key), after.get(key)
        if a is None or b is None:
            continue  # an option added or removed: the config change itself is reported separately
        path = b.get("path", key)
        if a.get("path") != b.get("path"):
            changes.append(f"`{key}` now names {b.get('path')} (the run started on {a.get('path')})")
        elif {k: v for k, v in a.items() if k != "path"} != {k: v for k, v in b.items() if k != "path"}:
            size = f" (size {a['size']:,} -> {b['size']:,} bytes)" if a.get("size") != b.get("size") else ""
            changes.append(f"{path}: the data file changed since the checkpoint{size}")
    for split, n in now.get("rows", {}).items():
        m = saved.get("rows", {}).get(split)
        if m is not None and m != n:
            changes.append(f"the {split} split has {n:,} examples now and had {m:,} when the checkpoint was saved")
    return changes
