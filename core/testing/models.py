"""Tiny models for conformance fixtures: a memory model that reports gates and masks."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

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
