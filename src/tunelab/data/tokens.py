"""Data source `tokens`: a plain-text corpus tokenised once into memory-mapped token files, then
fixed-length windows for causal language modelling (task `causal_lm`).

    data: {name: tokens, path: ../shared/data/tinyshakespeare/input.txt, tokenizer: char, block_size: 64}

- Tokenisation runs once per (corpus bytes, tokenizer, split): the cache folder holds `train.bin` and
  `val.bin` (uint16 when the vocabulary fits, else uint32), `meta.json` and the tokenizer; later runs
  memory-map them (no copy into RAM, free to share between DataLoader workers).
- `sampling: random` (default): every offset of the training tokens starts a window, and the trainer's
  shuffled sampler (a pure function of seed and epoch) picks among them: random contiguous windows that
  a resumed run replays exactly. `sampling: sequential`: non-overlapping windows (each token once per
  epoch). Validation always uses non-overlapping windows in order.
- Batches are `{"input_ids", "labels"}` with labels already shifted (labels[t] = input_ids[t + 1]).
- The tokenizer is saved with the run (`RUN_DIR/tokenizer/`); resuming with a different one is an error.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field
from torch.utils.data import Dataset

from tunelab.callbacks import Callback
from tunelab.config import RunConfig
from tunelab.data.base import DataBundle, register_data, validate_options
from tunelab.errors import ConfigError, DataError
from tunelab.io import sha256_file, write_dir_atomically
from tunelab.paths import resolve_path
from tunelab.registry import model_hint
from tunelab.tokenizers import TextTokenizer, build_tokenizer, load_text_tokenizer, token_dtype

CACHE_VERSION = 2  # 2: meta.json holds each token file's sha256, checked at every use


class TokensOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    path: str = Field(description="plain-text corpus (UTF-8)")
    tokenizer: str = "char"  # char | bpe | path to a Hugging Face tokenizer folder
    vocab_size: int | None = Field(None, gt=0)  # bpe: vocabulary to train
    block_size: int | None = Field(None, gt=0)  # None: the model's block_size
    val_fraction: float = Field(0.1, ge=0, lt=1)  # the last fraction of the corpus
    sampling: Literal["random", "sequential"] = "random"
    dtype: Literal["auto", "uint16", "uint32"] = "auto"
    cache_dir: str | None = None  # default: $TUNELAB_CACHE/tokens or ~/.cache/tunelab/tokens


class TokenWindows(Dataset):
    """Windows of `block_size + 1` tokens from a token file, starting every `stride` tokens.
    The memmap opens lazily so the dataset pickles cheaply into DataLoader workers."""

    def __init__(self, path: Path, dtype: np.dtype, block_size: int, stride: int):
        self.path, self.dtype, self.block_size, self.stride = Path(path), np.dtype(dtype), block_size, stride
        n_tokens = self.path.stat().st_size // self.dtype.itemsize
        self.n = max(0, (n_tokens - block_size - 1) // stride + 1)
        self._tokens: np.ndarray | None = None

    @property
    def tokens(self) -> np.ndarray:
        if self._tokens is None:
            self._tokens = np.memmap(self.path, dtype=self.dtype, mode="r")
        return self._tokens

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_tokens": None}

    def __len__(self) -> int:
        return self.n

    def window(self, index: int) -> torch.Tensor:
        if not 0 <= index < self.n:
            raise IndexError(index)
        start = index * self.stride
        return torch.from_numpy(self.tokens[start : start + self.block_size + 1].astype(np.int64))

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        w = self.window(index)
        return {"input_ids": w[:-1], "labels": w[1:]}


def collate_windows(samples: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Stack equal-length windows (no padding needed)."""
    return {"input_ids": torch.stack([s["input_ids"] for s in samples]),
            "labels": torch.stack([s["labels"] for s in samples])}  # fmt: skip


# -- tokenise once, cached ---------------------------------------------------------------------------


def default_cache_dir() -> Path:
    root = os.environ.get("TUNELAB_CACHE")
    return (Path(root) if root else Path.home() / ".cache" / "tunelab") / "tokens"


def _read_corpus(path: Path) -> str:
    if not path.is_file():
        raise DataError(f"`data.path` = {str(path)!r}: corpus file not found")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text (byte {e.start}); convert the corpus to UTF-8") from e


