"""tunelab: a PyTorch-2 toolkit for developing and fine-tuning models.

The six steps, as the public API:
  1. define      create_model("cnn", num_classes=10) or any nn.Module
  2. initialise  init_weights(model, "normal", std=0.01)
  3. load        load_pretrained(model, path, allow_missing=["fc.*"]) -> LoadReport
  4. loss/optim  build_task("classification", loss=LossConfig(...)), OptimConfig, ScheduleConfig
  5. train       Trainer(model, task, train_data, eval_data, ...).fit()
  6. evaluate    trainer.evaluate()
Names are imported lazily so that `import tunelab` stays cheap.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "create_model": "tunelab.models",
    "register_model": "tunelab.models",
    "init_weights": "tunelab.weights",
    "load_pretrained": "tunelab.weights",
    "LoadReport": "tunelab.weights",
    "count_parameters": "tunelab.weights",
    "build_task": "tunelab.tasks",
    "register_task": "tunelab.tasks",
    "Task": "tunelab.tasks",
    "Trainer": "tunelab.engine",
    "Callback": "tunelab.callbacks",
    "EarlyStopping": "tunelab.engine",
    "TensorDataset": "tunelab.data.base",
    "DataBundle": "tunelab.data.base",
    "register_data": "tunelab.data.base",
    "RunConfig": "tunelab.config",
    "load_config": "tunelab.config",
    "train": "tunelab.run",
    "build_run": "tunelab.run",
    "load_run": "tunelab.run",
    "sweep": "tunelab.sweeps",
    "TunelabError": "tunelab.errors",
}
_ALIASES = {
    "OptimConfig": ("tunelab.config", "OptimSection"),
    "ScheduleConfig": ("tunelab.config", "ScheduleSection"),
    "TrainConfig": ("tunelab.config", "TrainSection"),
    "EvalConfig": ("tunelab.config", "EvalSection"),
    "LossConfig": ("tunelab.config", "LossSection"),
    "EarlyStoppingConfig": ("tunelab.config", "EarlyStoppingSection"),
}

__all__ = sorted([*_EXPORTS, *_ALIASES])


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    if name in _ALIASES:
        module, attr = _ALIASES[name]
        return getattr(importlib.import_module(module), attr)
    raise AttributeError(f"module 'tunelab' has no attribute {name!r}")
