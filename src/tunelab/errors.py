"""User-facing errors. The CLI turns a TunelabError into one line and exit code 2."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class TunelabError(Exception):
    """An error caused by the user's input (config, data, checkpoint); its message is the whole story."""


class ConfigError(TunelabError):
    pass


class DataError(TunelabError):
    pass


class CheckpointError(TunelabError):
    pass


class TrainingDiverged(TunelabError):
    """Loss became NaN/inf. Carries the step so the run summary can say where."""

    def __init__(self, message: str, step: int):
        super().__init__(message)
        self.step = step


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    """' (did you mean `x`?)' when a close match exists, else ''."""
    match = difflib.get_close_matches(str(word), [str(c) for c in choices], n=1, cutoff=0.6)
    return f" (did you mean `{match[0]}`?)" if match else ""
