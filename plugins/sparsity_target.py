"""Sparsity target: pull the fraction of active units of a mask toward a target.

What it does
    Adds ``(mean(mask) − target)²`` for every mask tensor, where ``mask`` holds values in
    [0, 1] (1 = unit active): a soft top-k mask, a sigmoid gate per feature, or a hard
    0/1 mask (which carries no gradient, but the term is still recorded). The mean runs
    over every element. With several masks each gets its own term and the terms are
    averaged. The mean mask is recorded as the metric ``<id>/density``.

When to use it
    When a learned sparsity layer drifts away from its intended density — all units on
    (the sparsity stops saving anything) or all off (the layer stops passing signal).

Hyperparameters
    ``weight`` (suggested 0.1, the source's value; set it in the config). ``target``
    (default 0.15, the source's value: 15 % of the units active). Where the masks come
    from: ``key`` (default ``"sparsity_mask"``), the name the model reports them under
    with ``steadytrain.report``; or ``taps``, module-name patterns whose outputs are the
    masks (include/exclude narrow them; ``tap_element`` picks the mask out of a tuple
    output). ``check`` (default ``"auto"``: every step on the CPU, the first step on an
    accelerator, where it costs a host sync; or ``"every_step"``, ``"first_step"``,
    ``"never"``) governs the check that the mask lies in [0, 1].

Source
    The memory-model stability document (seed 000), section 5 "Loss Function
    Modifications": ``(sparsity_mask.mean() - 0.15)**2`` with weight 0.1.

Caveats
    The penalty acts on the mean over the whole tensor: it fixes the overall density, not
    the density of each token or feature. A mask with a value outside [0, 1] is an error
    (checked as ``check`` says): it is most likely pre-activation scores, whose mean says
    nothing about sparsity.
"""

from __future__ import annotations

import attrs
import torch

import steadytrain
from steadytrain.sources import (
    SourceOptions,
    TensorRegularizer,
    at_least_float32,
    mean_of,
)
from steadytrain.validators import in_range


def mask_density(mask: torch.Tensor) -> torch.Tensor:
    """The mean of *mask* over all its elements, in float32 or wider."""
    if mask.numel() == 0:
        raise ValueError(f"the mask is empty (shape {tuple(mask.shape)})")
    return at_least_float32(mask).mean()


def sparsity_penalty(mask: torch.Tensor, target: float = 0.15) -> torch.Tensor:
    """``(mean(mask) − target)²`` for a *mask* of values in [0, 1]."""
    return (mask_density(mask) - target).square()


class SparsityTarget(TensorRegularizer):
    """Pull the mean of a [0, 1] mask toward a target density (squared error)."""

    name = "sparsity_target"
    what = "mask"

    @attrs.frozen
    class Config(SourceOptions):
        key: str = "sparsity_mask"
        target: float = attrs.field(
            default=0.15, validator=in_range(0.0, 1.0, include_low=True, include_high=True)
        )

    def check_values(self, tensor: torch.Tensor) -> str | None:
        if tensor.dtype == torch.bool:
            return None
        if tensor.numel() == 0:
            return f"it is empty (shape {tuple(tensor.shape)})"
        low, high = torch.stack([tensor.amin(), tensor.amax()]).float().tolist()
        # written so that NaN fails the comparison
        if not 0.0 <= low <= high <= 1.0:
            return (
                f"its values span [{low:.3g}, {high:.3g}], outside [0, 1]; pass the mask "
                "after its sigmoid or threshold, not the raw scores"
            )
        return None

    @steadytrain.hookimpl
    def compute_regularizers(self, ctx: steadytrain.StepContext) -> dict[str, torch.Tensor]:
        densities: list[torch.Tensor] = []
        target = self.config.target

        def penalty(mask: torch.Tensor) -> torch.Tensor:
            density = mask_density(mask)
            densities.append(density.detach())
            return (density - target).square()

        term = self.average(ctx, penalty)
        ctx.log("density", mean_of(densities))
        return {"sparsity": term}

    @classmethod
    def conformance_fixture(cls) -> steadytrain.testing.Fixture:
        """The conformance kit trains a memory model that reports gates and masks; on the
        CPU the values are checked on the first step only, as on an accelerator."""
        from steadytrain.testing import memory_model_fixture

        return memory_model_fixture(cpu_options={"check": "first_step"})