def prepare_tokens(opts: TokensOptions) -> Path:
    """Tokenise the corpus into `<cache>/<key>/{train,val}.bin` (once) and return that folder.
    The key hashes the corpus bytes and every option that changes the tokens."""
    corpus = resolve_path(opts.path)
    if not corpus.is_file():
        raise DataError(f"`data.path` = {opts.path!r}: corpus file not found")
    key_fields = {
        "v": CACHE_VERSION,
        "corpus": sha256_file(corpus),
        "tokenizer": opts.tokenizer
        if opts.tokenizer in ("char", "bpe")
        else str(resolve_path(opts.tokenizer)),
        "vocab_size": opts.vocab_size,
        "val_fraction": opts.val_fraction,
        "dtype": opts.dtype,
    }
    key = hashlib.sha256(json.dumps(key_fields, sort_keys=True).encode()).hexdigest()[:20]
    cache = Path(opts.cache_dir).expanduser() if opts.cache_dir else default_cache_dir()
    folder = cache / key
    if folder.is_dir():
        problem = cache_problem(folder)
        if problem is None:
            return folder
        print(f"warning: rebuilding the token cache {folder}: {problem}", file=sys.stderr)
        shutil.rmtree(folder, ignore_errors=True)

    text = _read_corpus(corpus)
    tokenizer = build_tokenizer(opts.tokenizer, text, opts.vocab_size)
    dtype = token_dtype(tokenizer.vocab_size, opts.dtype)
    ids = tokenizer.encode_corpus(text)
    n_train = int(len(ids) * (1 - opts.val_fraction))

    def fill(tmp: Path) -> None:
        ids[:n_train].astype(dtype).tofile(tmp / "train.bin")
        ids[n_train:].astype(dtype).tofile(tmp / "val.bin")
        tokenizer.save(tmp / "tokenizer")
        meta = {**key_fields, "corpus_path": str(corpus), "dtype": dtype.name, "vocab_size": tokenizer.vocab_size,
                "n_train": n_train, "n_val": len(ids) - n_train, "fingerprint": tokenizer.fingerprint(),
                "sha256": {s: sha256_file(tmp / f"{s}.bin") for s in ("train", "val")}}  # fmt: skip
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2))

    write_dir_atomically(folder, fill, manifest=False)  # a concurrent builder's identical folder is replaced
    return folder


def cache_problem(folder: Path) -> str | None:
    """What is wrong with a token cache folder (None when it is intact): each token file must have the size
    and sha256 its meta.json recorded, and no token id may reach past the vocabulary."""
    try:
        meta = json.loads((folder / "meta.json").read_text())
        dtype, vocab = np.dtype(meta["dtype"]), int(meta["vocab_size"])
        digests = meta["sha256"]
    except (OSError, ValueError, KeyError, TypeError):
        return "meta.json is missing or unreadable"
    for split in ("train", "val"):
        path = folder / f"{split}.bin"
        want = int(meta[f"n_{split}"]) * dtype.itemsize
        if not path.is_file() or path.stat().st_size != want:
            return f"{path.name} has {path.stat().st_size if path.is_file() else 0:,} bytes, {want:,} expected"
        if sha256_file(path) != digests.get(split):
            return f"{path.name} does not match its sha256 (changed on disk)"
        tokens = np.memmap(path, dtype=dtype, mode="r")
        if len(tokens) and int(tokens.max()) >= vocab:
            return f"{path.name} holds token id {int(tokens.max())}, past the vocabulary of {vocab}"
    return None


# -- the data source ---------------------------------------------------------------------------------


class TokenizerArtifact(Callback):
    """Saves the tokenizer with the run as `RUN_DIR/tokenizer/` (generation and export read it there)."""

    def __init__(self, tokenizer: TextTokenizer):
        self.tokenizer = tokenizer

    def on_fit_start(self, trainer: Any) -> None:
        if getattr(trainer, "is_main", True):
            self.tokenizer.save(Path(trainer.output_dir) / "tokenizer")


