"""Tokenizers, in one place, one loader per kind:

- `load_hf_tokenizer(path)`: a Hugging Face tokenizer (transformers' `PreTrainedTokenizer`) of a model
  folder, `pkg://` folder, GGUF file or hub id, with a pad token; what encoders and chat models use.
- `build_tokenizer` / `load_text_tokenizer` / `load_run_tokenizer`: tunelab's `TextTokenizer` for pretraining:
  characters, byte-level BPE trained on your corpus, or any Hugging Face tokenizer folder. Each saves itself into a folder (kept with the run as `RUN_DIR/tokenizer/`) and has a
`fingerprint()` so that a resumed run can refuse a different tokenizer than the one it started with.

    tok = build_tokenizer("char", corpus_text)           # or "bpe" (vocab_size=...), or a folder path
    ids = tok.encode("To be"); text = tok.decode(ids)
    tok.save(folder); tok = load_text_tokenizer(folder)
"""

from __future__ import annotations

import functools
import hashlib
import json
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any

import numpy as np

from tunelab.errors import ConfigError, DataError, TunelabError
from tunelab.io import write_dir_atomically

META = "tunelab_tokenizer.json"
EOS_TOKEN = "<|endoftext|>"


class TextTokenizer(ABC):
    """Text <-> token ids. Subclasses set `kind` and implement the abstract methods."""

    kind = "base"
    eos_id: int | None = None

    @property
    @abstractmethod
    def vocab_size(self) -> int: ...

    @abstractmethod
    def encode(self, text: str) -> list[int]: ...

    @abstractmethod
    def decode(self, ids: list[int]) -> str: ...

    @abstractmethod
    def _save_files(self, folder: Path) -> dict[str, Any]:
        """Write the tokenizer's own files into `folder`; return extra fields for the META file."""

    @abstractmethod
    def _identity(self) -> str:
        """A canonical string that changes whenever the token <-> id mapping changes."""

    def encode_corpus(self, text: str) -> np.ndarray:
        """Token ids of a whole corpus (int64). Subclasses override with a faster path."""
        return np.asarray(self.encode(text), dtype=np.int64)

    def fingerprint(self) -> str:
        return hashlib.sha256(f"{self.kind}\n{self._identity()}".encode()).hexdigest()[:16]

    def save(self, folder: str | Path) -> Path:
        """Write the tokenizer into `folder` atomically (a temp folder renamed into place)."""
        folder = Path(folder)

        def fill(tmp: Path) -> None:
            extra = self._save_files(tmp)
            meta = {"type": self.kind, "vocab_size": self.vocab_size, "fingerprint": self.fingerprint(), **extra}
            (tmp / META).write_text(json.dumps(meta, indent=2, ensure_ascii=False))

        write_dir_atomically(folder, fill, manifest=False)
        return folder


class CharTokenizer(TextTokenizer):
    """One id per distinct character of the corpus, in sorted order (nanoGPT's shakespeare_char)."""

    kind = "char"

    def __init__(self, chars: str):
        self.chars = "".join(sorted(set(chars)))
        self.stoi = {c: i for i, c in enumerate(self.chars)}

    @classmethod
    def train(cls, text: str) -> CharTokenizer:
        return cls(text)

    @property
    def vocab_size(self) -> int:
        return len(self.chars)

    def encode(self, text: str) -> list[int]:
        try:
            return [self.stoi[c] for c in text]
        except KeyError as e:
            raise DataError(
                f"character {e.args[0]!r} is not in this character-level vocabulary "
                f"({self.vocab_size} characters seen in the training corpus); remove it from the text"
            ) from None

    def encode_corpus(self, text: str) -> np.ndarray:
        # a lookup table over code points: ~50x faster than the dict comprehension on a 1 MB corpus
        codes = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
        table = np.full(max(map(ord, self.chars)) + 1, -1, dtype=np.int64)
        table[[ord(c) for c in self.chars]] = np.arange(self.vocab_size)
        ids = table[np.minimum(codes, len(table) - 1)]
        bad = (ids < 0) | (codes >= len(table))
        if bad.any():
            self.encode(text[int(np.argmax(bad))])  # raises the DataError naming the character
        return ids

    def decode(self, ids: list[int]) -> str:
        return "".join(self.chars[i] for i in ids)

    def _save_files(self, folder: Path) -> dict[str, Any]:
        return {"chars": self.chars}

    def _identity(self) -> str:
        return self.chars


