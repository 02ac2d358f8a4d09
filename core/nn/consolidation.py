"""The consolidation protocol: what a module offers to be consolidated on a schedule."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Protocol, runtime_checkable

import torch
from torch import nn


@runtime_checkable
class Consolidating(Protocol):
    """A module that moves or compacts its memories when asked.

    ``consolidate()`` is called outside the forward pass, under ``torch.no_grad()``, at the
    points a schedule chooses (every N optimizer steps, at epoch ends). It returns a small
    mapping of scalar statistics about what moved (``{"moved": n, "mean_importance": x}``),
    as tensors that may stay on the device, or numbers.
    """

    def consolidate(self) -> Mapping[str, torch.Tensor | float]: ...


def consolidating_modules(model: nn.Module) -> dict[str, nn.Module]:
    """The modules of *model* (itself included, as ``""``) that have a ``consolidate``, the
    member :class:`Consolidating` asks for; whether it can be called without arguments
    is the caller's to check.

    The attribute is looked up as ``hasattr`` does, on every Python: from 3.12 on
    ``isinstance(module, Consolidating)`` looks it up statically and misses a submodule
    registered under that name, which a caller should refuse by name instead.
    """
    return {
        name: module
        for name, module in model.named_modules()
        if hasattr(module, "consolidate")
    }
