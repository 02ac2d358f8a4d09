"""Gate smoothness: penalize gates that jump from one time step to the next.

What it does
    Adds ``mean((g[t+1] − g[t])²)`` over the time dimension of every gate tensor, where
    ``g`` holds a probability vector over its last dimension (a k-way gate, e.g. short-term
    memory / long-term memory / residual). The mean runs over every element of the
    differences (batch, time steps and the k gate entries), as in the source.

When to use it
    When a model mixes pathways through a softmax gate and the gate flips between them
    from token to token, which shows up as loss oscillations. Pair it with
    ``gate_entropy`` against the opposite failure, a gate collapsed onto one pathway.

Hyperparameters
    ``weight`` (the instance's weight; suggested 0.1, the source's value — it is not set
    for you, put ``weight = 0.1`` in the config). ``time_dim`` (default -2: the dimension
    before the gate dimension, i.e. the sequence dimension of ``(batch, seq, k)`` and of
    ``(seq, k)`` gates).
    Where the gates come from: ``key`` (default ``"gates"``), the name the model reports
    them under with ``steadytrain.report``; or ``taps``, module-name patterns whose
    outputs are the gates (the instance's include/exclude narrow them; ``tap_element``
    picks the gates out of a tuple output). ``check`` (default ``"auto"``: every step on
    the CPU, the first step on an accelerator, where it costs a host sync; or
    ``"every_step"``, ``"first_step"``, ``"never"``) and ``atol`` (default 1e-3; raise it
    to about 1e-2 for bfloat16 gates) govern the check that gates sum to 1.

Source
    The memory-model stability document (seed 000), section 5 "Loss Function
    Modifications": ``torch.mean((gates[1:] - gates[:-1])**2)`` with weight 0.1.

Caveats
    The source differences along dimension 0, which for ``(batch, seq, k)`` gates compares
    different sequences of the batch rather than consecutive tokens; ``time_dim`` fixes
    that and defaults to the sequence dimension. Padded positions are not masked out:
    a transition into padding is penalized like any other. The term scales as 1/k with
    the gate width because the mean includes the gate dimension.
"""

from __future__ import annotations

import attrs
import torch

import steadytrain
from steadytrain.sources import GateOptions, GateRegularizer, at_least_float32


def gate_smoothness(gates: torch.Tensor, time_dim: int = -2) -> torch.Tensor:
    """``mean((g[t+1] − g[t])²)`` along *time_dim* of *gates* (probabilities over dim -1)."""
    ndim = gates.dim()
    if ndim < 2:
        raise ValueError(
            f"gates need a time dimension and a gate dimension, got shape {tuple(gates.shape)}"
        )
    if not -ndim <= time_dim < ndim:
        raise ValueError(f"time_dim {time_dim} is out of range for gates of shape "
                         f"{tuple(gates.shape)}")
    dim = time_dim % ndim
    if dim == ndim - 1:
        raise ValueError(
            f"time_dim {time_dim} is the last dimension, which holds the gate values; "
            "point it at the sequence dimension"
        )
    if gates.shape[dim] < 2:
        raise ValueError(
            f"time_dim {time_dim} has size {gates.shape[dim]} in gates of shape "
            f"{tuple(gates.shape)}: there is no transition to smooth"
        )
    return torch.diff(at_least_float32(gates), dim=dim).square().mean()


class GateSmoothness(GateRegularizer):
    """Penalize gate changes between consecutive time steps (mean squared difference)."""

    name = "gate_smoothness"

    @attrs.frozen
    class Config(GateOptions):
        time_dim: int = -2

    @steadytrain.hookimpl
    def compute_regularizers(self, ctx: steadytrain.StepContext) -> dict[str, torch.Tensor]:
        time_dim = self.config.time_dim
        return {"smoothness": self.average(ctx, lambda g: gate_smoothness(g, time_dim))}

    @classmethod
    def conformance_fixture(cls) -> steadytrain.testing.Fixture:
        """The conformance kit trains a memory model that reports gates and masks; on the
        CPU the values are checked on the first step only, as on an accelerator."""
        from steadytrain.testing import memory_model_fixture

        return memory_model_fixture(cpu_options={"check": "first_step"})
