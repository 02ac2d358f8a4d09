"""Gate entropy: keep a softmax gate from collapsing onto one pathway.

What it does
    Computes the Shannon entropy ``H = −Σ_j g_j log g_j`` (nats) of every gate vector
    (the last dimension of the gate tensor), averages it over all other positions (batch,
    tokens), and returns the entropy deficit ``target − H`` (``form = "linear"``, the
    source's formula), ``max(0, target − H)`` (``"hinge"``: no push once the target is
    reached) or ``(target − H)²`` (``"squared"``: pulled toward the target from both
    sides). With several gate tensors each gets its own term and the terms are averaged.
    The mean entropy is recorded as the metric ``<id>/entropy``.

When to use it
    When one pathway of a gated model starves the others (the gate saturates at one
    corner and the unused memories stop learning). Pair it with ``gate_smoothness``.

Hyperparameters
    ``weight`` (suggested 0.05, the source's value; set it in the config). ``target``
    (default 2.0, the source's value) and ``form`` (default ``"linear"``).
    Where the gates come from and how they are checked (``key``, ``taps``,
    ``tap_element``, ``check``, ``atol``): the same options as ``gate_smoothness``.

Source
    The memory-model stability document (seed 000), section 5 "Loss Function
    Modifications": ``0.05 * (2.0 - gate_entropy)`` with
    ``gate_entropy = -torch.mean(gates * torch.log(gates + 1e-8))``.

Caveats
    The entropy of a k-way gate is at most ``ln k`` (ln 3 ≈ 1.10 for the source's 3-way
    gate), so the source's target 2.0 cannot be reached. The target is clamped to
    ``ln k`` and the instance warns once: with a clamped target the linear and hinge forms
    both push toward uniform gates and are 0 exactly there. Set ``target`` at most
    ``ln k`` to aim at a partly mixed gate instead.

    The source averages ``g·log g`` over the gate entries too, which divides the entropy
    by k (a uniform 3-way gate would have "entropy" 0.37, not 1.10); here the entropy is
    summed over the gate entries and averaged over positions only. The source's
    ``+ 1e-8`` inside the log biases small probabilities; here zero probabilities
    contribute 0, as in ``torch.distributions.Categorical``. The linear form keeps
    pushing the entropy up after a reachable target is met; use ``"hinge"`` to stop
    there.
"""

from __future__ import annotations

import math
import warnings

import attrs
import torch

import steadytrain
from steadytrain.sources import (
    GateOptions,
    GateRegularizer,
    at_least_float32,
    mean_of,
)
from steadytrain.validators import non_negative, one_of

FORMS = ("linear", "hinge", "squared")


def gate_entropy(gates: torch.Tensor) -> torch.Tensor:
    """Mean over all positions of the entropy (nats) of each gate vector (the last dim)."""
    if gates.dim() < 1 or gates.shape[-1] < 1:
        raise ValueError(f"gates need a gate dimension, got shape {tuple(gates.shape)}")
    probs = at_least_float32(gates)
    # clamping inside the log keeps 0·log 0 at 0 and its gradient finite
    logs = probs.clamp_min(torch.finfo(probs.dtype).tiny).log()
    return -(probs * logs).sum(-1).mean()


def reachable_target(target: float, gate_size: int) -> float:
    """*target* clamped to ``ln gate_size``, the largest entropy a gate of that size has."""
    return min(target, math.log(gate_size))


def gate_entropy_penalty(
    gates: torch.Tensor, target: float = 2.0, form: str = "linear"
) -> torch.Tensor:
    """The penalty on the mean gate entropy ``H`` for falling short of *target*.

    ``"linear"``: ``t − H``; ``"hinge"``: ``max(0, t − H)``; ``"squared"``: ``(t − H)²``,
    with ``t`` = *target* clamped to ``ln k`` for gates of size k.
    """
    return _penalize(reachable_target(target, gates.shape[-1]) - gate_entropy(gates), form)


def _penalize(deficit: torch.Tensor, form: str) -> torch.Tensor:
    if form == "linear":
        return deficit
    if form == "hinge":
        return deficit.clamp_min(0.0)
    if form == "squared":
        return deficit.square()
    raise ValueError(f"form must be one of {', '.join(FORMS)}, got {form!r}")


class GateEntropy(GateRegularizer):
    """Keep gate entropy up toward a target (clamped to ln k) so that gates do not collapse."""

    name = "gate_entropy"

    @attrs.frozen
    class Config(GateOptions):
        target: float = attrs.field(default=2.0, validator=non_negative)
        form: str = attrs.field(default="linear", validator=one_of(*FORMS))

    @steadytrain.hookimpl
    def setup(self, run: steadytrain.Run) -> None:
        super().setup(run)
        self._warned_sizes: set[int] = set()

    @steadytrain.hookimpl
    def compute_regularizers(self, ctx: steadytrain.StepContext) -> dict[str, torch.Tensor]:
        entropies: list[torch.Tensor] = []

        def penalty(gates: torch.Tensor) -> torch.Tensor:
            self._warn_if_unreachable(gates.shape[-1])
            entropy = gate_entropy(gates)
            entropies.append(entropy.detach())
            target = reachable_target(self.config.target, gates.shape[-1])
            return _penalize(target - entropy, self.config.form)

        term = self.average(ctx, penalty)
        ctx.log("entropy", mean_of(entropies))
        return {"entropy_deficit": term}

    def _warn_if_unreachable(self, size: int) -> None:
        if size in self._warned_sizes:
            return
        self._warned_sizes.add(size)
        limit = math.log(size)
        if self.config.target > limit:
            warnings.warn(
                f"{self.id}.target: {self.config.target:g} is above the largest entropy of a "
                f"{size}-way gate, ln {size} = {limit:.4f}; using {limit:.4f}, which pushes "
                f"toward uniform gates. Set target <= {limit:.4f} to aim lower.",
                stacklevel=2,
            )

    @classmethod
    def conformance_fixture(cls) -> steadytrain.testing.Fixture:
        """The conformance kit trains a memory model that reports gates and masks; on the
        CPU the values are checked on the first step only, as on an accelerator."""
        from steadytrain.testing import memory_model_fixture

        return memory_model_fixture(cpu_options={"check": "first_step"})