def check_same_tokenizer(saved: TextTokenizer, current: TextTokenizer, where: Path) -> None:
    if saved.fingerprint() != current.fingerprint():
        raise DataError(
            f"{where}: this run was started with a different tokenizer ({saved.kind}, {saved.vocab_size} tokens) "
            f"than the one configured now ({current.kind}, {current.vocab_size} tokens); resume with the "
            "original data.tokenizer / data.path, or start a new run (--overwrite or another name)"
        )


def _model_block_size(cfg: RunConfig) -> int | None:
    """The model's context length: `model.block_size`, else what its source says for its size."""
    kwargs = cfg.model.kwargs
    if kwargs.get("block_size"):
        return int(kwargs["block_size"])
    return model_hint(cfg.model.name, kwargs, "block_size")


def _block_size(opts: TokensOptions, cfg: RunConfig) -> int:
    """Tokens per training window: `data.block_size`, else the model's; never longer than the model's."""
    block_size = opts.block_size or _model_block_size(cfg)
    if block_size is None:
        raise ConfigError("`data.block_size` is required (tokens per training window), e.g. data.block_size=256")
    model_block = _model_block_size(cfg)
    if model_block and block_size > int(model_block):
        raise ConfigError(
            f"`data.block_size` = {block_size} is longer than `model.block_size` = {model_block}; "
            "make them equal or shorten data.block_size"
        )
    return block_size


@register_data("tokens")
def build(cfg: RunConfig) -> DataBundle:
    opts = validate_options(TokensOptions, cfg)
    block_size = _block_size(opts, cfg)
    folder = prepare_tokens(opts)
    meta = json.loads((folder / "meta.json").read_text())
    tokenizer = load_text_tokenizer(folder / "tokenizer")
    run_tokenizer = cfg.output_dir / "tokenizer"
    if (run_tokenizer / "tunelab_tokenizer.json").is_file():  # the run folder survives only for a resume
        check_same_tokenizer(load_text_tokenizer(run_tokenizer), tokenizer, run_tokenizer)
    dtype = np.dtype(meta["dtype"])
    need = block_size + 1
    if meta["n_train"] < need:
        raise DataError(
            f"{opts.path}: the training split has {meta['n_train']:,} tokens, shorter than one window "
            f"(block_size + 1 = {need:,}); use a longer corpus or a smaller data.block_size"
        )
    if opts.val_fraction > 0 and meta["n_val"] < need:
        raise DataError(
            f"{opts.path}: the validation split ({opts.val_fraction:.0%} of the corpus) has {meta['n_val']:,} "
            f"tokens, shorter than one window ({need:,}); raise data.val_fraction, use a longer corpus, "
            "or set data.val_fraction=0"
        )
    # Unset, `model.vocab_size` becomes the tokenizer's (run.fill_model_from_data).
    if cfg.model.kwargs.get("vocab_size") and cfg.model.kwargs["vocab_size"] < tokenizer.vocab_size:
        raise ConfigError(
            f"`model.vocab_size` = {cfg.model.kwargs['vocab_size']} is smaller than the tokenizer's "
            f"{tokenizer.vocab_size} tokens; remove model.vocab_size (it defaults to the tokenizer's) or raise it"
        )
    stride = 1 if opts.sampling == "random" else block_size
    train = TokenWindows(folder / "train.bin", dtype, block_size, stride)
    val = None
    if opts.val_fraction > 0:
        val = TokenWindows(folder / "val.bin", dtype, block_size, block_size)
        # Whole eval batches only: a compiled model then sees one eval shape (a ragged last batch would
        # cost a recompile); at most batch_size - 1 windows of the tail are left out.
        eval_bs = cfg.eval.batch_size or cfg.train.batch_size
        if len(val) > eval_bs:
            val.n -= len(val) % eval_bs

    return DataBundle(
        train=train,
        eval=val,
        collate_fn=collate_windows,
        num_classes=tokenizer.vocab_size,
        vocab_size=tokenizer.vocab_size,
        info={
            "vocab_size": tokenizer.vocab_size,
            "tokenizer": tokenizer.kind,
            "block_size": block_size,
            "train_tokens": meta["n_train"],
            "val_tokens": meta["n_val"],
            "train_windows": len(train),
            "cache": str(folder),
        },
        callbacks=[TokenizerArtifact(tokenizer)],
        tokens_per_sample=block_size,
    )
