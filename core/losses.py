"""Losses by name: the one table that every plugin looks a loss up in.

A loss compares a prediction with a target and reduces the way torch's functional losses
do (``reduction`` is ``"mean"``, ``"sum"`` or ``"none"``)::

    huber = steadytrain.losses.get("huber", delta=0.5)
    value = huber(prediction, target)

The built-in losses call torch's own function where torch has one:

================  ==========================  ================================================
name              options (defaults)          value per element (before the reduction)
================  ==========================  ================================================
``mse``                                       ``F.mse_loss``: ``(x − y)²``
``l1``                                        ``F.l1_loss``: ``|x − y|``
``smooth_l1``     ``beta`` 1.0                ``F.smooth_l1_loss``
``huber``         ``delta`` 1.0               ``F.huber_loss``
``focal_mse``     ``gamma`` 2.0               ``se.detach()^(γ/2) · se``, ``se = (x − y)²``
``smooth_l1_mse`` ``beta`` 1.0,               ``w · F.mse_loss + (1 − w) · F.smooth_l1_loss``
                  ``mse_weight`` (w) 0.5
``cosine``        ``eps`` 1e-8                ``1 − F.cosine_similarity`` over the last
                                              dimension (one value per vector, not per element)
================  ==========================  ================================================

``focal_mse`` weighs each squared error by its own detached magnitude ``|x − y|^γ``: it
puts *more* weight on large errors, so it makes a fit more sensitive to outliers, not
less (use ``huber``, ``smooth_l1`` or ``l1`` for robustness to outliers).

Plugins take a loss by name and its options as a table, both checked when the config
loads (``loss = "huber"``, ``loss_options = { delta = 0.5 }``): :func:`known` and
:func:`options_of` are the attrs validators that do it.

Third-party losses
    A loss is a subclass of :class:`Loss` made an attrs class (``@attrs.frozen``) whose
    fields are its options, with validators; it sets ``name`` and implements
    ``__call__(input, target, *, reduction)``. A distribution adds it to the entry-point
    group ``steadytrain.losses``, under its name::

        [project.entry-points."steadytrain.losses"]
        log_cosh = "acme.losses:LogCosh"

    The built-in losses are entry points of the ``steadytrain`` distribution, found the
    same way. A loss that cannot be loaded is reported with its distribution and entry
    point when a config names it; the others keep working. ``autoload`` is switched off by
    the same environment variable as for plugins (``STEADYTRAIN_DISABLE_PLUGIN_AUTOLOAD``);
    :func:`register` adds a loss in-process (notebooks, tests).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from importlib import metadata
from typing import Any, ClassVar

import attrs
import torch
import torch.nn.functional as F

from .errors import ConfigError, OptionError, RegistryError, suggest
from .registry import AUTOLOAD_ENV, OWN_DISTRIBUTION, claimed_by_several, find_entry_points
from .validators import in_range, non_negative, positive

GROUP = "steadytrain.losses"
REDUCTIONS = ("mean", "sum", "none")


def reduce(values: torch.Tensor, reduction: str) -> torch.Tensor:
    """*values* reduced as torch's losses do: their ``"mean"``, ``"sum"``, or ``"none"``."""
    if reduction == "mean":
        return values.mean()
    if reduction == "sum":
        return values.sum()
    if reduction == "none":
        return values
    raise ValueError(f"reduction must be one of {', '.join(REDUCTIONS)}, got {reduction!r}")


class Loss:
    """Base class of a loss: subclasses are attrs classes whose fields are their options.

    ``elementwise`` says whether the loss is a function of each element's error alone, so
    that ``reduction="none"`` keeps the input's shape and a zero error costs nothing; a
    plugin that masks cells or compares with zero needs that. ``transition`` names the
    option, if any, at which the loss turns from quadratic to linear.
    """

    name: ClassVar[str] = ""
    elementwise: ClassVar[bool] = True
    transition: ClassVar[str | None] = None

    def __call__(
        self, input: torch.Tensor, target: torch.Tensor, *, reduction: str = "mean"
    ) -> torch.Tensor:
        raise NotImplementedError


@attrs.frozen
class MSE(Loss):
    """Mean squared error (``torch.nn.functional.mse_loss``)."""

    name = "mse"

    def __call__(self, input: torch.Tensor, target: torch.Tensor, *,
                 reduction: str = "mean") -> torch.Tensor:
        return F.mse_loss(input, target, reduction=reduction)


@attrs.frozen
class L1(Loss):
    """Mean absolute error (``torch.nn.functional.l1_loss``)."""

    name = "l1"

    def __call__(self, input: torch.Tensor, target: torch.Tensor, *,
                 reduction: str = "mean") -> torch.Tensor:
        return F.l1_loss(input, target, reduction=reduction)


