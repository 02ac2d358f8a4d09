"""The exceptions steadytrain raises; each names its culprit and says what to do."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class SteadytrainError(Exception):
    """Base class of every error steadytrain raises on purpose."""


class ConfigError(SteadytrainError, ValueError):
    """A config value is wrong; the message starts with its path (``plugins[2].decay``)."""


class FilterError(ConfigError):
    """An include/exclude pattern matched nothing, or the patterns select nothing."""


class RegistryError(SteadytrainError):
    """A plugin could not be found or loaded."""


class HookError(SteadytrainError):
    """A plugin raised inside a hook; the original exception is the ``__cause__``."""

    def __init__(self, message: str, *, id: str, hook: str, step: int) -> None:
        super().__init__(message)
        self.id = id
        self.hook = hook
        self.step = step


class UsageError(SteadytrainError, RuntimeError):
    """The host called the pipeline out of order (``after_backward()`` twice, a step hook
    before ``setup()``, ...); the message says which call was expected."""


class TrainingError(SteadytrainError, RuntimeError):
    """The run cannot go on as configured (e.g. too many optimizer steps skipped in a row)."""


class TermError(SteadytrainError, ValueError):
    """A regularizer term is not a finite scalar tensor."""


class CheckpointError(SteadytrainError):
    """A checkpoint does not fit the pipeline it is loaded into."""


def suggest(word: str, candidates: Iterable[str]) -> str:
    """Return ``" (did you mean 'x'?)"`` for close matches of *word*, or ``""``."""
    matches = difflib.get_close_matches(word, list(candidates), n=3, cutoff=0.6)
    if not matches:
        return ""
    return " (did you mean " + " or ".join(repr(m) for m in matches) + "?)"


class OptionError(SteadytrainError, ValueError):
    """Raised by a config validator: *option* is the field, *message* what is wrong with it."""

    def __init__(self, option: str, message: str) -> None:
        super().__init__(f"{option}: {message}")
        self.option = option
        self.message = message
