"""The corrector family's conformance fixture: a tiny emulator whose outputs pass a corrector.

The model predicts two fields, ``ice`` (a fraction, clamped to [0, 1]) and ``temp``
(non-negative), and records the corrector's changes with :func:`apply_corrector` in its
forward pass. Its raw predictions are scaled so that the corrector changes both fields in
every batch. The task loss is the mean squared error of the fields the plugins say to use
(``for_loss`` of ``pre_corrector_optimization``, the corrected fields otherwise).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from steadytrain.testing import Fixture

from .corrector_penalty import apply_corrector

STD = {"ice": 0.3, "temp": 2.0}


def _clamp(fields: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {"ice": fields["ice"].clamp(0, 1), "temp": fields["temp"].clamp_min(0)}


class TinyEmulator(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.head = torch.nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        raw = 3 * self.head(x)
        return apply_corrector(_clamp, {"ice": raw[:, 0], "temp": raw[:, 1]})


def _batch(generator: torch.Generator) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    x = torch.randn(8, 4, generator=generator)
    return x, {"ice": torch.rand(8, generator=generator),
               "temp": torch.rand(8, generator=generator) * 3}


def _forward(model: torch.nn.Module, x: torch.Tensor, targets: Mapping[str, torch.Tensor],
             instances: Sequence[Any]) -> tuple[torch.Tensor, dict]:
    fields = model(x)
    views = [p.for_loss(fields) for p in instances if hasattr(p, "for_loss")]
    used = views[0] if views else fields
    loss = torch.stack([(used[k] - targets[k]).square().mean() for k in sorted(used)]).sum()
    return loss, {}


def corrected_fields_fixture(options: Mapping[str, Any] | None = None) -> Fixture:
    """The family's :class:`~steadytrain.testing.Fixture`, with the plugin's *options*."""
    return Fixture(model=TinyEmulator, batch=_batch, forward=_forward, options=options or {})
