"""What the conformance kit trains a plugin with, and how a plugin declares what it needs.

A plugin that works on the kit's default (a small classifier whose logits are passed as
``outputs["logits"]``) declares nothing. A plugin that needs other inputs (gates, a
corrector's corrections, a teacher, options without defaults) gives its class a
classmethod that returns a :class:`Fixture`::

    class GatePenalty(steadytrain.Plugin):
        ...

        @classmethod
        def conformance_fixture(cls):
            from steadytrain.testing import memory_model_fixture

            return memory_model_fixture(options={"target": 1.0})

The import stays inside the method, so that loading the plugin does not load the kit.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import attrs
import torch
import torch.nn.functional as F

from ..errors import ConfigError
from ..validators import non_negative_int, positive_int

#: ``forward(model, inputs, targets, instances) -> (task_loss, outputs)``: one forward pass;
#: *instances* are the plugin instances under test, in config order.
Forward = Callable[[torch.nn.Module, Any, Any, Sequence[Any]], tuple[torch.Tensor, Mapping]]

#: The name of the classmethod through which a plugin class provides its :class:`Fixture`.
FIXTURE_METHOD = "conformance_fixture"


def tiny_classifier() -> torch.nn.Module:
    """A 4 → 8 → 3 MLP with a tanh; its parameters are ``0.weight`` … ``2.bias``."""
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))


def classification_batch(generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Eight inputs of 4 features and their class indices (3 classes)."""
    return torch.randn(8, 4, generator=generator), torch.randint(0, 3, (8,), generator=generator)


def classification_forward(
    model: torch.nn.Module, inputs: Any, targets: Any, instances: Sequence[Any]
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Cross-entropy of the model's logits, which are passed on as ``outputs["logits"]``.

    Logits of shape ``(..., classes)`` are flattened to rows, so that sequence models fit.
    """
    logits = model(inputs)
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))
    return loss, {"logits": logits}


def input_gradient_forward(
    model: torch.nn.Module, inputs: Any, targets: Any, instances: Sequence[Any]
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """:func:`classification_forward` on inputs marked with ``requires_grad``, passed on as
    ``outputs["inputs"]``, with the logits also as ``outputs["scores"]``: for penalties on
    the gradient of the output with respect to the input."""
    marked = inputs.detach().requires_grad_()
    loss, outputs = classification_forward(model, marked, targets, instances)
    return loss, {**outputs, "inputs": marked, "scores": outputs["logits"]}


@attrs.frozen
class Fixture:
    """A tiny training setup for one plugin: model, batches, forward pass and options.

    ``model`` builds the model (called after ``torch.manual_seed``); ``batch`` makes one
    ``(inputs, targets)`` pair on the CPU from a seeded generator (the kit moves it to the
    device under test); ``forward`` runs the model and returns the task loss and the named
    outputs handed to ``compute_loss``. ``options`` are keys of the instance's config entry
    (plugin options, ``weight``, ``include``, ...) used in every run but the check that the
    plugin builds from its defaults. ``steps`` optimizer steps are trained (at least 2,
    so that a run can be resumed half-way). ``warmup_steps`` is the number of first steps
    in which the plugin syncs the host on purpose (documented first-step checks); the
    no-sync check watches the steps after them. ``cpu_options`` are merged over
    ``options`` for that check on the CPU, for a plugin that checks values every step on
    the CPU (where it costs nothing) but not on an accelerator.
    """

    model: Callable[[], torch.nn.Module] = tiny_classifier
    batch: Callable[[torch.Generator], tuple[Any, Any]] = classification_batch
    forward: Forward = classification_forward
    options: Mapping[str, Any] = attrs.field(factory=dict, converter=dict)
    steps: int = attrs.field(default=4, validator=positive_int)
    warmup_steps: int = attrs.field(default=1, validator=non_negative_int)
    cpu_options: Mapping[str, Any] = attrs.field(factory=dict, converter=dict)

    def __attrs_post_init__(self) -> None:
        if self.steps < 2:
            raise ConfigError(
                f"Fixture.steps: must be at least 2 (the run is resumed half-way), got "
                f"{self.steps}"
            )
        if self.warmup_steps >= self.steps:
            raise ConfigError(
                f"Fixture.warmup_steps: must be below steps ({self.steps}), got "
                f"{self.warmup_steps}: no step would be watched for host syncs"
            )


def fixture_of(plugin: type) -> Fixture:
    """The :class:`Fixture` a plugin class declares, or the default one."""
    method = getattr(plugin, FIXTURE_METHOD, None)
    if method is None:
        return Fixture()
    fixture = method()
    if not isinstance(fixture, Fixture):
        raise ConfigError(
            f"{plugin.__qualname__}.{FIXTURE_METHOD}() must return a "
            f"steadytrain.testing.Fixture, got {type(fixture).__name__}"
        )
    return fixture
