"""Tasks: how a batch goes through the model, the loss, and the streaming metrics."""

from tunelab.tasks.base import Task, build_task, register_task

__all__ = ["Task", "build_task", "register_task"]
