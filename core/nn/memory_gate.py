"""The temperature-controlled residual memory gate (seed 000, section 1).

A three-way softmax gate mixes the current hidden state with what short-term and
long-term memory returned. The gate logits are a linear map of the three inputs plus a
learnable bias that starts in favour of the current state, divided by a learnable
temperature that is clamped from below so that the gate cannot become a hard switch.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ..context import report
from ..errors import ConfigError
from ..validators import check, positive, positive_int
from ._checks import check_features, describe

GATE_BIAS = (0.5, 0.3, 0.2)
"""Initial gate bias: current state, short-term memory, long-term memory."""


def mix_memories(
    current: torch.Tensor, stm: torch.Tensor, ltm: torch.Tensor, gates: torch.Tensor
) -> torch.Tensor:
    """``current + g1·(stm − current) + g2·(ltm − current)``, gates on the last dimension.

    *gates* has the shape of the inputs with 3 in the last dimension (current, stm, ltm).
    When the gates sum to 1 this is the convex mix ``g0·current + g1·stm + g2·ltm``,
    written as a residual around *current* as in the document.
    """
    return current + gates[..., 1:2] * (stm - current) + gates[..., 2:3] * (ltm - current)


class MemoryGate(nn.Module):
    """Mix the current state with short- and long-term memory through a smooth 3-way gate.

    ``gates = softmax((gate_proj([current, stm, ltm]) + gate_bias) / max(T, min_temperature))``
    over the last dimension, and the output is :func:`mix_memories`. Inputs are
    ``(..., dim)`` tensors of one shape (``(B, D)`` and ``(B, T, D)`` alike). ``forward``
    returns ``(output, gates)`` and reports the gates to the open pipeline step as
    ``ctx.outputs[report_as]`` (``report_as=None`` reports nothing).

    The temperature is clamped, not reparametrised: once the learnable value falls below
    ``min_temperature`` it receives no gradient from the gate.
    """

    def __init__(
        self,
        dim: int,
        *,
        min_temperature: float = 0.1,
        bias: Sequence[float] = GATE_BIAS,
        report_as: str | None = "gates",
    ) -> None:
        super().__init__()
        owner = type(self).__name__
        self.dim = check(dim, positive_int, f"{owner}.dim")
        self.min_temperature = check(
            min_temperature, positive, f"{owner}.min_temperature"
        )
        if len(bias) != 3:
            raise ConfigError(
                f"{owner}.bias: must have 3 values (current, stm, ltm), got {bias!r}"
            )
        self.report_as = report_as
        self.gate_proj = nn.Linear(3 * dim, 3)
        self.temperature = nn.Parameter(torch.ones(1))
        self.gate_bias = nn.Parameter(torch.tensor([float(b) for b in bias]))

    def forward(
        self, current: torch.Tensor, stm: torch.Tensor, ltm: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        owner = describe(self)
        for name, tensor in (("current", current), ("stm", stm), ("ltm", ltm)):
            check_features(owner, name, tensor, self.dim)
        if not current.shape == stm.shape == ltm.shape:
            raise ValueError(
                f"{owner}: current, stm and ltm must have one shape, got "
                f"{tuple(current.shape)}, {tuple(stm.shape)} and {tuple(ltm.shape)}"
            )
        logits = self.gate_proj(torch.cat([current, stm, ltm], dim=-1)) + self.gate_bias
        gates = torch.softmax(logits / self.temperature.clamp(min=self.min_temperature), dim=-1)
        if self.report_as is not None:
            report(self.report_as, gates)
        return mix_memories(current, stm, ltm, gates), gates

    def extra_repr(self) -> str:
        return f"dim={self.dim}, min_temperature={self.min_temperature}"
