"""Named registries with lazy imports, so that a new model source, task, data source, strategy, callback
provider or CLI command is one new file: its module registers itself, and the registry imports it only
when its name is asked for (the core CLI never pays for importing transformers or torchvision it does not
use). A name may also be an import path, `my_pkg.module:attr`, for a plug-in that lives outside the tree
(`Registry.resolve`); the object must be what the registry holds.

The registries are also how a lower layer reaches a higher one without importing it (docs/ARCHITECTURE.md):
the run asks CALLBACKS for the doctor and the report, data sources ask `model_hint` what a model expects.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

from tunelab.errors import TunelabError, did_you_mean


def import_object(path: str, kind: str) -> Any:
    """The object at `pkg.module:attr` (attr may be dotted), with one-line errors."""
    module_name, _, attr = path.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise TunelabError(f"{kind} `{path}`: cannot import module `{module_name}` ({e})") from e
    try:
        obj = module
        for part in attr.split("."):
            obj = getattr(obj, part)
    except AttributeError as e:
        raise TunelabError(f"{kind} `{path}`: module `{module_name}` has no `{attr}`") from e
    return obj


class Registry:
    """Entries by name. `accepts(obj)` (set by the package that owns the registry) says whether an object
    named by an import path may stand for an entry; `expects` says what that is, for the error."""

    def __init__(self, kind: str, lazy: dict[str, str] | None = None, expects: str = ""):
        self.kind, self.expects = kind, expects
        self._entries: dict[str, Any] = {}
        self._lazy = dict(lazy or {})  # name -> module whose import registers it
        self.accepts: Callable[[Any], bool] | None = None

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

    def is_import_path(self, name: str) -> bool:
        """`pkg.module:attr` (code outside the registry), as opposed to a name or `source:arch`."""
        prefix = name.partition(":")[0]
        return ":" in name and ("." in prefix or prefix not in self)

    def resolve(self, name: str) -> Any:
        """The entry named `name`, or for an import path the object it names, which must be a registered
        entry or pass `accepts` (never an arbitrary callable such as `os:system`)."""
        if not self.is_import_path(name):
            return self.get(name)
        obj = import_object(name, self.kind)
        if any(e is obj for e in self._entries.values()) or (self.accepts is not None and self.accepts(obj)):
            return obj
        raise TunelabError(f"{self.kind} `{name}` is a {type(obj).__name__}, not {self.expects or 'a registered entry'}")

    def __contains__(self, name: str) -> bool:
        return name in self._entries or name in self._lazy

    def entries(self) -> dict[str, Any]:
        """The entries registered so far (lazy ones only once their module is imported)."""
        return dict(self._entries)

    def names(self) -> list[str]:
        return sorted(set(self._entries) | set(self._lazy))

    def ordered(self) -> list[str]:
        """Every name, built-in ones in the order of the lazy table, then the others as registered."""
        return list(dict.fromkeys([*self._lazy, *self._entries]))


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
    expects="an nn.Module subclass or a builder registered with @tunelab.register_model",
)
TASKS = Registry(
    "task",
    {
        "classification": "tunelab.tasks.classification",
        "image_classification": "tunelab.tasks.image_classification",
        "multilabel": "tunelab.tasks.classification",
        "regression": "tunelab.tasks.regression",
        "causal_lm": "tunelab.tasks.causal_lm",
        **{n: "tunelab.tasks.preference" for n in ("dpo", "orpo", "simpo")},
    },
    expects="a subclass of tunelab.Task",
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
        "preference": "tunelab.data.preference",
    },
    expects="a function build(cfg) -> DataBundle registered with @tunelab.register_data",
)
STRATEGIES = Registry(
    "strategy",
    {
        **{n: "tunelab.strategies" for n in ("full", "freeze", "finetune", "layerwise_lr", "gradual_unfreeze")},
        "lora": "tunelab.strategies.lora",
    },
    expects="a class with the tunelab.strategies.Strategy methods (setup, on_epoch_start, on_train_mode, "
            "model_to_save, describe)",
)
# Callbacks every run gets from the layers above the run (`fn(cfg, data) -> list[Callback]`), in this order:
# the doctor's diagnoses are logged before the report reads them; MLflow tracking uploads both.
CALLBACKS = Registry(
    "callback provider",
    {
        "doctor": "tunelab.insight.doctor",
        "samples": "tunelab.insight.samples",
        "report": "tunelab.insight.report",
        "mlflow": "tunelab.tracking",
    },
)
# Settings the run resolves before it builds (`fn(cfg, log) -> cfg`): `optim.lr: auto`, `train.auto_batch`.
RESOLVERS = Registry(
    "setting resolver",
    {"optim.lr": "tunelab.insight.lr_finder", "train.auto_batch": "tunelab.insight.autobatch"},
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
GENERATORS = Registry("generator", {"gpt": "tunelab.commands.generate", "hf_causal_lm": "tunelab.commands.generate"})
# CLI subcommands: name -> module defining `add_parser(subparsers)` (which sets the handler).
COMMANDS = Registry(
    "command",
    {name: f"tunelab.commands.{name.replace('-', '_')}" for name in (
        "train", "eval", "predict", "generate", "inspect", "export", "lr-find", "plan", "report", "quickstart",
        "sweep")},
)


def model_hint(name: str, kwargs: dict[str, Any], key: str) -> Any:
    """What model source `name` says about the data it takes (`block_size`, `image_preset`, ...), asked
    through the registry so that data sources import no model code; None when the source says nothing."""
    prefix = name.partition(":")[0]
    if "." in prefix or prefix not in MODELS:
        return None
    hints = getattr(MODELS.get(prefix), "hints", None)
    return hints(name, kwargs).get(key) if hints is not None else None