@attrs.frozen
class SmoothL1(Loss):
    """Quadratic below ``beta``, linear above (``torch.nn.functional.smooth_l1_loss``)."""

    name = "smooth_l1"
    transition = "beta"
    beta: float = attrs.field(default=1.0, validator=non_negative)

    def __call__(self, input: torch.Tensor, target: torch.Tensor, *,
                 reduction: str = "mean") -> torch.Tensor:
        return F.smooth_l1_loss(input, target, reduction=reduction, beta=self.beta)


@attrs.frozen
class Huber(Loss):
    """Quadratic below ``delta``, linear above (``torch.nn.functional.huber_loss``)."""

    name = "huber"
    transition = "delta"
    delta: float = attrs.field(default=1.0, validator=positive)

    def __call__(self, input: torch.Tensor, target: torch.Tensor, *,
                 reduction: str = "mean") -> torch.Tensor:
        return F.huber_loss(input, target, reduction=reduction, delta=self.delta)


@attrs.frozen
class FocalMSE(Loss):
    """Squared error weighted by its own detached magnitude: ``se.detach()^(γ/2) · se``."""

    name = "focal_mse"
    gamma: float = attrs.field(default=2.0, validator=non_negative)

    def __call__(self, input: torch.Tensor, target: torch.Tensor, *,
                 reduction: str = "mean") -> torch.Tensor:
        squared = F.mse_loss(input, target, reduction="none")
        return reduce(squared.detach().pow(self.gamma / 2) * squared, reduction)


@attrs.frozen
class SmoothL1MSE(Loss):
    """``mse_weight · MSE + (1 − mse_weight) · SmoothL1(beta)``."""

    name = "smooth_l1_mse"
    transition = "beta"
    beta: float = attrs.field(default=1.0, validator=non_negative)
    mse_weight: float = attrs.field(
        default=0.5, validator=in_range(0.0, 1.0, include_low=True, include_high=True)
    )

    def __call__(self, input: torch.Tensor, target: torch.Tensor, *,
                 reduction: str = "mean") -> torch.Tensor:
        w = self.mse_weight
        return (w * F.mse_loss(input, target, reduction=reduction)
                + (1 - w) * F.smooth_l1_loss(input, target, reduction=reduction, beta=self.beta))


@attrs.frozen
class Cosine(Loss):
    """``1 − cos(x, y)`` over the last dimension (``torch.nn.functional.cosine_similarity``)."""

    name = "cosine"
    elementwise = False
    eps: float = attrs.field(default=1e-8, validator=positive)

    def __call__(self, input: torch.Tensor, target: torch.Tensor, *,
                 reduction: str = "mean") -> torch.Tensor:
        return reduce(1 - F.cosine_similarity(input, target, dim=-1, eps=self.eps), reduction)


@attrs.define(eq=False)
class LossEntry:
    """One loss name: its entry point (``None`` when registered in-process) and, once
    loaded, its class or why it is broken."""

    name: str
    entry: metadata.EntryPoint | None = None
    factory: type[Loss] | None = None
    error: str | None = None

    @property
    def origin(self) -> str:
        if self.entry is None:
            return "registered in-process"
        dist = self.entry.dist
        return (f"entry point {self.name} = {self.entry.value!r} of distribution "
                f"{dist.name} {dist.version}")

    def load(self) -> type[Loss]:
        """The loss class; a :class:`RegistryError` naming the origin if it is broken."""
        if self.factory is None and self.error is None:
            try:
                self.factory = _validate(self.entry.load(), self.name)
            except RegistryError as exc:
                self.error = str(exc)
            except Exception as exc:  # a third-party import may raise anything
                self.error = f"import failed: {type(exc).__name__}: {exc}"
        if self.error is not None:
            raise RegistryError(f"loss {self.name!r} ({self.origin}) is broken: {self.error}")
        return self.factory


def _validate(factory: object, name: str) -> type[Loss]:
    if not (isinstance(factory, type) and issubclass(factory, Loss) and attrs.has(factory)):
        raise RegistryError(
            f"must point to a steadytrain.losses.Loss subclass made an attrs class, got "
            f"{factory!r}"
        )
    if factory.name != name:
        raise RegistryError(
            f"the entry point is called {name!r} but {factory.__qualname__}.name is "
            f"{factory.name!r}; configs use the entry point's name, so the two must be equal"
        )
    return factory


