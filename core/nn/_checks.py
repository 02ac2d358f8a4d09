"""Argument and shape checks shared by the building blocks; errors name the module."""

from __future__ import annotations

import torch
from torch import nn

from ..validators import in_range

#: A share in (0, 1]: sparsity targets, decays.
FRACTION = in_range(0.0, 1.0, include_high=True)


def describe(module: nn.Module) -> str:
    """``ClassName(settings)`` on one line, to name a module in an error."""
    return f"{type(module).__name__}({module.extra_repr()})"


def check_features(owner: str, name: str, tensor: torch.Tensor, dim: int) -> None:
    """*tensor* has at least one dimension and its last one is *dim*."""
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"{owner}: {name} must be a tensor, got {type(tensor).__name__}")
    if tensor.dim() == 0 or tensor.shape[-1] != dim:
        raise ValueError(
            f"{owner}: {name} must have {dim} features in its last dimension, got shape "
            f"{tuple(tensor.shape)}"
        )
