"""Where a Hugging Face model comes from: a local folder (`pkg://` and `~` resolved), a GGUF file
(converted once to a cached folder by `models.llm`), or a hub id. One resolver for every HF model source.

A folder that tunelab wrote (a run's final/ or best/, a cached GGUF conversion) carries a sha256 manifest;
it is checked before transformers reads the weights, so a tampered folder is refused, never loaded.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from tunelab.errors import ConfigError
from tunelab.io import MANIFEST, verify_folder
from tunelab.paths import resolve_path


def resolve_model_path(path: str | os.PathLike, gguf: Callable[[Path], Path] | None = None) -> str:
    """A local Hugging Face folder for `path`, or the string unchanged as a hub id (transformers resolves it;
    offline, from its local cache). `gguf` converts a .gguf file to a folder; without it a file is an error."""
    local = resolve_path(path)
    if local.is_file():
        if gguf is not None and local.suffix == ".gguf":
            return str(gguf(local))
        want = "a .gguf file or a Hugging Face model folder" if gguf else "the model folder that holds config.json"
        raise ConfigError(f"model.path = {str(path)!r} is a file; give {want}")
    if local.is_dir():
        if not (local / "config.json").is_file():
            raise ConfigError(f"model.path = {str(path)!r}: folder {local} has no config.json; is this a "
                              "Hugging Face model folder?")
        if (local / MANIFEST).is_file():
            verify_folder(local)
        return str(local)
    text = str(path)
    if text.startswith(("/", ".", "~", "pkg://")) or text.endswith(".gguf") or text.count("/") > 1:
        raise ConfigError(f"model.path = {text!r}: no such file or folder")
    return text  # a hub id such as `bert-base-uncased` or `org/name`
