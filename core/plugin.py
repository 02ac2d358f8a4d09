"""The base class of every plugin, built-in or third-party."""

from __future__ import annotations

import inspect
from collections.abc import Iterable, Mapping
from typing import Any, ClassVar

import attrs
import torch

from .errors import CheckpointError, ConfigError
from .filters import VariableFilter
from .loss import instance_weight
from .schedules import Schedule


@attrs.frozen
class NoOptions:
    """The ``Config`` of a plugin that takes no options of its own."""


class Plugin:
    """A stabilization technique: a config, some state, and the hooks it implements.

    Subclasses set ``name`` (the entry-point name) and ``Config`` (a frozen attrs class
    whose defaults come from the literature) and implement hooks from
    :mod:`steadytrain.hookspecs` as methods marked with :data:`steadytrain.hookimpl`.

    The pipeline constructs one object per config entry, so the same plugin may appear
    several times with different ids (one per model part, one per realm). Per-instance
    settings that every plugin shares live here rather than in ``Config``: ``id``,
    ``weight`` (a number or a :mod:`~steadytrain.schedules` schedule) and the
    include/exclude patterns, available as :attr:`filter`.
    """

    name: ClassVar[str] = ""
    Config: ClassVar[type] = NoOptions
    #: Oldest steadytrain version this plugin works with, as ``"MAJOR.MINOR[.PATCH]"``.
    requires_core: ClassVar[str | None] = None
    #: Whether a regularizer of this plugin needs ``backward(create_graph=True)``.
    needs_create_graph: ClassVar[bool] = False
    #: Whether ``weight`` may go below zero (turning a penalty into a reward).
    allows_negative_weight: ClassVar[bool] = False
    #: Whether include/exclude select anything for this plugin; when not, an instance with
    #: patterns other than the defaults is refused (they would do nothing).
    uses_filter: ClassVar[bool] = True
    #: Whether ``after_backward`` rescales the gradients (clipping): a trainer's own clipping
    #: would then clip twice, and adapters refuse the combination; the shared gradient norms
    #: (``ctx.gradient_norms``) are computed afresh for the plugins after it.
    rescales_gradients: ClassVar[bool] = False
    #: Whether an instance whose patterns select nothing is fine (the technique then acts
    #: on nothing); by default :meth:`VariableFilter.select` refuses an empty selection.
    allows_empty_selection: ClassVar[bool] = False

    def __init__(
        self,
        config: Any = None,
        *,
        id: str | None = None,
        weight: float | Schedule = 1.0,
        include: Iterable[str] = ("*",),
        exclude: Iterable[str] = (),
        on_unmatched: str = "error",
    ) -> None:
        if config is None:
            config = self.Config()
        if not isinstance(config, self.Config):
            raise ConfigError(
                f"{type(self).__name__}: config must be a {self.Config.__qualname__}, "
                f"got {type(config).__name__}"
            )
        self.config = config
        self.id = id or self.name
        self.weight: Schedule = instance_weight(
            self.id, weight, allows_negative=self.allows_negative_weight)
        patterns = {"include": include, "exclude": exclude}
        for option, value in patterns.items():
            if isinstance(value, str) or not isinstance(value, Iterable):
                raise ConfigError(
                    f"{self.id}.{option}: expected a list of patterns, got {value!r}; write "
                    f"{option}=[{value!r}]"
                )
        patterns = {k: tuple(v) for k, v in patterns.items()}
        if not self.uses_filter and (patterns["include"] != ("*",) or patterns["exclude"]):
            raise ConfigError(
                f"{self.id}.include: {self.name} has no variables for include/exclude to "
                "select, so the patterns would do nothing; remove them from this instance"
            )
        self.filter = VariableFilter(
            **patterns, owner=self.id, on_unmatched=on_unmatched,
            allow_empty=self.allows_empty_selection,
        )

    @classmethod
    def summary(cls) -> str:
        """The first line of the class docstring."""
        doc = inspect.getdoc(cls) or ""
        return doc.splitlines()[0] if doc else ""

    def state_dict(self) -> dict[str, Any]:
        """State to checkpoint: tensors, numbers, strings, and lists or dicts of them."""
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned; called after ``setup``."""
        if state:
            raise CheckpointError(
                f"plugin instance {self.id!r} ({self.name}) keeps no state but the "
                f"checkpoint has {sorted(state)}"
            )

    def check_state(self, state: Mapping[str, Any], keys: Iterable[str]) -> None:
        """Raise :class:`CheckpointError` naming this instance unless *state* has *keys*."""
        expected = sorted(keys)
        if sorted(state) != expected:
            raise CheckpointError(
                f"plugin instance {self.id!r} ({self.name}): the checkpoint state has keys "
                f"{sorted(state)}, expected {expected}; was it saved by another version?"
            )

    def parameters(self) -> Iterable[torch.nn.Parameter]:
        """Learnable parameters the plugin owns; the host adds them to its optimizer."""
        return ()

    def __repr__(self) -> str:
        return f"{type(self).__name__}(id={self.id!r}, config={self.config!r})"