class LossRegistry:
    """Loss names to their entries; :meth:`discover` fills it from entry points."""

    def __init__(self) -> None:
        self._entries: dict[str, LossEntry] = {}

    @classmethod
    def discover(cls, *, autoload: bool | None = None) -> LossRegistry:
        """Read the ``steadytrain.losses`` entry points of the installed distributions.

        With ``autoload=False`` (or ``STEADYTRAIN_DISABLE_PLUGIN_AUTOLOAD`` set) only the
        built-in losses are read.
        """
        if autoload is None:
            autoload = not os.environ.get(AUTOLOAD_ENV)
        found, _ = find_entry_points(
            GROUP, lambda distribution, _name: autoload or distribution == OWN_DISTRIBUTION)
        registry = cls()
        for name, claims in found.items():
            registry._entries[name] = LossEntry(name, claims[0].entry_point,
                                                error=claimed_by_several(claims))
        return registry

    def register(self, factory: type[Loss], name: str | None = None) -> None:
        """Add a loss class in-process, under *name* or its own."""
        name = name or getattr(factory, "name", "")
        try:
            _validate(factory, name)
        except RegistryError as exc:
            raise RegistryError(f"cannot register loss {name!r}: {exc}") from None
        if name in self._entries:
            raise RegistryError(
                f"cannot register loss {name!r}: the name is taken by "
                f"{self._entries[name].origin}"
            )
        self._entries[name] = LossEntry(name, factory=factory)

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def names(self) -> list[str]:
        return sorted(self._entries)

    def get(self, name: str) -> type[Loss]:
        """The loss class called *name*; a :class:`RegistryError` if unknown or broken."""
        entry = self._entries.get(name)
        if entry is None:
            raise RegistryError(
                f"unknown loss {name!r}{suggest(name, self._entries)}; the losses are "
                f"{', '.join(self.names())}"
            )
        return entry.load()

    def build(self, name: str, options: Mapping[str, Any], *, where: str) -> Loss:
        """An instance of loss *name* with *options*; errors start with *where*."""
        try:
            factory = self.get(name)
        except RegistryError as exc:
            raise ConfigError(f"{where}: {exc}") from None
        known_options = [f.name for f in attrs.fields(factory)]
        for key in options:
            if key not in known_options:
                raise ConfigError(
                    f"{where}: loss {name!r} has no option {key!r}{suggest(key, known_options)}"
                    f"; its options are: {', '.join(known_options) or '(none)'}"
                )
        try:
            return factory(**options)
        except OptionError as exc:
            raise ConfigError(f"{where}: loss {name!r}: {exc.option}: {exc.message}") from None


_registry: LossRegistry | None = None


def registry() -> LossRegistry:
    """The registry that :func:`get` uses, discovered on first use.

    A name it does not know makes it read the entry points again (a distribution
    installed since), keeping the losses registered in-process.
    """
    global _registry
    if _registry is None:
        _registry = LossRegistry.discover()
    return _registry


def _refreshed(name: str) -> LossRegistry:
    global _registry
    current = registry()
    if name in current:
        return current
    fresh = LossRegistry.discover()
    for key, entry in current._entries.items():
        if entry.entry is None and key not in fresh:
            fresh._entries[key] = entry
    _registry = fresh
    return fresh


def names() -> list[str]:
    """The names of the losses :func:`get` knows."""
    return registry().names()


def register(factory: type[Loss], name: str | None = None) -> None:
    """Add a loss class to the registry :func:`get` uses (notebooks, tests)."""
    registry().register(factory, name)


def factory(name: str) -> type[Loss]:
    """The class of loss *name*; a :class:`~steadytrain.RegistryError` if unknown or broken."""
    return _refreshed(name).get(name)


def get(name: str, *, where: str = "loss", **options: Any) -> Loss:
    """Loss *name* with *options*: a callable ``loss(input, target, *, reduction="mean")``.

    An unknown name (with close matches suggested), an unknown option or a bad value is
    a :class:`~steadytrain.ConfigError` starting with *where*.
    """
    return _refreshed(name).build(name, options, where=where)


def known(_inst: Any, attr: attrs.Attribute, value: Any) -> None:
    """attrs validator: *value* names a loss that can be loaded."""
    if not isinstance(value, str):
        raise OptionError(attr.name, f"must be the name of a loss, got {value!r}")
    try:
        factory(value)
    except RegistryError as exc:
        raise OptionError(attr.name, str(exc)) from None


def options_of(loss_field: str) -> Callable[[Any, attrs.Attribute, Any], None]:
    """attrs validator of an options table for the loss named by field *loss_field*."""

    def check(inst: Any, attr: attrs.Attribute, value: Any) -> None:
        if not isinstance(value, Mapping):
            raise OptionError(attr.name, f"must be a table of loss options, got {value!r}")
        try:
            get(getattr(inst, loss_field), where=attr.name, **value)
        except ConfigError as exc:
            message = str(exc).removeprefix(f"{attr.name}: ")
            raise OptionError(attr.name, message) from None

    return check


__all__ = [
    "GROUP",
    "REDUCTIONS",
    "L1",
    "MSE",
    "Cosine",
    "FocalMSE",
    "Huber",
    "Loss",
    "LossEntry",
    "LossRegistry",
    "SmoothL1",
    "SmoothL1MSE",
    "factory",
    "get",
    "known",
    "names",
    "options_of",
    "reduce",
    "register",
    "registry",
]
