"""`text_classification` data source: labelled text (and text pairs) for sequence classification.

Reads CSV, TSV, JSONL and Parquet files, and Hugging Face datasets (a `save_to_disk` folder or
`hf:NAME[:CONFIG]` from the hub/cache); maps columns; turns string labels into ids (kept with the model
as `id2label`); splits off a seeded validation set when there is no eval file; tokenises once and caches
the token ids (keyed by the texts, the tokenizer and the truncation length); pads each batch only to its
own longest row and reports per-row lengths so the trainer can group batches by length.

```yaml
data: {name: text_classification, train: ../shared/data/sst2/train.tsv, eval: ../shared/data/sst2/dev.tsv,
       text_column: sentence, label_column: label, max_length: 64}
```
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch.utils.data import Dataset

from tunelab.callbacks import Callback
from tunelab.config import RunConfig
from tunelab.data.base import DataBundle, holdout_split, register_data, validate_options
from tunelab.errors import ConfigError, DataError
from tunelab.io import atomic_write
from tunelab.registry import PREDICTORS

CACHE_VERSION = 2  # 2: each entry carries the sha256 of its tensors, checked at every use
FORMATS = ("csv", "tsv", "jsonl", "parquet", "hf")


class TextClassificationOptions(BaseModel):
    """The `data:` keys of the `text_classification` source."""

    model_config = ConfigDict(extra="forbid")

    train: str
    eval: str | None = None
    test: str | None = None
    format: Literal["auto", "csv", "tsv", "jsonl", "parquet", "hf"] = "auto"
    text_column: str = "text"
    text_pair_column: str | None = None
    label_column: str = "label"
    labels: list[str] | None = None  # label names in id order; default: sorted labels of the train data
    max_length: int = Field(128, gt=1)
    max_rows: int | None = Field(None, gt=0)  # read only the first N training rows
    val_fraction: float = Field(0.1, ge=0, lt=1)  # held out of train when there is no eval file
    split_seed: int | None = None  # default: train.seed
    tokenizer: str | None = None  # default: model.path
    train_split: str = "train"  # Hugging Face dataset splits
    eval_split: str = "validation"
    test_split: str = "test"
    pad_to_multiple_of: int | None = Field(None, gt=0)
    cache: bool = True
    cache_dir: str | None = None  # default: $TUNELAB_CACHE_DIR/text or ~/.cache/tunelab/text


# ---------------------------------------------------------------------------------------------------
# Reading rows
# ---------------------------------------------------------------------------------------------------


@dataclass
class Rows:
    """Columns read from one file or split; `where(i)` names row i for error messages."""

    source: str
    columns: dict[str, list[Any]]
    first_line: int = 2  # file line of row 0 (1 for headerless JSONL, 2 for CSV with a header)
    line_numbers: list[int] | None = None
    label_names: list[str] | None = None  # a Hugging Face ClassLabel's names

    def __len__(self) -> int:
        return len(next(iter(self.columns.values()))) if self.columns else 0

    def where(self, i: int) -> str:
        if self.line_numbers is not None:
            return f"{self.source}, line {self.line_numbers[i]}"
        if self.first_line:
            return f"{self.source}, line {i + self.first_line}"
        return f"{self.source}, row {i}"

    def column(self, name: str, option: str) -> list[Any]:
        if name not in self.columns:
            found = ", ".join(f"`{c}`" for c in self.columns) or "none"
            raise DataError(f"{self.source}: no column `{name}` (data.{option}); columns found: {found}")
        return self.columns[name]


def _detect_format(path: str, fmt: str) -> str:
    if fmt != "auto":
        return fmt
    if path.startswith("hf:"):
        return "hf"
    p = Path(path)
    if p.is_dir():
        return "hf"
    suffix = p.suffix.lower()
    known = {
        ".csv": "csv",
        ".tsv": "tsv",
        ".jsonl": "jsonl",
        ".json": "jsonl",
        ".ndjson": "jsonl",
        ".parquet": "parquet",
    }
    if suffix not in known:
        raise ConfigError(
            f"{path}: cannot tell the format from `{suffix}`; set data.format to one of {', '.join(FORMATS)}"
        )
    return known[suffix]


def _decode_utf8(path: Path) -> str:
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise DataError(
            f"{path}, line {line}: not valid UTF-8 (byte {raw[e.start]:#04x}); re-save the file as UTF-8"
        ) from e


def _read_delimited(path: Path, delimiter: str, max_rows: int | None) -> Rows:
    text = _decode_utf8(path)
    # TSV files (GLUE) are unquoted: a `"` is part of the text. CSV follows RFC 4180 quoting.
    quoting = csv.QUOTE_NONE if delimiter == "\t" else csv.QUOTE_MINIMAL
    reader = csv.reader(text.splitlines(keepends=True), delimiter=delimiter, quoting=quoting)
    header = next(reader, None)
    if header is None:
        raise DataError(f"{path}: the file is empty; expected a header row naming the columns")
    header = [h.strip() for h in header]
    columns: dict[str, list[Any]] = {h: [] for h in header}
    lines: list[int] = []
    for row in reader:
        if not row or (len(row) == 1 and not row[0].strip() and len(header) > 1):
            continue  # blank line
        if len(row) != len(header):
            raise DataError(
                f"{path}, line {reader.line_num}: {len(row)} fields, the header has {len(header)} "
                f"({', '.join(header)}); quote fields that contain the delimiter"
            )
        for h, v in zip(header, row):
            columns[h].append(v)
        lines.append(reader.line_num)
        if max_rows is not None and len(lines) >= max_rows:
            break
    return Rows(str(path), columns, line_numbers=lines)


def _read_jsonl(path: Path, max_rows: int | None) -> Rows:
    text = _decode_utf8(path)
    stripped = text.lstrip()
    records: list[dict[str, Any]] = []
    lines: list[int] = []
    if stripped.startswith("["):  # a JSON array of records
        try:
            records = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}, line {e.lineno}: not valid JSON ({e.msg})") from e
        records = records[:max_rows] if max_rows else records
        line_numbers = None
    else:
        for n, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}, line {n}: not valid JSON ({e.msg})") from e
            if not isinstance(rec, dict):
                raise DataError(
                    f"{path}, line {n}: expected a JSON object per line, got {type(rec).__name__}"
                )
            records.append(rec)
            lines.append(n)
            if max_rows is not None and len(records) >= max_rows:
                break
        line_numbers = lines
    keys: dict[str, None] = {}
    for rec in records:
        keys.update(dict.fromkeys(rec))
    columns = {k: [rec.get(k) for rec in records] for k in keys}
    return Rows(str(path), columns, line_numbers=line_numbers, first_line=0)


def _read_parquet(path: Path, max_rows: int | None) -> Rows:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as e:  # pyarrow raises several types for a damaged file
        raise DataError(f"{path}: cannot read it as Parquet ({str(e).splitlines()[0]})") from e
    if max_rows is not None:
        table = table.slice(0, max_rows)
    return Rows(str(path), table.to_pydict(), first_line=0)


def _read_hf(spec: str, split: str, max_rows: int | None) -> Rows:
    import datasets

    try:
        if spec.startswith("hf:"):
            name, _, config = spec[3:].partition(":")
            ds = datasets.load_dataset(name, config or None, split=split)
        else:
            ds = datasets.load_from_disk(spec)
            if isinstance(ds, datasets.DatasetDict):
                if split not in ds:
                    raise DataError(f"{spec}: no split `{split}`; splits found: {', '.join(ds)}")
                ds = ds[split]
    except DataError:
        raise
    except Exception as e:  # network, missing cache, bad folder: all the user's to fix
        raise DataError(
            f"{spec}: cannot load the Hugging Face dataset split `{split}` ({str(e).splitlines()[0]})"
        ) from e
    if max_rows is not None:
        ds = ds.select(range(min(max_rows, len(ds))))
    names = None
    for feature in ds.features.values():
        if type(feature).__name__ == "ClassLabel":
            names = list(feature.names)
    return Rows(f"{spec} [{split}]", ds.to_dict(), first_line=0, label_names=names)


def read_rows(path: str, fmt: str = "auto", split: str = "train", max_rows: int | None = None) -> Rows:
    """Read a labelled-text file (or a dataset split) into columns."""
    fmt = _detect_format(path, fmt)
    if fmt == "hf":
        return _read_hf(path, split, max_rows)
    p = Path(path)
    if not p.is_file():
        raise DataError(f"{path}: file not found")
    if fmt in ("csv", "tsv"):
        return _read_delimited(p, "\t" if fmt == "tsv" else ",", max_rows)
    if fmt == "jsonl":
        return _read_jsonl(p, max_rows)
    return _read_parquet(p, max_rows)


def _texts(rows: Rows, column: str, option: str) -> list[str]:
    values = rows.column(column, option)
    out = []
    for i, v in enumerate(values):
        if v is None or (isinstance(v, float) and math.isnan(v)):
            out.append("")  # empty cells are valid, empty input
        elif isinstance(v, str):
            out.append(v)
        else:
            raise DataError(
                f"{rows.where(i)}: column `{column}` holds {type(v).__name__} {v!r}, expected text"
            )
    return out


def _raw_labels(rows: Rows, column: str) -> list[str]:
    values = rows.column(column, "label_column")
    out = []
    for i, v in enumerate(values):
        if v is None or (isinstance(v, str) and not v.strip()) or (isinstance(v, float) and math.isnan(v)):
            raise DataError(f"{rows.where(i)}: empty label in column `{column}`; every row needs a label")
        if isinstance(v, float) and v.is_integer():
            v = int(v)
        out.append(str(v).strip())
    return out


# ---------------------------------------------------------------------------------------------------
# Labels
# ---------------------------------------------------------------------------------------------------


def label_vocabulary(raw: list[str], names: list[str] | None) -> tuple[list[str], dict[str, int]]:
    """Label names in id order and the map from raw label text to id.

    With `names` (data.labels or a ClassLabel) a raw label is either a name or its integer id. Without,
    integer labels 0..K-1 keep their values and other labels are numbered in sorted order.
    """
    if names is not None:
        lookup = {n: i for i, n in enumerate(names)}
        lookup.update({str(i): i for i in range(len(names))})
        return list(names), lookup
    unique = sorted(set(raw))
    if unique and all(u.lstrip("-").isdigit() for u in unique):
        values = sorted(int(u) for u in unique)
        if values[0] >= 0:
            names = [str(i) for i in range(values[-1] + 1)]
            return names, {n: i for i, n in enumerate(names)}
    return unique, {n: i for i, n in enumerate(unique)}


def encode_labels(
    raw: list[str], lookup: dict[str, int], rows: Rows, names: list[str], split: str
) -> torch.Tensor:
    """Label ids of `raw`; a label outside the vocabulary is an error naming its row."""
    ids = []
    for i, r in enumerate(raw):
        if r not in lookup:
            known = ", ".join(names[:20]) + (" ..." if len(names) > 20 else "")
            if split == "train":  # only possible when the names were given
                raise DataError(
                    f"{rows.where(i)}: label `{r}` is not one of data.labels ({known}) nor an id below {len(names)}"
                )
            hint = "fix the row or list every label name in data.labels"
            raise DataError(
                f"{rows.where(i)}: {split} label `{r}` never appears in the training data (labels: {known}); {hint}"
            )
        ids.append(lookup[r])
    return torch.tensor(ids, dtype=torch.long)


# ---------------------------------------------------------------------------------------------------
# Tokenising once, with a cache
# ---------------------------------------------------------------------------------------------------


def _cache_root(option: str | None) -> Path:
    if option:
        return Path(os.path.expanduser(option))
    env = os.environ.get("TUNELAB_CACHE_DIR")
    return (Path(env) if env else Path.home() / ".cache" / "tunelab") / "text"


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """A hash of what decides the token ids: the fast tokenizer's JSON (vocab, normaliser, ...) without the
    truncation and padding settings that the last call left on it (the cache key has max_length)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        spec = json.loads(backend.to_str())
        spec.pop("truncation", None)
        spec.pop("padding", None)
        blob = json.dumps(spec, sort_keys=True)
    else:
        blob = json.dumps(tokenizer.get_vocab(), sort_keys=True) + type(tokenizer).__name__
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def tokenize_texts(
    tokenizer: Any,
    texts: list[str],
    pairs: list[str] | None,
    max_length: int,
    cache_dir: Path | None,
) -> dict[str, torch.Tensor]:
    """Token ids of every row as flat tensors: `ids` (int32), `offsets` (int64, len n+1) and, for text
    pairs, `type_ids` (int8). Reuses a cached result keyed by the texts, tokenizer and max_length."""
    key = None
    if cache_dir is not None:
        h = hashlib.sha256()
        h.update(
            f"v{CACHE_VERSION}|{tokenizer_fingerprint(tokenizer)}|{max_length}|{pairs is not None}".encode()
        )
        for t in texts:
            h.update(t.encode() + b"\x00")
        for t in pairs or ():
            h.update(t.encode() + b"\x00")
        key = cache_dir / f"{h.hexdigest()[:32]}.safetensors"
        if key.is_file():
            cached, problem = _load_cache_entry(key, len(tokenizer))
            if cached is not None:
                return cached
            print(f"warning: rebuilding the token cache entry {key.name}: {problem}", file=sys.stderr)
    enc = tokenizer(
        texts,
        pairs,
        truncation=True,
        max_length=max_length,
        return_attention_mask=False,
        return_token_type_ids=pairs is not None,
    )
    lengths = torch.tensor([len(x) for x in enc["input_ids"]], dtype=torch.int64)
    offsets = torch.zeros(len(texts) + 1, dtype=torch.int64)
    torch.cumsum(lengths, 0, out=offsets[1:])
    flat = [t for x in enc["input_ids"] for t in x]
    out = {"ids": torch.tensor(flat, dtype=torch.int32), "offsets": offsets}
    if pairs is not None:
        out["type_ids"] = torch.tensor([t for x in enc["token_type_ids"] for t in x], dtype=torch.int8)
    if key is not None:
        _save_atomic(out, key)
    return out


