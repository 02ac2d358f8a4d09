"""attrs validators for plugin ``Config`` classes, with messages that name the option.

Config loading turns an :class:`~steadytrain.errors.OptionError` into
``plugins[2].decay: must be in (0, 1), got 1.5``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any, TypeVar

import attrs

from .errors import ConfigError, OptionError, suggest

T = TypeVar("T")

Validator = Callable[[Any, attrs.Attribute, Any], None]


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def in_range(
    low: float, high: float, *, include_low: bool = False, include_high: bool = False
) -> Validator:
    """The value is a finite number between *low* and *high* (open ends by default)."""
    left, right = "[" if include_low else "(", "]" if include_high else ")"

    def check(_inst: Any, attr: attrs.Attribute, value: Any) -> None:
        ok = _is_number(value) and math.isfinite(value)
        ok = ok and (value >= low if include_low else value > low)
        ok = ok and (value <= high if include_high else value < high)
        if not ok:
            raise OptionError(attr.name, f"must be in {left}{low}, {high}{right}, got {value!r}")

    return check


def positive(_inst: Any, attr: attrs.Attribute, value: Any) -> None:
    """The value is a finite number > 0."""
    if not (_is_number(value) and math.isfinite(value) and value > 0):
        raise OptionError(attr.name, f"must be a positive number, got {value!r}")


def non_negative(_inst: Any, attr: attrs.Attribute, value: Any) -> None:
    """The value is a finite number >= 0."""
    if not (_is_number(value) and math.isfinite(value) and value >= 0):
        raise OptionError(attr.name, f"must be a number >= 0, got {value!r}")


def finite(_inst: Any, attr: attrs.Attribute, value: Any) -> None:
    """The value is a finite number."""
    if not (_is_number(value) and math.isfinite(value)):
        raise OptionError(attr.name, f"must be a finite number, got {value!r}")


def norm_order(_inst: Any, attr: attrs.Attribute, value: Any) -> None:
    """The value is the order p of a p-norm: a number > 0, ``inf`` (max-abs) included."""
    if not (_is_number(value) and value > 0):
        raise OptionError(
            attr.name, f"must be a number > 0 (or inf for the max-abs norm), got {value!r}"
        )


def positive_int(_inst: Any, attr: attrs.Attribute, value: Any) -> None:
    """The value is an integer >= 1."""
    if not (isinstance(value, int) and not isinstance(value, bool) and value >= 1):
        raise OptionError(attr.name, f"must be an integer >= 1, got {value!r}")


def non_negative_int(_inst: Any, attr: attrs.Attribute, value: Any) -> None:
    """The value is an integer >= 0."""
    if not (isinstance(value, int) and not isinstance(value, bool) and value >= 0):
        raise OptionError(attr.name, f"must be an integer >= 0, got {value!r}")


def boolean(_inst: Any, attr: attrs.Attribute, value: Any) -> None:
    """The value is ``True`` or ``False``."""
    if not isinstance(value, bool):
        raise OptionError(attr.name, f"must be true or false, got {value!r}")


def non_empty_str(_inst: Any, attr: attrs.Attribute, value: Any) -> None:
    """The value is a non-empty string."""
    if not isinstance(value, str) or not value:
        raise OptionError(attr.name, f"must be a non-empty string, got {value!r}")


def one_of(*choices: Any) -> Validator:
    """The value is one of *choices*."""

    def check(_inst: Any, attr: attrs.Attribute, value: Any) -> None:
        if value not in choices:
            hint = suggest(value, choices) if isinstance(value, str) else ""
            raise OptionError(
                attr.name, f"must be one of {', '.join(map(repr, choices))}, got {value!r}{hint}"
            )

    return check


def check(value: T, validator: Validator, where: str) -> T:
    """Apply a ``Config`` validator to a plain argument and return it unchanged.

    For functions and modules that take options as arguments rather than as a Config: a
    failure is a :class:`~steadytrain.ConfigError` reading ``where: problem``, e.g.
    ``MemoryBuffer.capacity: must be an integer >= 1, got 0``.
    """
    try:
        validator(None, SimpleNamespace(name=where), value)
    except OptionError as exc:
        raise ConfigError(f"{where}: {exc.message}") from None
    return value


def optional(validator: Validator) -> Validator:
    """*validator*, or ``None``."""
    return attrs.validators.optional(validator)
