"""Where a Hugging Face model comes from: a local folder (`pkg://` and `~` resolved), a GGUF file, or a hub
id. One resolver for every HF model source and tokenizer.

A GGUF file is dequantised once by transformers (with the `gguf` package) and written as a plain fp32
Hugging Face folder under the tunelab cache (`$TUNELAB_CACHE` or `~/.cache/tunelab`), so every later load
is a fast safetensors read.

A folder that tunelab wrote (a run's final/ or best/, a cached GGUF conversion) carries a sha256 manifest;
it is checked before transformers reads the weights, so a tampered folder is refused, never loaded.
"""

from __future__ import annotations

import hashlib
import os
import sys
from pathlib import Path

from tunelab.errors import CheckpointError, ConfigError, TunelabError
from tunelab.io import MANIFEST, verify_folder, write_dir_atomically
from tunelab.paths import resolve_path


def resolve_model_path(path: str | os.PathLike, gguf: bool = True) -> str:
    """A local Hugging Face folder for `path`, or the string unchanged as a hub id (transformers resolves it;
    offline, from its local cache). With `gguf`, a .gguf file is converted once to a cached folder."""
    local = resolve_path(path)
    if local.is_file():
        if gguf and local.suffix == ".gguf":
            return str(convert_gguf(local))
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


def cache_dir() -> Path:
    """Root of tunelab's cache of converted models (`TUNELAB_CACHE` or `~/.cache/tunelab`)."""
    return Path(os.environ.get("TUNELAB_CACHE") or Path.home() / ".cache" / "tunelab")


def _gguf_cache_folder(gguf: Path) -> Path:
    st = gguf.stat()
    key = f"{gguf.resolve()}|{st.st_size}|{int(st.st_mtime)}"
    digest = hashlib.sha256(key.encode()).hexdigest()[:12]
    return cache_dir() / "hf" / f"{gguf.stem}-{digest}-fp32"


def convert_gguf(gguf: Path) -> Path:
    """Dequantise a GGUF file into a cached fp32 Hugging Face folder (once) and return the folder.

    transformers 5 refuses `save_pretrained` on a model loaded from GGUF because it keeps the GGUF
    quantizer state; the weights are already dense floats, so that state is dropped before saving. The
    folder appears atomically (written beside it, then renamed) so concurrent runs never see half a folder.
    """
    target = _gguf_cache_folder(gguf)
    if target.is_dir():
        try:
            verify_folder(target)
            return target
        except CheckpointError as e:  # a damaged cache entry is rebuilt, never trusted
            print(f"warning: rebuilding the cached conversion: {e}", file=sys.stderr)
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    print(f"tunelab: converting {gguf.name} to a cached fp32 folder {target} (once)", file=sys.stderr)
    try:
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    except Exception as e:  # transformers raises many types for unsupported/corrupt files
        raise TunelabError(f"{gguf}: cannot load this GGUF file with transformers ({e})") from e
    not_dense = [n for n, p in model.named_parameters() if not p.dtype.is_floating_point]
    if not_dense:
        raise TunelabError(f"{gguf}: weights were not dequantised ({not_dense[0]}, ...); cannot convert")
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config.use_cache = True

    def fill(tmp: Path) -> None:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)

    write_dir_atomically(target, fill)  # with a manifest, checked at every later use
    return target
