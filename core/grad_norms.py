"""Gradient norms: the norm of every gradient of a step, computed once and shared.

Several plugins read norms of the same gradients in ``after_backward``: a guard checks
that they are finite, clipping scales by them, metrics record them. Each taking its own
norms would read every gradient once per plugin. Instead, ``ctx.gradient_norms(params)``
and ``ctx.gradient_norm(params)`` answer from one :class:`GradientNorms` per step: the
first request computes the norm of every gradient of the model in one fused kernel
(``torch._foreach_norm``), later requests pick their parameters' norms out of it. After a
plugin that declares ``rescales_gradients = True`` (clipping) has run, the core drops
what was computed, so that a plugin after it sees the rescaled gradients; a plugin that
changes gradients without declaring it calls ``ctx.gradients_changed()``.

:func:`tensor_norms` and :func:`total_norm` are the same computation as plain functions,
for use outside a step.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch

from .errors import UsageError


def _dtensor_class() -> type | None:
    """``DTensor`` once something imported it: no tensor can be one before (and importing
    ``torch.distributed.tensor`` here would cost seconds)."""
    return getattr(sys.modules.get("torch.distributed.tensor"), "DTensor", None)


def check_norm_type(norm_type: Any, *, owner: str = "") -> float:
    """*norm_type* as a float, or a :class:`~steadytrain.UsageError` naming *owner*."""
    ok = isinstance(norm_type, (int, float)) and not isinstance(norm_type, bool) and (
        norm_type > 0 and not math.isnan(norm_type))
    if not ok:
        prefix = f"{owner}: " if owner else ""
        raise UsageError(
            f"{prefix}norm_type must be a number > 0 (inf for the max-abs norm), got "
            f"{norm_type!r}"
        )
    return float(norm_type)


def tensor_norms(tensors: Sequence[torch.Tensor], norm_type: float = 2.0) -> list[torch.Tensor]:
    """The ``norm_type`` norm of each of *tensors*, as float32 0-d tensors, in order.

    One fused ``torch._foreach_norm`` per device and dtype, accumulated in float32 so that
    half-precision tensors do not overflow. A sharded tensor (a DTensor, as the gradients
    of a model sharded with FSDP2) gets the norm of the whole tensor, the same plain
    tensor on every rank: one all-reduce per device mesh for all of its tensors, so every
    rank must make the same call.
    """
    norm_type = check_norm_type(norm_type)
    dtensor = _dtensor_class()
    groups: dict[Any, list[int]] = {}
    for index, tensor in enumerate(tensors):
        if dtensor is not None and isinstance(tensor, dtensor):
            key = ("mesh", tensor.device_mesh)
        else:
            key = (tensor.device, tensor.dtype)
        groups.setdefault(key, []).append(index)
    norms: list[torch.Tensor | None] = [None] * len(tensors)
    for key, indices in groups.items():
        part = torch._foreach_norm([tensors[i] for i in indices], norm_type,
                                   dtype=torch.float32)
        if key[0] == "mesh":
            # Each rank holds its shard's norm; full_tensor() combines them across the mesh.
            part = torch.stack(list(part)).full_tensor().unbind()
        for index, norm in zip(indices, part, strict=True):
            norms[index] = norm
    return norms  # type: ignore[return-value]


def total_norm(
    norms: Sequence[torch.Tensor],
    norm_type: float = 2.0,
    *,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """The norm of all the tensors whose norms *norms* are, taken together.

    The ``norm_type`` norm of the vector of their norms, as ``get_total_norm`` combines
    them, in float32 on the device of the first norm. No norms give 0 on *device*
    (default: the CPU).
    """
    norm_type = check_norm_type(norm_type)
    if not norms:
        return torch.zeros((), device=device)
    try:
        stacked = torch.stack(list(norms))
    except RuntimeError:  # norms on several devices: gathered on the first one's
        first = norms[0].device
        stacked = torch.stack([n.to(first) for n in norms])
    return torch.linalg.vector_norm(stacked.float(), norm_type)


class GradientNorms:
    """The norms of one step's gradients, by parameter and norm order, computed on demand.

    *parameters* gives the parameters whose gradients the first request of each norm
    order covers (the model's), so that requests of different plugins share one fused
    kernel; parameters outside them are computed when asked for. :meth:`clear` forgets
    everything (the gradients changed).
    """

    def __init__(self, parameters: Callable[[], Iterable[torch.Tensor]]) -> None:
        self._parameters = parameters
        self._norms: dict[float, dict[int, torch.Tensor]] = {}

    def of(self, parameters: Iterable[torch.Tensor], norm_type: float) -> list[torch.Tensor]:
        """The norm of the gradient of each of *parameters* that has one, in order."""
        wanted = [p for p in parameters if p.grad is not None]
        known = self._norms.get(norm_type)
        if known is None:
            everything = [p for p in self._parameters() if p.grad is not None]
            known = self._norms[norm_type] = dict(zip(
                map(id, everything), tensor_norms([p.grad for p in everything], norm_type),
                strict=True))
        missing = [p for p in wanted if id(p) not in known]
        if missing:
            missing = list({id(p): p for p in missing}.values())
            computed = tensor_norms([p.grad for p in missing], norm_type)
            known.update(zip(map(id, missing), computed, strict=True))
        return [known[id(p)] for p in wanted]

    def clear(self) -> None:
        self._norms.clear()
