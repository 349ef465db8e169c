"""Named registries with lazy imports, so that a new model source, task, data source or strategy is
one new file: its module registers itself, and the registry imports it only when its name is asked for
(the core CLI never pays for importing transformers or torchvision it does not use)."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

from tunelab.errors import TunelabError, did_you_mean


class Registry:
    def __init__(self, kind: str, lazy: dict[str, str] | None = None):
        self.kind = kind
        self._entries: dict[str, Any] = {}
        self._lazy = dict(lazy or {})  # name -> module whose import registers it

    def register(self, name: str, obj: Any = None) -> Any:
        """Register `obj` under `name`; usable as a decorator when obj is omitted."""

        def deco(o: Any) -> Any:
            self._entries[name] = o
            return o

        return deco(obj) if obj is not None else deco

    def get(self, name: str) -> Any:
        if name not in self._entries and name in self._lazy:
            module = self._lazy[name]
            try:
                importlib.import_module(module)
            except ImportError as e:  # a missing optional dependency
                raise TunelabError(
                    f"{self.kind} `{name}` needs an optional dependency that is not installed ({e.name or e}); "
                    f"install the matching extra, e.g. pip install 'tunelab[all]'"
                ) from e
        if name not in self._entries:
            raise TunelabError(
                f"unknown {self.kind} `{name}`{did_you_mean(name, self.names())}; known: {', '.join(self.names())}"
            )
        return self._entries[name]

    def __contains__(self, name: str) -> bool:
        return name in self._entries or name in self._lazy

    def entries(self) -> dict[str, Any]:
        """The entries registered so far (lazy ones only once their module is imported)."""
        return dict(self._entries)

    def lazy_modules(self) -> list[str]:
        return list(self._lazy.values())

    def names(self) -> list[str]:
        return sorted(set(self._entries) | set(self._lazy))


def lazy_registry(kind: str, lazy: dict[str, str]) -> Registry:
    return Registry(kind, lazy)


Builder = Callable[..., Any]


# The registries. The lazy tables name the module that registers each built-in entry.
MODELS = Registry(
    "model",
    {
        "mlp": "tunelab.models.builtin",
        "cnn": "tunelab.models.builtin",
        "linear": "tunelab.models.builtin",
        "gpt": "tunelab.models.gpt",
        "hf": "tunelab.models.hf",
        "hf_causal_lm": "tunelab.models.llm",
        "torchvision": "tunelab.models.vision",
        "timm": "tunelab.models.vision",
    },
)
TASKS = Registry(
    "task",
    {
        "classification": "tunelab.tasks.classification",
        "image_classification": "tunelab.data.images",
        "multilabel": "tunelab.tasks.classification",
        "regression": "tunelab.tasks.regression",
        "causal_lm": "tunelab.tasks.causal_lm",
    },
)
DATA = Registry(
    "data source",
    {
        "digits": "tunelab.data.tabular",
        "mnist": "tunelab.data.tabular",
        "text_classification": "tunelab.data.text",
        "image_folder": "tunelab.data.images",
        "image_csv": "tunelab.data.images",
        "tokens": "tunelab.data.tokens",
        "instruct": "tunelab.data.chat",
    },
)
STRATEGIES = Registry(
    "strategy",
    {
        **{n: "tunelab.strategies" for n in ("full", "freeze", "finetune", "layerwise_lr", "gradual_unfreeze")},
        "lora": "tunelab.strategies.lora",
    },
)
# `tunelab predict` and `tunelab generate` dispatch on the run's data source / model name.
PREDICTORS = Registry(
    "predictor",
    {
        "text_classification": "tunelab.data.text",
        "image_folder": "tunelab.data.images",
        "image_csv": "tunelab.data.images",
    },
)
GENERATORS = Registry("generator", {"gpt": "tunelab.models.gpt", "hf_causal_lm": "tunelab.models.llm"})
# Extra CLI subcommands contributed by plug-in modules: name -> module defining `add_parser(sub)`.
COMMANDS = Registry(
    "command",
    {
        "lr-find": "tunelab.insight.lr_finder",
        "plan": "tunelab.insight.plan",
        "report": "tunelab.insight.report",
        "export": "tunelab.export",
    },
)
