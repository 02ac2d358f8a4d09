"""Weight schedules: a plugin instance's weight as a function of the training position.

A schedule is called with the optimizer-step counter and the training progress in
[0, 1] (``None`` when the host did not say how many steps the run has) and returns a
float. In a config, a weight is either a number or a table naming its ``kind``::

    weight = 0.1
    weight = { kind = "linear_warmup", value = 0.1, warmup_steps = 500 }
    weight = { kind = "cosine_curriculum", value = 1.0 }
    weight = { kind = "piecewise", boundaries = [1000, 5000], values = [0.0, 0.1, 1.0] }
"""

from __future__ import annotations

import math
from typing import ClassVar, Union

import attrs

from .errors import OptionError
from .validators import finite, optional, positive_int


def _ramp(step: int, warmup_steps: int) -> float:
    return min(1.0, step / warmup_steps)


def cosine_curriculum(progress: float) -> float:
    """The cosine curriculum ``0.5·(1+cos(π·(1−progress)))``: 0 at the start, 1 at the end."""
    return 0.5 * (1.0 + math.cos(math.pi * (1.0 - min(max(progress, 0.0), 1.0))))


@attrs.frozen
class Constant:
    """The same weight at every step."""

    kind: ClassVar[str] = "constant"
    needs_progress: ClassVar[bool] = False
    value: float = attrs.field(validator=finite)

    def __call__(self, step: int, progress: float | None) -> float:
        return self.value

    @property
    def lowest(self) -> float:
        """The smallest value the schedule takes."""
        return self.value


@attrs.frozen
class _Warmup:
    """A ramp from ``start`` to ``value`` over ``warmup_steps`` steps, then constant."""

    needs_progress: ClassVar[bool] = False
    value: float = attrs.field(validator=finite)
    warmup_steps: int = attrs.field(validator=positive_int)
    start: float = attrs.field(default=0.0, validator=finite)

    def __call__(self, step: int, progress: float | None) -> float:
        return self.start + (self.value - self.start) * self.shape(_ramp(step, self.warmup_steps))

    @staticmethod
    def shape(fraction: float) -> float:
        raise NotImplementedError

    @property
    def lowest(self) -> float:
        return min(self.start, self.value)


@attrs.frozen
class LinearWarmup(_Warmup):
    """Linear ramp from ``start`` to ``value`` over ``warmup_steps`` steps, then constant."""

    kind: ClassVar[str] = "linear_warmup"

    @staticmethod
    def shape(fraction: float) -> float:
        return fraction


@attrs.frozen
class CosineWarmup(_Warmup):
    """Half-cosine ramp from ``start`` to ``value`` over ``warmup_steps`` steps."""

    kind: ClassVar[str] = "cosine_warmup"

    @staticmethod
    def shape(fraction: float) -> float:
        return 0.5 * (1.0 - math.cos(math.pi * fraction))


@attrs.frozen
class CosineCurriculum:
    """``value · 0.5·(1+cos(π·(1−progress)))``, rising from 0 to ``value`` over the run.

    Progress is the run's (it needs the total number of steps) unless ``horizon_steps``
    is given, in which case progress is ``step / horizon_steps`` capped at 1.
    """

    kind: ClassVar[str] = "cosine_curriculum"
    value: float = attrs.field(default=1.0, validator=finite)
    horizon_steps: int | None = attrs.field(
        default=None, validator=optional(positive_int)
    )

    @property
    def needs_progress(self) -> bool:
        return self.horizon_steps is None

    def __call__(self, step: int, progress: float | None) -> float:
        if self.horizon_steps is not None:
            progress = _ramp(step, self.horizon_steps)
        if progress is None:
            raise ValueError("cosine_curriculum needs the run's progress: pass total_steps")
        return self.value * cosine_curriculum(progress)

    @property
    def lowest(self) -> float:
        return min(0.0, self.value)


def _check_piecewise(inst: Piecewise, _attr: attrs.Attribute, values: tuple[float, ...]) -> None:
    if len(values) != len(inst.boundaries) + 1:
        raise OptionError(
            "values",
            f"must have one more entry than boundaries "
            f"({len(inst.boundaries)} boundaries, {len(values)} values)"
        )
    if list(inst.boundaries) != sorted(set(inst.boundaries)):
        raise OptionError(
            "boundaries", f"must be strictly increasing, got {list(inst.boundaries)}"
        )
    for value in values:
        if not isinstance(value, (int, float)) or not math.isfinite(value):
            raise OptionError("values", f"must be finite numbers, got {list(values)}")


@attrs.frozen
class Piecewise:
    """Step function: ``values[i]`` from ``boundaries[i-1]`` (inclusive) to ``boundaries[i]``."""

    kind: ClassVar[str] = "piecewise"
    needs_progress: ClassVar[bool] = False
    boundaries: tuple[int, ...] = attrs.field(converter=tuple)
    values: tuple[float, ...] = attrs.field(converter=tuple, validator=_check_piecewise)

    def __call__(self, step: int, progress: float | None) -> float:
        index = sum(1 for b in self.boundaries if step >= b)
        return self.values[index]

    @property
    def lowest(self) -> float:
        return min(self.values)


Schedule = Union[Constant, LinearWarmup, CosineWarmup, CosineCurriculum, Piecewise]  # noqa: UP007
SCHEDULES: dict[str, type] = {
    cls.kind: cls for cls in (Constant, LinearWarmup, CosineWarmup, CosineCurriculum, Piecewise)
}


def numbers_as_constant(value: object) -> object:
    """A number as a :class:`Constant` schedule; anything else as it is.

    The converter of a plugin option typed :data:`Schedule`, so that ``Config(option=2.0)``
    in Python holds what a config's ``option = 2.0`` structures into; a validator judges
    whatever else it is given.
    """
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return Constant(float(value))
    return value