class BPETokenizer(TextTokenizer):
    """Byte-level BPE (GPT-2's scheme) from the `tokenizers` library; `<|endoftext|>` is id 0 and EOS."""

    kind = "bpe"

    def __init__(self, tokenizer: Any):
        self.tok = tokenizer
        self.eos_id = tokenizer.token_to_id(EOS_TOKEN)

    @classmethod
    def train(cls, text: str, vocab_size: int) -> BPETokenizer:
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

        if vocab_size < 257:
            raise ConfigError(
                f"`data.vocab_size` = {vocab_size} is too small for byte-level BPE: it needs at least 257 "
                "(256 bytes + <|endoftext|>)"
            )
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=[EOS_TOKEN],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        tok.train_from_iterator(_chunks(text), trainer=trainer, length=None)
        return cls(tok)

    @property
    def vocab_size(self) -> int:
        return self.tok.get_vocab_size()

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text).ids

    def encode_corpus(self, text: str) -> np.ndarray:
        encodings = self.tok.encode_batch(list(_chunks(text)))
        return np.concatenate(
            [np.asarray(e.ids, dtype=np.int64) for e in encodings] or [np.zeros(0, np.int64)]
        )

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids)

    def _save_files(self, folder: Path) -> dict[str, Any]:
        self.tok.save(str(folder / "tokenizer.json"))
        return {}

    def _identity(self) -> str:
        return self.tok.to_str()


class HFTokenizer(TextTokenizer):
    """Any tokenizer `transformers.AutoTokenizer` loads from a local folder (offline)."""

    kind = "hf"

    def __init__(self, tokenizer: Any):
        self.tok = tokenizer
        self.eos_id = tokenizer.eos_token_id

    @classmethod
    def from_path(cls, path: str | Path) -> HFTokenizer:
        from transformers import AutoTokenizer

        try:
            return cls(AutoTokenizer.from_pretrained(str(path), local_files_only=True))
        except (OSError, ValueError) as e:
            raise ConfigError(
                f"`data.tokenizer` = {str(path)!r}: cannot load a tokenizer from it ({e})"
            ) from e

    @property
    def vocab_size(self) -> int:
        return len(self.tok)

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False)

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids)

    def _save_files(self, folder: Path) -> dict[str, Any]:
        self.tok.save_pretrained(str(folder))
        return {}

    def _identity(self) -> str:
        return json.dumps(sorted(self.tok.get_vocab().items()), ensure_ascii=False)


def _chunks(text: str, size: int = 1 << 16) -> list[str]:
    """Split `text` into ~64 KB pieces at line ends, so tokenisation can run in parallel; byte-level
    pre-tokenisation never merges across a newline-then-text boundary, so the ids are the same."""
    out, start = [], 0
    while start < len(text):
        end = text.find("\n", start + size)
        end = len(text) if end < 0 else end + 1
        out.append(text[start:end])
        start = end
    return out


def build_tokenizer(spec: str, text: str, vocab_size: int | None = None) -> TextTokenizer:
    """`char`, `bpe` (trained on `text` to `vocab_size` tokens) or a path to a Hugging Face tokenizer."""
    if spec == "char":
        return CharTokenizer.train(text)
    if spec == "bpe":
        if vocab_size is None:
            raise ConfigError("`data.tokenizer` = 'bpe' needs `data.vocab_size` (e.g. 4096)")
        return BPETokenizer.train(text, vocab_size)
    from tunelab.paths import resolve_path

    path = resolve_path(spec)
    if not path.exists():
        raise ConfigError(
            f"`data.tokenizer` = {spec!r} is neither `char`, `bpe` nor an existing tokenizer folder"
        )
    if (path / META).is_file():
        return load_text_tokenizer(path)
    return HFTokenizer.from_path(path)


