"""Tiny models for conformance fixtures: a memory model that reports gates and masks, and a
student with a frozen teacher that report hidden states and logits."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from ..context import report
from ..nn import DualMemory, MemoryGate, SoftTopK
from .fixture import Fixture


class TinyMemoryModel(torch.nn.Module):
    """A sequence classifier built from :mod:`steadytrain.nn`'s blocks.

    Its gate reports ``outputs["gates"]`` (3-way softmax gates), its top-k layer reports
    ``outputs["sparsity_mask"]``, and its :class:`~steadytrain.nn.DualMemory` (module
    ``memory``) implements ``consolidate()``. Inputs are ``(batch, time, 8)``; the logits
    are ``(batch, time, 3)``.
    """

    def __init__(self, dim: int = 8, classes: int = 3) -> None:
        super().__init__()
        self.embed = torch.nn.Linear(dim, dim)
        self.memory = DualMemory(dim, 8, 16, threshold=1)
        self.gate = MemoryGate(dim)
        self.sparse = SoftTopK(dim, 0.5)
        self.head = torch.nn.Linear(dim, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = torch.tanh(self.embed(x))
        stm, ltm = self.memory.retrieve(hidden)
        mixed, _ = self.gate(hidden, stm, ltm)
        sparse, _ = self.sparse(mixed)
        self.memory.store(hidden.detach()[0], sparse.detach()[0])
        return self.head(sparse)


def sequence_batch(generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Four sequences of 5 steps of 8 features, and a class (of 3) per step."""
    return (torch.randn(4, 5, 8, generator=generator),
            torch.randint(0, 3, (4, 5), generator=generator))


def memory_model_fixture(options: Mapping[str, Any] | None = None, **settings: Any) -> Fixture:
    """A :class:`Fixture` that trains :class:`TinyMemoryModel`; *settings* are further
    :class:`Fixture` fields (``steps``, ``warmup_steps``, ``cpu_options``)."""
    return Fixture(model=TinyMemoryModel, batch=sequence_batch, options=options or {},
                   **settings)


def _mlp() -> torch.nn.ModuleList:
    return torch.nn.ModuleList([torch.nn.Linear(4, 8), torch.nn.Linear(8, 8),
                                torch.nn.Linear(8, 3)])


def _run(layers: torch.nn.ModuleList, x: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
    hidden = [torch.tanh(layers[0](x))]
    hidden.append(torch.tanh(layers[1](hidden[0])))
    return hidden, layers[2](hidden[1])


class TinyDistillationModel(torch.nn.Module):
    """A 4 → 8 → 8 → 3 student and a frozen teacher of the same shape (module ``teacher``).

    In a training step it reports the student's two hidden states as
    ``outputs["hidden_states"]`` and the teacher's as ``outputs["teacher_hidden_states"]``
    (lists, layers ``"0"`` and ``"1"``), and the teacher's logits as
    ``outputs["teacher_logits"]``; it returns the student's logits.
    """

    def __init__(self) -> None:
        super().__init__()
        self.student = _mlp()
        self.teacher = _mlp().requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden, logits = _run(self.student, x)
        with torch.no_grad():
            teacher_hidden, teacher_logits = _run(self.teacher, x)
        for student_state, teacher_state in zip(hidden, teacher_hidden, strict=True):
            report("hidden_states", student_state)
            report("teacher_hidden_states", teacher_state)
        report("teacher_logits", teacher_logits)
        return logits


def distillation_fixture(options: Mapping[str, Any] | None = None, **settings: Any) -> Fixture:
    """A :class:`Fixture` that trains :class:`TinyDistillationModel` on classification batches."""
    return Fixture(model=TinyDistillationModel, options=options or {}, **settings)
