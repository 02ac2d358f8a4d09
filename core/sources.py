"""Regularizers over tensors a model reports or that taps capture: the shared base class.

Gate and sparsity regularizers act on tensors that are neither the loss nor the
parameters: the gate probabilities of a memory router, the soft mask of a top-k layer.
A model hands them over in one of two ways, and :class:`TensorRegularizer` reads both:

* by name, in ``ctx.outputs[key]``: the module calls ``steadytrain.report(key, tensor)``
  in ``forward`` (or the host passes ``compute_loss(..., outputs={key: tensor})``);
* by tapping modules whose names match the ``taps`` patterns (resolved once, in ``setup``);
  the instance's include/exclude narrow the tapped modules further, and ``tap_element``
  picks the tensor out of a module that returns a tuple.

Calls are a time axis. A module that runs several times in one forward pass (a gate
inside a loop over time steps) gives one tensor per call, and so do repeated reports of
one name: when the calls have one shape they are stacked along a new dimension −2, so
that per-call gates of shape ``(batch, k)`` become one ``(batch, time, k)`` tensor.
Calls of different shapes cannot be time steps (layers of different widths reporting
under one name): each is then an input of its own. The term is the mean over the inputs
(one per tapped module, or per differently shaped report), so modules of different
widths mix freely. Report distinct names, or tap the modules, to keep same-shaped layers
apart.

The value checks (a gate sums to 1, a mask lies in [0, 1]) need one host-device sync.
``check = "auto"`` checks every step on the CPU, where that costs nothing, and only the
first step elsewhere; ``"every_step"``, ``"first_step"`` and ``"never"`` force a policy.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, ClassVar

import attrs
import torch

from .context import Run, StepContext
from .errors import ConfigError
from .hookspecs import hookimpl
from .plugin import Plugin
from .validators import non_negative_int, one_of, optional, positive

CHECKS = ("auto", "every_step", "first_step", "never")


def check_due(policy: str, tensor: torch.Tensor, *, checked: bool) -> bool:
    """Whether a value check (one host sync) is due for *tensor* under *policy*, one of
    :data:`CHECKS`: ``"every_step"`` always, ``"never"`` never, ``"first_step"`` until a
    check was made (*checked*), and ``"auto"`` always on the CPU, where reading values
    costs nothing, else as ``"first_step"``."""
    if policy == "never":
        return False
    if policy == "every_step" or (policy == "auto" and tensor.device.type == "cpu"):
        return True
    return not checked


def at_least_float32(tensor: torch.Tensor) -> torch.Tensor:
    """*tensor* as float32 when it is of a narrower type (bool, half, bfloat16, integer).

    Penalties are means over many elements: summing them in half precision loses the
    small differences the penalty is about.
    """
    return tensor.to(torch.promote_types(tensor.dtype, torch.float32))


def mean_of(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """The mean of scalar *tensors* (the tensor itself when there is one)."""
    return tensors[0] if len(tensors) == 1 else torch.stack(list(tensors)).mean()


def stack_calls(calls: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """The per-call tensors of one module or name as inputs: calls of one shape stacked
    along a new dimension −2 (a time axis), calls of different shapes left apart."""
    if len(calls) == 1 or len({tuple(c.shape) for c in calls}) > 1:
        return list(calls)
    return [torch.stack(list(calls), dim=-2 if calls[0].dim() >= 1 else -1)]


@attrs.frozen
class SourceOptions:
    """Options that say where the tensors come from and when their values are checked."""

    taps: tuple[str, ...] = ()
    tap_element: int | None = attrs.field(default=None, validator=optional(non_negative_int))
    check: str = attrs.field(default="auto", validator=one_of(*CHECKS))


@attrs.frozen
class GateOptions(SourceOptions):
    """Source options of the gate regularizers, plus the tolerance of the sum-to-1 check."""

    key: str = "gates"
    atol: float = attrs.field(default=1e-3, validator=positive)


class TensorRegularizer(Plugin):
    """Base of the plugins whose terms are averages over reported or tapped tensors.

    A subclass sets ``what`` (the kind of tensor, for messages), gives its ``Config`` the
    fields of :class:`SourceOptions` and a ``key``, implements :meth:`check_values` and
    calls :meth:`average` from ``compute_regularizers``.
    """

    what: ClassVar[str] = "tensor"

    @hookimpl
    def setup(self, run: Run) -> None:
        if self.config.taps:
            tapped = run.tap(self, self.config.taps)
            self._modules = self.filter.select(tapped, kind="tapped module")
        elif self.filter.include != ("*",) or self.filter.exclude:
            raise ConfigError(
                f"{self.id}.include: include/exclude select tapped modules, and this "
                f"instance reads outputs[{self.config.key!r}] (set taps to read module "
                "outputs); remove them from this instance"
            )
        self._checked = False

    def check_values(self, tensor: torch.Tensor) -> str | None:
        """What is wrong with the values of *tensor*, or ``None``; may sync the host once."""
        raise NotImplementedError

    def average(
        self, ctx: StepContext, term: Callable[[torch.Tensor], torch.Tensor]
    ) -> torch.Tensor:
        """*term* of every input tensor of this micro-batch, averaged."""
        inputs = self.inputs(ctx)
        if check_due(self.config.check, inputs[0][1], checked=self._checked):
            for label, tensor in inputs:
                problem = self.check_values(tensor)
                if problem is not None:
                    raise ConfigError(
                        f"{self.id}: {label} is not a valid {self.what}: {problem} "
                        "(set check = 'never' to skip this check)"
                    )
            self._checked = True
        terms = []
        for label, tensor in inputs:
            try:
                terms.append(term(tensor))
            except ValueError as exc:
                raise ConfigError(f"{self.id}: {label}: {exc}") from None
        return mean_of(terms)

    def inputs(self, ctx: StepContext) -> list[tuple[str, torch.Tensor]]:
        """``(label, tensor)`` for every input of this micro-batch, calls stacked as time."""
        if self.config.taps:
            return [item for name in self._modules for item in self._tapped(ctx, name)]
        key = self.config.key
        values = ctx.reports(key, option="key")
        for index, value in enumerate(values):
            label = f"outputs[{key!r}]" + (f" (report {index + 1})" if len(values) > 1 else "")
            self._require_tensor(value, label, "key")
        return _labelled(f"outputs[{key!r}]", stack_calls(values))

    def _tapped(self, ctx: StepContext, name: str) -> list[tuple[str, torch.Tensor]]:
        index, label = self.config.tap_element, f"tap {name!r}"
        calls = []
        for output in ctx.tapped(name):
            if isinstance(output, (tuple, list)):
                if index is None:
                    raise ConfigError(
                        f"{self.id}.tap_element: module {name!r} returns a "
                        f"{type(output).__name__} of {len(output)} items; set tap_element to "
                        f"the index of the {self.what}"
                    )
                if index >= len(output):
                    raise ConfigError(
                        f"{self.id}.tap_element: {index} is out of range for module {name!r}, "
                        f"which returns {len(output)} items"
                    )
                output = output[index]
                label = f"tap {name!r} element {index}"
            elif index is not None:
                raise ConfigError(
                    f"{self.id}.tap_element: module {name!r} returns a single "
                    f"{type(output).__name__}, not a tuple; remove tap_element"
                )
            self._require_tensor(output, label, "taps")
            calls.append(output)
        return _labelled(label, stack_calls(calls))

    def _require_tensor(self, value: Any, label: str, option: str) -> None:
        if not isinstance(value, torch.Tensor):
            raise ConfigError(
                f"{self.id}.{option}: {label} is a {type(value).__name__}, not a tensor"
            )


def _labelled(label: str, inputs: list[torch.Tensor]) -> list[tuple[str, torch.Tensor]]:
    if len(inputs) == 1:
        return [(label, inputs[0])]
    return [(f"{label} (call {i + 1} of {len(inputs)})", t) for i, t in enumerate(inputs)]


def check_probabilities(tensor: torch.Tensor, atol: float) -> str | None:
    """What is wrong with *tensor* as probabilities over its last dimension, or ``None``.

    One host sync. Entries must be ≥ −atol and every row must sum to 1 within *atol*.
    """
    if tensor.numel() == 0:
        return f"it is empty (shape {tuple(tensor.shape)})"
    sums = tensor.sum(-1, dtype=torch.float32)
    worst, lowest = torch.stack([(sums - 1).abs().amax(), tensor.amin().float()]).tolist()
    # written so that NaN fails both comparisons
    if not worst <= atol:
        return (
            f"its last dimension (size {tensor.shape[-1]}) sums to 1 ± {worst:.3g}, beyond "
            f"atol = {atol:g}; pass softmax probabilities, not logits or sigmoids, or "
            "raise atol for low-precision gates"
        )
    if not lowest >= -atol:
        return f"it has a negative entry ({lowest:.3g}); gates are probabilities"
    return None


class GateRegularizer(TensorRegularizer):
    """Base of the gate plugins: inputs are probabilities over their last dimension."""

    what = "gate"

    def check_values(self, tensor: torch.Tensor) -> str | None:
        return check_probabilities(tensor, self.config.atol)


__all__ = [
    "CHECKS",
    "GateOptions",
    "GateRegularizer",
    "SourceOptions",
    "TensorRegularizer",
    "at_least_float32",
    "check_due",
    "check_probabilities",
    "mean_of",
    "stack_calls",
]