def load_text_tokenizer(folder: str | Path) -> TextTokenizer:
    """Rebuild a tokenizer that `TextTokenizer.save` wrote; a damaged one is one line (DataError)."""
    folder = Path(folder)
    meta_path = folder / META
    if not meta_path.is_file():
        raise DataError(f"{folder}: no {META}; not a tokenizer saved by tunelab")
    try:
        meta = json.loads(meta_path.read_text())
        kind = meta.get("type")
        if kind == "char":
            return CharTokenizer(meta["chars"])
        if kind == "bpe":
            from tokenizers import Tokenizer

            return BPETokenizer(Tokenizer.from_file(str(folder / "tokenizer.json")))
        if kind == "hf":
            return HFTokenizer.from_path(folder)
    except TunelabError:
        raise
    except Exception as e:  # json, KeyError, and the tokenizers library's plain Exception for a bad file
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
        raise DataError(f"{folder}: damaged tokenizer ({first}); use an intact copy of the run") from e
    raise DataError(f"{meta_path}: unknown tokenizer type {kind!r}")


def load_run_tokenizer(run_dir: str | Path) -> TextTokenizer:
    """The tokenizer a run trained with (`RUN_DIR/tokenizer/`)."""
    folder = Path(run_dir) / "tokenizer"
    if not folder.is_dir():
        raise DataError(f"{run_dir}: no tokenizer/ folder; was this run trained with data.name=tokens?")
    return load_text_tokenizer(folder)


def token_dtype(vocab_size: int, requested: str = "auto") -> np.dtype:
    """uint16 when every id fits (vocab <= 65,536), else uint32; an explicit dtype that is too small is
    an error rather than silent wrap-around."""
    limits = {"uint16": 1 << 16, "uint32": 1 << 32}
    if requested == "auto":
        requested = "uint16" if vocab_size <= limits["uint16"] else "uint32"
    if requested not in limits:
        raise ConfigError(f"`data.dtype` = {requested!r} is invalid: use auto, uint16 or uint32")
    if vocab_size > limits[requested]:
        raise ConfigError(
            f"vocabulary of {vocab_size:,} tokens does not fit `data.dtype` = {requested} "
            f"(max {limits[requested]:,} ids); set data.dtype=uint32 (or auto)"
        )
    return np.dtype(requested)


# -- Hugging Face tokenizers --------------------------------------------------------------------------------
# Any one of these makes a folder's tokenizer loadable by AutoTokenizer.
HF_TOKENIZER_FILES = (
    "tokenizer.json",
    "vocab.txt",
    "spiece.model",
    "sentencepiece.bpe.model",
    "tokenizer.model",
    "vocab.json",
)


def check_hf_tokenizer_files(folder: str | Path) -> None:
    """Raise when a local model folder has no tokenizer files (a bare weights export, say)."""
    local = Path(folder)
    if local.is_dir() and not any((local / f).is_file() for f in HF_TOKENIZER_FILES):
        raise ConfigError(f"model folder {local} has no tokenizer files (one of {', '.join(HF_TOKENIZER_FILES)}); "
                          "copy them from the model the weights came from")


@functools.lru_cache(maxsize=8)
def load_hf_tokenizer(path: str) -> Any:
    """The Hugging Face tokenizer of the model at `path` (a folder, a `pkg://` folder, a GGUF file or a hub
    id), with a pad token (the EOS token when the model defines none); one-line errors when it is missing."""
    from transformers import AutoTokenizer

    from tunelab.hub import resolve_model_path
    from tunelab.paths import resolve_path

    local = resolve_path(path)
    folder = str(local) if (local / "tokenizer_config.json").is_file() else resolve_model_path(path)
    check_hf_tokenizer_files(folder)
    try:
        tok = AutoTokenizer.from_pretrained(folder)
    except (OSError, ValueError) as e:
        raise ConfigError(f"cannot load a tokenizer from {str(path)!r}: {str(e).splitlines()[0]}") from e
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok
