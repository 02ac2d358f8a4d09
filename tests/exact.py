"""Exact comparison of nested states (checkpoints, optimizer states, model weights)."""

import math
from typing import Any

import torch


def _equal_tensors(actual: torch.Tensor, expected: torch.Tensor) -> bool:
    if actual.dtype != expected.dtype or actual.shape != expected.shape:
        return False
    if not actual.is_floating_point():
        return torch.equal(actual, expected)
    # NaN is a value here (a guard's loss window holds NaN for the steps it has not seen)
    return torch.equal(actual.isnan(), expected.isnan()) and torch.equal(
        actual.nan_to_num(), expected.nan_to_num())


def assert_same(actual: Any, expected: Any, where: str = "state") -> None:
    """*actual* equals *expected* exactly: same types, tensors bit for bit, NaN equal to NaN."""
    assert type(actual) is type(expected), f"{where}: {type(actual)} != {type(expected)}"
    if isinstance(expected, torch.Tensor):
        assert _equal_tensors(actual, expected), f"{where}: {actual} != {expected}"
    elif isinstance(expected, dict):
        assert list(actual) == list(expected), f"{where}: keys {list(actual)} != {list(expected)}"
        for key in expected:
            assert_same(actual[key], expected[key], f"{where}[{key!r}]")
    elif isinstance(expected, (list, tuple)):
        assert len(actual) == len(expected), f"{where}: {len(actual)} != {len(expected)} items"
        for i, (a, e) in enumerate(zip(actual, expected, strict=True)):
            assert_same(a, e, f"{where}[{i}]")
    elif isinstance(expected, float) and math.isnan(expected):
        assert math.isnan(actual), f"{where}: {actual!r} is not NaN"
    else:
        assert actual == expected, f"{where}: {actual!r} != {expected!r}"
