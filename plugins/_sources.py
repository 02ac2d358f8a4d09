"""Inputs of the regularizers that act on tensors a model reports or that taps capture.

The gate and sparsity plugins regularize tensors that are neither the loss nor the
parameters: the gate probabilities of a memory router, the soft mask of a top-k layer.
A model hands them over in one of two ways, and :class:`TensorRegularizer` reads both:

* by name, in ``ctx.outputs[key]``: the module calls ``steadytrain.report(key, tensor)``
  in ``forward`` (or the host passes ``compute_loss(..., outputs={key: tensor})``). A name
  reported several times in one step (one gate per layer) arrives as a list;
* by tapping modules whose names match the ``taps`` patterns (resolved once, in ``setup``);
  the instance's include/exclude narrow the tapped modules further, and ``tap_element``
  picks the tensor out of a module that returns a tuple.

Every input tensor gets its own term and the terms are averaged, so tensors of different
shapes (layers of different widths) mix freely.

The value checks (a gate sums to 1, a mask lies in [0, 1]) need one host-device sync.
``check = "auto"`` checks every step on the CPU, where that costs nothing, and only the
first step elsewhere; ``"every_step"``, ``"first_step"`` and ``"never"`` force a policy.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar

import attrs
import torch

import steadytrain
from steadytrain.validators import non_negative_int, one_of, optional, positive

CHECKS = ("auto", "every_step", "first_step", "never")


def at_least_float32(tensor: torch.Tensor) -> torch.Tensor:
    """*tensor* as float32 when it is of a narrower type (bool, half, bfloat16, integer).

    Penalties are means over many elements: summing them in half precision loses the
    small differences the penalty is about.
    """
    return tensor.to(torch.promote_types(tensor.dtype, torch.float32))


def mean_of(tensors: list[torch.Tensor]) -> torch.Tensor:
    """The mean of scalar *tensors* (the tensor itself when there is one)."""
    return tensors[0] if len(tensors) == 1 else torch.stack(tensors).mean()


def reject_filter(plugin: steadytrain.Plugin, reason: str) -> None:
    """Fail when *plugin* has include/exclude patterns it would not use.

    A pattern that selects nothing must never look as if it did something.
    """
    if plugin.filter.include != ("*",) or plugin.filter.exclude:
        raise steadytrain.ConfigError(
            f"{plugin.id}.include: include/exclude have nothing to select here: {reason}. "
            "Remove them from this instance."
        )


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


class TensorRegularizer(steadytrain.Plugin):
    """Base of the plugins whose terms are averages over reported or tapped tensors.

    A subclass sets ``what`` (the kind of tensor, for messages), implements
    :meth:`check_values` and calls :meth:`average` from ``compute_regularizers``.
    """

    what: ClassVar[str] = "tensor"

    @steadytrain.hookimpl
    def setup(self, run: steadytrain.Run) -> None:
        if self.config.taps:
            tapped = run.tap(self, self.config.taps)
            self._modules = self.filter.select(tapped, kind="tapped module")
            if not self._modules:
                raise steadytrain.FilterError(
                    f"{self.id}.exclude: excludes every module that taps matched "
                    f"({', '.join(tapped)}); there is no {self.what} left to regularize"
                )
        else:
            reject_filter(
                self, f"they select tapped modules and this instance reads "
                f"outputs[{self.config.key!r}] (set taps to read module outputs)"
            )
        self._checked = False

    def check_values(self, tensor: torch.Tensor) -> str | None:
        """What is wrong with the values of *tensor*, or ``None``; may sync the host once."""
        raise NotImplementedError

    def average(
        self, ctx: steadytrain.StepContext, term: Callable[[torch.Tensor], torch.Tensor]
    ) -> torch.Tensor:
        """*term* of every input tensor of this micro-batch, averaged."""
        inputs = self._inputs(ctx)
        if self._check_due(inputs[0][1]):
            for label, tensor in inputs:
                problem = self.check_values(tensor)
                if problem is not None:
                    raise ValueError(
                        f"{self.id}: {label} is not a valid {self.what}: {problem} "
                        "(set check = 'never' to skip this check)"
                    )
            self._checked = True
        terms = []
        for label, tensor in inputs:
            try:
                terms.append(term(tensor))
            except ValueError as exc:
                raise ValueError(f"{self.id}: {label}: {exc}") from None
        return mean_of(terms)

    def _check_due(self, tensor: torch.Tensor) -> bool:
        check = self.config.check
        if check == "never":
            return False
        if check == "every_step" or (check == "auto" and tensor.device.type == "cpu"):
            return True
        return not self._checked

    def _inputs(self, ctx: steadytrain.StepContext) -> list[tuple[str, torch.Tensor]]:
        if self.config.taps:
            return [(f"tap {name!r}", self._tap_output(ctx, name)) for name in self._modules]
        key = self.config.key
        value = ctx.output(key, option="key")
        values = list(value) if isinstance(value, (list, tuple)) else [value]
        if not values:
            raise ValueError(f"{self.id}.key: outputs[{key!r}] is an empty list")
        labels = [f"outputs[{key!r}]"] if len(values) == 1 else [
            f"outputs[{key!r}] (report {i + 1} of {len(values)})" for i in range(len(values))
        ]
        for label, item in zip(labels, values, strict=True):
            self._require_tensor(item, label, "key")
        return list(zip(labels, values, strict=True))

    def _tap_output(self, ctx: steadytrain.StepContext, name: str) -> torch.Tensor:
        if name not in ctx.taps:
            raise ValueError(
                f"{self.id}.taps: module {name!r} did not run in this forward pass, so there "
                f"is no {self.what} to regularize"
            )
        output, index = ctx.taps[name], self.config.tap_element
        label = f"tap {name!r}"
        if isinstance(output, (tuple, list)):
            if index is None:
                raise ValueError(
                    f"{self.id}.tap_element: module {name!r} returns a {type(output).__name__} "
                    f"of {len(output)} items; set tap_element to the index of the {self.what}"
                )
            if index >= len(output):
                raise ValueError(
                    f"{self.id}.tap_element: {index} is out of range for module {name!r}, "
                    f"which returns {len(output)} items"
                )
            output = output[index]
            label = f"tap {name!r} element {index}"
        elif index is not None:
            raise ValueError(
                f"{self.id}.tap_element: module {name!r} returns a single "
                f"{type(output).__name__}, not a tuple; remove tap_element"
            )
        self._require_tensor(output, label, "taps")
        return output

    def _require_tensor(self, value: Any, label: str, option: str) -> None:
        if not isinstance(value, torch.Tensor):
            raise ValueError(
                f"{self.id}.{option}: {label} is a {type(value).__name__}, not a tensor"
            )


class GateRegularizer(TensorRegularizer):
    """Base of the gate plugins: inputs are probabilities over their last dimension."""

    what = "gate"

    def check_values(self, tensor: torch.Tensor) -> str | None:
        if tensor.numel() == 0:
            return f"it is empty (shape {tuple(tensor.shape)})"
        sums = tensor.sum(-1, dtype=torch.float32)
        worst, lowest = torch.stack(
            [(sums - 1).abs().amax(), tensor.amin().float()]
        ).tolist()
        atol = self.config.atol
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
