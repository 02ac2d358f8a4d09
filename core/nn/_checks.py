"""Argument and shape checks shared by the building blocks; errors name the module."""

from __future__ import annotations

import math

import torch
from torch import nn


def describe(module: nn.Module) -> str:
    """``ClassName(settings)`` on one line, to name a module in an error."""
    return f"{type(module).__name__}({module.extra_repr()})"


def check_positive_int(owner: str, name: str, value: object) -> int:
    if not (isinstance(value, int) and not isinstance(value, bool) and value >= 1):
        raise ValueError(f"{owner}: {name} must be an integer >= 1, got {value!r}")
    return value


def check_in_range(
    owner: str, name: str, value: object, low: float, high: float, *, include_high: bool = False
) -> float:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    ok = ok and math.isfinite(value) and low < value and (
        value <= high if include_high else value < high
    )
    if not ok:
        right = "]" if include_high else ")"
        raise ValueError(f"{owner}: {name} must be in ({low}, {high}{right}, got {value!r}")
    return float(value)


def check_features(owner: str, name: str, tensor: torch.Tensor, dim: int) -> None:
    """*tensor* has at least one dimension and its last one is *dim*."""
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"{owner}: {name} must be a tensor, got {type(tensor).__name__}")
    if tensor.dim() == 0 or tensor.shape[-1] != dim:
        raise ValueError(
            f"{owner}: {name} must have {dim} features in its last dimension, got shape "
            f"{tuple(tensor.shape)}"
        )
