"""The training engine: Trainer, callbacks, checkpoints, distributed helpers."""

from tunelab.engine.callbacks import Callback, EarlyStopping
from tunelab.engine.checkpoint import CheckpointManager
from tunelab.engine.trainer import Trainer

__all__ = ["Callback", "CheckpointManager", "EarlyStopping", "Trainer"]
