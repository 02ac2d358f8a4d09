"""The error expectation the contract tests share: a steadytrain error type, and what its
message must name (the instance id, the option, what to do)."""

from collections.abc import Iterator
from contextlib import contextmanager

import pytest

import steadytrain


@contextmanager
def raises(error: type[Exception], *parts: str) -> Iterator[pytest.ExceptionInfo]:
    """Like ``pytest.raises(error)``; the message (notes included) must contain every part."""
    assert issubclass(error, steadytrain.SteadytrainError), f"{error} is no SteadytrainError"
    with pytest.raises(error) as info:
        yield info
    message = "\n".join([str(info.value), *getattr(info.value, "__notes__", ())])
    missing = [part for part in parts if part not in message]
    assert not missing, f"the {type(info.value).__name__} lacks {missing}:\n{message}"
