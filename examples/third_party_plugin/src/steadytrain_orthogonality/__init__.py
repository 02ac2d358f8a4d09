"""Soft orthogonality: keep weight matrices close to orthogonal, ``‖WᵀW − I‖²_F``.

What it does
    For every selected weight matrix ``W`` (a parameter with two or more dimensions,
    flattened to ``(rows, rest)``), adds the squared Frobenius distance of its Gram
    matrix from the identity to the loss: ``‖W Wᵀ − I‖²_F`` when ``W`` has at most as
    many rows as columns (orthonormal rows), ``‖WᵀW − I‖²_F`` otherwise (orthonormal
    columns), so that the target is always reachable. The term is the mean (or the sum)
    over the selected matrices.

When to use it
    When the singular values of weight matrices drift far from 1 and activations or
    gradients explode or vanish through depth; in deep or recurrent networks whose
    training diverges at learning rates a shallower network takes.

Hyperparameters
    ``weight`` (the instance weight) 1e-4 to 1e-2 for networks of a few layers; sweep it.
    ``reduction`` (default ``"mean"`` over the matrices, or ``"sum"``).
    ``include`` / ``exclude`` select matrices by parameter name (biases and other 1-D
    parameters are never candidates): ``exclude = ["head.*"]`` leaves the output layer
    free.

Source
    Bansal, Chen and Wang, "Can We Gain More from Orthogonality Regularizations in
    Training Deep CNNs?", NeurIPS 2018: the soft orthogonality (SO) regularizer
    ``λ‖WᵀW − I‖²_F``.

Caveats
    The penalty grows with the fourth power of the weights' scale: a large weight early
    in training can dominate the task loss; warm it up with a schedule. It constrains
    every singular value to 1, which also fixes the layer's gain: pair it with
    normalization layers, or exclude the layers whose scale matters.
"""

from __future__ import annotations

import attrs
import torch

import steadytrain
from steadytrain.validators import one_of

__version__ = "0.1.0"


def orthogonality_penalty(weight: torch.Tensor) -> torch.Tensor:
    """``‖G − I‖²_F`` for the smaller Gram matrix ``G`` of *weight* flattened to 2-D."""
    matrix = weight.reshape(weight.shape[0], -1)
    rows, cols = matrix.shape
    gram = matrix @ matrix.T if rows <= cols else matrix.T @ matrix
    identity = torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)
    return torch.linalg.matrix_norm(gram - identity, ord="fro").square()


class OrthogonalityPenalty(steadytrain.Plugin):
    """Penalize the distance of selected weight matrices from orthogonality."""

    name = "orthogonality"
    requires_core = "0.1"

    @attrs.frozen
    class Config:
        reduction: str = attrs.field(default="mean", validator=one_of("mean", "sum"))

    @steadytrain.hookimpl
    def setup(self, run: steadytrain.Run) -> None:
        matrices = {n: p for n, p in run.named_parameters() if p.dim() >= 2}
        names = self.filter.select(list(matrices), kind="weight matrix")
        self.matrices = [matrices[n] for n in names]

    @steadytrain.hookimpl
    def compute_regularizers(self, ctx: steadytrain.StepContext) -> dict[str, torch.Tensor]:
        penalties = torch.stack([orthogonality_penalty(w) for w in self.matrices])
        total = penalties.sum() if self.config.reduction == "sum" else penalties.mean()
        return {"orthogonality": total}
