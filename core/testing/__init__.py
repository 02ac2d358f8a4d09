"""The conformance kit: the checks every steadytrain plugin must pass, for its own test suite.

Installing steadytrain installs a pytest plugin (entry point ``pytest11``) whose fixture
``conformance_check`` runs once per check, so a plugin's suite needs one test::

    def test_conformance(conformance_check):
        conformance_check(MyPlugin)

Without pytest, :func:`check_plugin` runs every check and raises one
:class:`ConformanceError` listing the failures. A plugin that needs inputs other than a
classifier's logits declares them with a ``conformance_fixture`` classmethod returning a
:class:`Fixture` (see :mod:`steadytrain.testing.fixture`).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from .checks import CHECKS, ConformanceError
from .fixture import (
    FIXTURE_METHOD,
    Fixture,
    classification_batch,
    classification_forward,
    fixture_of,
    input_gradient_forward,
    tiny_classifier,
)
from .host_sync import HostSyncError, no_host_sync
from .models import (
    TinyDistillationModel,
    TinyMemoryModel,
    distillation_fixture,
    memory_model_fixture,
    sequence_batch,
)
from .session import Session, batches


def _describe(plugin: type) -> str:
    return f"plugin {getattr(plugin, 'name', '?')!r} ({plugin.__module__}:{plugin.__qualname__})"


def run_check(name: str, plugin: type, *, device: str | torch.device = "cpu") -> None:
    """Run the check called *name* (a key of :data:`CHECKS`) on *plugin*, a plugin class.

    Raises :class:`ConformanceError` naming the plugin and the check, with the original
    exception as its cause.
    """
    if name not in CHECKS:
        raise KeyError(f"unknown conformance check {name!r}; the checks are {', '.join(CHECKS)}")
    where = f"{_describe(plugin)} fails conformance check {name}"
    try:
        CHECKS[name](plugin, fixture_of(plugin), torch.device(device))
    except Exception as exc:
        raise ConformanceError(f"{where}: {type(exc).__name__}: {exc}") from exc


def check_plugin(
    plugin: type, *, checks: Iterable[str] | None = None, device: str | torch.device = "cpu"
) -> None:
    """Run every check (or those named in *checks*) on *plugin*; raise one
    :class:`ConformanceError` listing all the failures."""
    failures = []
    for name in CHECKS if checks is None else checks:
        try:
            run_check(name, plugin, device=device)
        except ConformanceError as exc:
            failures.append(str(exc))
    if failures:
        raise ConformanceError("\n".join(failures))


__all__ = [
    "CHECKS",
    "FIXTURE_METHOD",
    "ConformanceError",
    "Fixture",
    "HostSyncError",
    "Session",
    "TinyDistillationModel",
    "TinyMemoryModel",
    "batches",
    "check_plugin",
    "classification_batch",
    "classification_forward",
    "distillation_fixture",
    "fixture_of",
    "input_gradient_forward",
    "memory_model_fixture",
    "no_host_sync",
    "run_check",
    "sequence_batch",
    "tiny_classifier",
]
