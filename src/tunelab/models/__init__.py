"""Model sources. `create_model(name, **kwargs)` is the single door in:

- a registered name: `cnn`, `mlp`, `gpt`, `hf` ...
- a registered source with an architecture: `torchvision:resnet18`, `timm:convnext_tiny`
- any importable class or factory: `my_package.models:MyNet`
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch.nn as nn

from tunelab.config import check_kwargs
from tunelab.errors import ConfigError, TunelabError
from tunelab.io import verify_if_manifested
from tunelab.registry import MODELS

MODEL_JSON = "tunelab_model.json"


@dataclass
class ModelEntry:
    build: Callable[..., nn.Module]
    # Optional: write a self-describing folder (e.g. a Hugging Face folder) / rebuild from it.
    save: Callable[[nn.Module, Path, dict[str, Any]], None] | None = None
    load: Callable[[Path, dict[str, Any]], nn.Module] | None = None
    # `save`/`load` keep a peft adapter as an adapter (final/ = PEFT folder); else LoRA is merged on save
    adapters: bool = False
    # What the source tells data sources (`block_size`, `image_preset`): fn(name, kwargs) -> dict
    hints: Callable[[str, dict[str, Any]], dict[str, Any]] | None = None
    # For FSDP: build the architecture on the meta device, fn(**kwargs) -> (model, weights path or None);
    # the weights are loaded shard by shard once the model is sharded. None: not supported by the source.
    meta: Callable[..., tuple[nn.Module, str | None]] | None = None


def register_model(name: str, save=None, load=None, adapters: bool = False, hints=None, meta=None):
    """Decorator: register a builder `fn(**kwargs) -> nn.Module` under `name` (see ModelEntry)."""

    def deco(fn):
        MODELS.register(name, ModelEntry(fn, save, load, adapters, hints, meta))
        return fn

    return deco


def names_code(name: str) -> bool:
    """Whether model name `name` is a `module:attr` import path (code to import), not a registered source."""
    return MODELS.is_import_path(name)


def _is_model_class_or_builder(obj: Any) -> bool:
    builders = {id(e.build) for e in MODELS.entries().values()}
    return (isinstance(obj, type) and issubclass(obj, nn.Module)) or id(obj) in builders


MODELS.accepts = _is_model_class_or_builder


def resolve_builder(name: str) -> tuple[ModelEntry, dict[str, Any]]:
    """The entry for `name` and the extra kwargs its name implies (`arch` for `source:arch`). An import path
    `pkg.module:attr` must name an nn.Module subclass or a builder registered with `@register_model`: never
    an arbitrary callable (a spec naming `os:system` is refused before anything is called)."""
    if not names_code(name):
        if ":" in name:
            prefix, _, arch = name.partition(":")
            return MODELS.get(prefix), {"arch": arch}
        return MODELS.get(name), {}
    obj = MODELS.resolve(name)
    registered = {id(e.build): e for e in MODELS.entries().values()}
    return registered.get(id(obj)) or ModelEntry(obj), {}


def check_trusted(spec: dict[str, Any], trust_code: bool, where: str | Path) -> None:
    """A model spec read from a file (a run's tunelab_model.json or config.yaml) may name only registered
    sources unless the user passes --trust-code: an import path, or transformers' `trust_remote_code`, runs
    code that came with the file."""
    if trust_code:
        return
    name = str(spec.get("name") or "")
    if names_code(name):
        raise TunelabError(f"{where}: the model `{name}` is Python code to import; a run folder may come from "
                           "anyone, so this needs --trust-code (pass it only for folders you trust)")
    if (spec.get("kwargs") or {}).get("trust_remote_code"):
        raise TunelabError(f"{where}: the model sets trust_remote_code, which runs the model folder's Python "
                           "files; pass --trust-code only for folders you trust")


def create_model(name: str, **kwargs: Any) -> nn.Module:
    entry, implied = resolve_builder(name)
    check_kwargs(entry.build, {**implied, **kwargs}, "model")
    try:
        model = entry.build(**implied, **kwargs)
    except (ValueError, RuntimeError) as e:  # a setting the layers refuse (dropout 1.5), or too big to allocate
        if isinstance(e, TunelabError):
            raise
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        fix = "make the model smaller" if "alloc" in first else "check them"
        raise ConfigError(f"model `{name}` cannot be built with these model.* settings ({first}); {fix}") from e
    if not isinstance(model, nn.Module):
        raise TunelabError(f"model `{name}` built a {type(model).__name__}, not a torch.nn.Module")
    return model


def keeps_adapters(spec: dict[str, Any]) -> bool:
    """Whether the source's folder format holds a peft adapter as an adapter (else LoRA is merged on save)."""
    return resolve_builder(spec["name"])[0].adapters


def save_model_folder(model: nn.Module, folder: Path, spec: dict[str, Any],
                      state_dict: dict[str, Any] | None = None) -> None:
    """Write `folder` so that `load_model_folder` rebuilds the model: the source's own format when it has
    one (a Hugging Face folder), else model.safetensors plus tunelab_model.json naming the builder.
    `state_dict`: the whole weights when `model` holds only shards (FSDP gathers them for rank 0)."""
    from tunelab.weights import save_state_dict, unwrap_model

    folder.mkdir(parents=True, exist_ok=True)
    entry, _ = resolve_builder(spec["name"])
    if entry.save is not None:
        entry.save(model, folder, spec, state_dict=state_dict)
    else:
        save_state_dict(state_dict if state_dict is not None else unwrap_model(model).state_dict(),
                        folder / "model.safetensors")
    (folder / MODEL_JSON).write_text(json.dumps(spec, indent=2))


def load_model_folder(folder: Path, trust_code: bool = False) -> nn.Module:
    """Rebuild the model a tunelab final/ or best/ folder holds (see `check_trusted` for `trust_code`)."""
    from tunelab.weights import load_exact_state_dict, load_state_dict_file, unwrap_model

    meta = folder / MODEL_JSON
    if not meta.is_file():
        raise TunelabError(f"{folder}: no {MODEL_JSON}; is this a tunelab final/ or best/ folder?")
    try:
        spec = json.loads(meta.read_text())
        if not isinstance(spec, dict) or not isinstance(spec.get("name"), str):
            raise ValueError("no model name")
    except ValueError as e:
        raise TunelabError(f"{meta}: not a tunelab model description ({e})") from e
    check_trusted(spec, trust_code, meta)
    verified = verify_if_manifested(folder)  # a folder tunelab wrote: every file as it was written, or refused
    entry, implied = resolve_builder(spec["name"])
    if entry.load is not None:
        return entry.load(folder, spec)
    model = entry.build(**implied, **spec.get("kwargs", {}))
    state = load_state_dict_file(folder / "model.safetensors", verified=verified)
    load_exact_state_dict(unwrap_model(model), state, folder / "model.safetensors",
                          f"it was changed after tunelab wrote it, or {MODEL_JSON} describes another model")
    return model


def create_model_on_meta(name: str, **kwargs: Any) -> tuple[nn.Module, str | None] | None:
    """The model on the meta device and where its weights are (for FSDP), or None when the source cannot
    build one (it is then built normally on every rank and sharded)."""
    entry, implied = resolve_builder(name)
    if entry.meta is None:
        return None
    check_kwargs(entry.build, {**implied, **kwargs}, "model")
    return entry.meta(**implied, **kwargs)
