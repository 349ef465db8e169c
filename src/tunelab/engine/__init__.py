"""The training engine: Trainer, callbacks, checkpoints, distributed helpers."""

from tunelab.callbacks import Callback
from tunelab.engine.callbacks import EarlyStopping
from tunelab.engine.checkpoint import CheckpointManager
from tunelab.engine.trainer import Trainer

__all__ = ["Callback", "CheckpointManager", "EarlyStopping", "Trainer"]