def _digest(tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for k in sorted(tensors):
        h.update(k.encode() + b"\0" + tensors[k].contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _load_cache_entry(path: Path, vocab_size: int) -> tuple[dict[str, torch.Tensor] | None, str]:
    """A cache entry whose contents still match the sha256 written with it and whose ids are in the
    vocabulary; otherwise (None, what is wrong): the caller re-tokenises, never trusts a damaged entry."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            digest = (f.metadata() or {}).get("sha256")
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # truncated or garbled file
        return None, f"unreadable ({type(e).__name__})"
    if digest is None or _digest(tensors) != digest:
        return None, "its contents do not match the sha256 written with them"
    ids = tensors.get("ids")
    if ids is None or "offsets" not in tensors or (ids.numel() and int(ids.max()) >= vocab_size) or (
            ids.numel() and int(ids.min()) < 0):
        return None, f"token ids outside the tokenizer's vocabulary of {vocab_size}"
    return tensors, ""


def _save_atomic(tensors: dict[str, torch.Tensor], path: Path) -> None:
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata={"sha256": _digest(tensors)}))
    except OSError:
        pass  # a read-only cache only costs the re-tokenisation next time


# ---------------------------------------------------------------------------------------------------
# Dataset and collate
# ---------------------------------------------------------------------------------------------------


class TokenizedTextDataset(Dataset):
    """Rows of token ids (and labels) stored flat; `lengths` feeds length-grouped batching."""

    def __init__(
        self, tokens: dict[str, torch.Tensor], labels: torch.Tensor | None, index: Sequence[int] | None = None
    ):
        offsets = tokens["offsets"]
        self.ids = tokens["ids"]
        self.type_ids = tokens.get("type_ids")
        self.index = list(range(len(offsets) - 1)) if index is None else list(index)
        self.starts = offsets[:-1][self.index].tolist()
        self.ends = offsets[1:][self.index].tolist()
        self.lengths = [e - s for s, e in zip(self.starts, self.ends)]
        self.labels = labels[self.index] if labels is not None else None

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int) -> dict[str, Any]:
        s, e = self.starts[i], self.ends[i]
        item: dict[str, Any] = {"input_ids": self.ids[s:e]}
        if self.type_ids is not None:
            item["token_type_ids"] = self.type_ids[s:e]
        if self.labels is not None:
            item["labels"] = self.labels[i]
        return item


class PadCollator:
    """Pads a batch to its own longest row (rounded up to `multiple`); drops the attention mask when
    no row is padded, which lets SDPA skip the mask."""

    def __init__(self, pad_id: int, multiple: int | None = None):
        self.pad_id = pad_id
        self.multiple = multiple

    def __call__(self, items: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        lengths = [len(it["input_ids"]) for it in items]
        width = max(lengths)
        if self.multiple:
            width = -(-width // self.multiple) * self.multiple
        n = len(items)
        ids = torch.full((n, width), self.pad_id, dtype=torch.long)
        for row, it in enumerate(items):
            ids[row, : lengths[row]] = it["input_ids"]
        batch: dict[str, torch.Tensor] = {"input_ids": ids}
        if min(lengths) < width:
            batch["attention_mask"] = (torch.arange(width)[None, :] < torch.tensor(lengths)[:, None]).long()
        if "token_type_ids" in items[0]:
            types = torch.zeros((n, width), dtype=torch.long)
            for row, it in enumerate(items):
                types[row, : lengths[row]] = it["token_type_ids"]
            batch["token_type_ids"] = types
        if "labels" in items[0]:
            batch["labels"] = torch.stack([it["labels"] for it in items])
        return batch


# ---------------------------------------------------------------------------------------------------
# The data source
# ---------------------------------------------------------------------------------------------------


class LabelNames(Callback):
    """Writes the data's label names into a Hugging Face model's config (id2label / label2id) when the
    config still has the default `LABEL_i` names, so that final/ carries them without `model.id2label`."""

    def __init__(self, names: list[str]):
        self.names = names

    def on_fit_start(self, trainer: Any) -> None:
        config = getattr(trainer.raw_model, "config", None)
        if config is None or not hasattr(config, "id2label"):
            return
        current = {int(k): v for k, v in config.id2label.items()}
        if current != {i: f"LABEL_{i}" for i in range(len(current))}:
            return  # the user named the labels in model.id2label
        n = config.num_labels
        config.id2label = {i: self.names[i] if i < len(self.names) else f"LABEL_{i}" for i in range(n)}
        config.label2id = {v: k for k, v in config.id2label.items()}


def _tokenizer_path(opts: TextClassificationOptions, cfg: RunConfig) -> str:
    path = opts.tokenizer or cfg.model.kwargs.get("path")
    if not path:
        raise ConfigError(
            "data.tokenizer is not set and the model has no `model.path` to take the tokenizer from"
        )
    return str(path)


def _label_training_rows(rows: Rows, opts: TextClassificationOptions, cfg: RunConfig) -> tuple[list[str], dict, list[int]]:
    """The label names (the recipe's, the file's, or sorted), the lookup, and the training rows' label ids."""
    if len(rows) == 0:
        raise DataError(f"{rows.source}: no rows")
    raw = _raw_labels(rows, opts.label_column)
    names, lookup = label_vocabulary(raw, opts.labels or rows.label_names)
    if len(names) < 2:
        raise DataError(f"{rows.source}: column `{opts.label_column}` has a single label `{names[0]}`; need 2 or more")
    num_labels = cfg.model.kwargs.get("num_labels")
    if isinstance(num_labels, int) and num_labels < len(names):
        raise ConfigError(
            f"model.num_labels = {num_labels} is smaller than the {len(names)} labels found in "
            f"{rows.source} ({', '.join(names[:10])}); set model.num_labels to at least {len(names)}"
        )
    return names, lookup, encode_labels(raw, lookup, rows, names, "train")


@register_data("text_classification")
def build_text_classification(cfg: RunConfig) -> DataBundle:
    """Read, label, split and tokenise; see the module docstring for the options."""
    from tunelab.tokenizers import load_hf_tokenizer

    opts: TextClassificationOptions = validate_options(TextClassificationOptions, cfg)
    tokenizer = load_hf_tokenizer(_tokenizer_path(opts, cfg))
    cache_dir = _cache_root(opts.cache_dir) if opts.cache else None
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

    train_rows = read_rows(opts.train, opts.format, opts.train_split, opts.max_rows)
    names, lookup, train_labels = _label_training_rows(train_rows, opts, cfg)
    num_labels = cfg.model.kwargs.get("num_labels")

    def tokens_of(rows: Rows) -> dict[str, torch.Tensor]:
        texts = _texts(rows, opts.text_column, "text_column")
        pairs = _texts(rows, opts.text_pair_column, "text_pair_column") if opts.text_pair_column else None
        return tokenize_texts(tokenizer, texts, pairs, opts.max_length, cache_dir)

    train_tokens = tokens_of(train_rows)
    info: dict[str, Any] = {"labels": names, "max_length": opts.max_length, "train_file": train_rows.source}
    if opts.eval:
        train = TokenizedTextDataset(train_tokens, train_labels)
        eval_rows = read_rows(opts.eval, opts.format, opts.eval_split)
        eval_labels = encode_labels(
            _raw_labels(eval_rows, opts.label_column), lookup, eval_rows, names, "eval"
        )
        evaluation: TokenizedTextDataset | None = TokenizedTextDataset(tokens_of(eval_rows), eval_labels)
        info["eval_file"] = eval_rows.source
    elif opts.val_fraction > 0:
        seed = opts.split_seed if opts.split_seed is not None else cfg.train.seed
        train_idx, val_idx = holdout_split(len(train_rows), opts.val_fraction, seed, "data.val_fraction")
        train = TokenizedTextDataset(train_tokens, train_labels, train_idx)
        evaluation = TokenizedTextDataset(train_tokens, train_labels, val_idx)
        info["eval_file"] = f"{opts.val_fraction:.0%} of {train_rows.source} (seed {seed})"
    else:
        train, evaluation = TokenizedTextDataset(train_tokens, train_labels), None
    test = None
    if opts.test:
        test_rows = read_rows(opts.test, opts.format, opts.test_split)
        test_labels = None
        if opts.label_column in test_rows.columns:
            test_labels = encode_labels(
                _raw_labels(test_rows, opts.label_column), lookup, test_rows, names, "test"
            )
        test = TokenizedTextDataset(tokens_of(test_rows), test_labels)
    info.update(n_train=len(train), n_eval=len(evaluation) if evaluation is not None else 0)
    info["truncated_train_rows"] = sum(1 for n in train.lengths if n >= opts.max_length)
    return DataBundle(
        train=train,
        eval=evaluation,
        test=test,
        collate_fn=PadCollator(pad_id, opts.pad_to_multiple_of),
        num_classes=max(len(names), num_labels if isinstance(num_labels, int) else 0),
        label_names=names,
        train_lengths=train.lengths,
        eval_lengths=evaluation.lengths if evaluation is not None else None,
        info=info,
        callbacks=[LabelNames(names)],
    )


# ---------------------------------------------------------------------------------------------------
# `tunelab predict RUN_DIR --text ... | --file in.csv`
# ---------------------------------------------------------------------------------------------------


def _arg(args: Any, name: str, default: Any = None) -> Any:
    return getattr(args, name, default) if not isinstance(args, dict) else args.get(name, default)


@torch.no_grad()
def predict_texts(
    model: torch.nn.Module,
    tokenizer: Any,
    texts: list[str],
    pairs: list[str] | None = None,
    max_length: int = 128,
    batch_size: int = 64,
) -> list[dict[str, Any]]:
    """Label, its probability and every class probability for each text, in input order. Batches are
    formed from texts of similar length (less padding), then put back in order."""
    id2label = {int(k): v for k, v in getattr(model.config, "id2label", {}).items()}
    tokens = tokenize_texts(tokenizer, texts, pairs, max_length, cache_dir=None)
    data = TokenizedTextDataset(tokens, None)
    collate = PadCollator(tokenizer.pad_token_id or 0)
    device = next(model.parameters()).device
    model.eval()
    order = sorted(range(len(data)), key=lambda i: data.lengths[i])
    probs = torch.empty(len(data), model.config.num_labels)
    for k in range(0, len(order), batch_size):
        idx = order[k : k + batch_size]
        batch = {n: t.to(device) for n, t in collate([data[i] for i in idx]).items()}
        probs[idx] = model(**batch).logits.float().softmax(-1).cpu()
    out = []
    for i, p in enumerate(probs):
        best = int(p.argmax())
        row: dict[str, Any] = {"text": texts[i]}
        if pairs is not None:
            row["text_pair"] = pairs[i]
        row.update(label=id2label.get(best, str(best)), score=round(float(p[best]), 6))
        row.update({f"prob_{id2label.get(j, str(j))}": round(float(q), 6) for j, q in enumerate(p)})
        out.append(row)
    return out


@PREDICTORS.register("text_classification")
def predict(run: Any, args: Any) -> list[dict[str, Any]]:
    """Predict with a finished run: `--text` (repeatable) or `--file` (CSV/TSV/JSONL/Parquet with the
    run's text column, or a `text` column). A file's own columns come through in each row (a name the
    prediction uses, e.g. `label`, as `input_label`), and when it has the run's label column, accuracy and
    macro-F1 against it go to stderr in one line."""
    from tunelab.tokenizers import load_hf_tokenizer
    from tunelab.weights import unwrap_model

    opts = TextClassificationOptions.model_validate(
        {k: v for k, v in run.cfg.data.kwargs.items() if k != "name"}
    )
    model = unwrap_model(run.model)
    tokenizer = load_hf_tokenizer(
        getattr(model, "tunelab_tokenizer_source", None) or _tokenizer_path(opts, run.cfg)
    )
    text = _arg(args, "text")
    file = _arg(args, "file")
    pairs, rows = None, None
    if file:
        rows = read_rows(str(file))
        column = opts.text_column if opts.text_column in rows.columns else "text"
        texts = _texts(rows, column, "text_column")
        if opts.text_pair_column and opts.text_pair_column in rows.columns:
            pairs = _texts(rows, opts.text_pair_column, "text_pair_column")
    elif text is not None:
        texts = [text] if isinstance(text, str) else list(text)
        pair = _arg(args, "text_pair")
        if pair is not None:
            pairs = [pair] if isinstance(pair, str) else list(pair)
            if len(pairs) != len(texts):
                raise ConfigError(
                    f"predict: {len(texts)} --text but {len(pairs)} --text-pair; give one pair per text"
                )
    else:
        raise ConfigError('predict: give --text "..." or --file in.csv')
    batch_size = _arg(args, "batch_size") or run.cfg.eval.batch_size or run.cfg.train.batch_size
    predicted = predict_texts(model, tokenizer, texts, pairs, opts.max_length, batch_size)
    if rows is None:
        return predicted
    if opts.label_column in rows.columns:
        print(label_summary(rows, opts.label_column, predicted, model), file=sys.stderr)
    return with_input_columns(rows, predicted)


def with_input_columns(rows: Rows, predicted: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each input row's columns, then the prediction (its text is already among the columns); an input
    column named like a prediction field is kept as `input_<name>`."""
    out = []
    for i, p in enumerate(predicted):
        fields = {k: v for k, v in p.items() if k not in ("text", "text_pair")}
        row = {(f"input_{k}" if k in fields else k): v[i] for k, v in rows.columns.items()}
        row.update(fields)
        out.append(row)
    return out


def label_summary(rows: Rows, column: str, predicted: list[dict[str, Any]], model: torch.nn.Module) -> str:
    """One line: accuracy and macro-F1 of the predictions against the file's label column (names or ids)."""
    from torchmetrics.functional.classification import multiclass_accuracy, multiclass_f1_score

    id2label = getattr(model.config, "id2label", {}) or {}
    names = [id2label.get(i, id2label.get(str(i), str(i))) for i in range(model.config.num_labels)]
    _, lookup = label_vocabulary([], names)
    try:
        truth = encode_labels(_raw_labels(rows, column), lookup, rows, names, "predict")
    except DataError as e:
        return f"no accuracy against column `{column}`: {e}"
    guess = torch.tensor([lookup[p["label"]] for p in predicted])
    n = len(names)
    accuracy = float(multiclass_accuracy(guess, truth, n, average="micro"))
    f1 = float(multiclass_f1_score(guess, truth, n, average="macro"))
    return f"against column `{column}` ({len(truth)} rows): accuracy {accuracy:.4f}, macro-F1 {f1:.4f}"
