"""Gradient-norm metric: the total norm of the selected gradients, every step.

What it does
    Records ``‖g‖_p`` over the parameters selected by include/exclude, after the backward
    of each optimizer step, as the metric ``<id>/norm``. The norm stays on the device until
    the host reads the metrics.

When to use it
    Always, when training is unstable: a gradient norm that jumps before the loss does is
    the earliest sign of divergence, and it tells whether clipping thresholds are sensible.

Hyperparameters
    ``norm_type`` (default 2.0; ``inf`` for the max-abs norm).

Source
    Standard practice; the memory-model stability document (seed 000) lists the gradient
    norm among the metrics that confirm a run is stable.

Caveats
    The instance runs last in ``after_backward``, so it records the gradients the
    optimizer gets: after clipping. Its norm is taken from the norms the step's plugins
    share (``ctx.gradient_norm``); when a clipping plugin ran before it, that means one
    fused pass over the clipped gradients. Parameters without a gradient this step are
    left out. Under gradient scaling (AMP)
    the norm is of the scaled gradients unless the host unscales before
    ``after_backward``.
"""

from __future__ import annotations

from collections.abc import Iterable

import attrs
import torch

import steadytrain
from steadytrain.validators import norm_order


def grad_norm(parameters: Iterable[torch.Tensor], norm_type: float = 2.0) -> torch.Tensor:
    """The total ``norm_type`` norm of the gradients of *parameters* (0 if none has one)."""
    grads = [p.grad for p in parameters if p.grad is not None]
    return torch.nn.utils.get_total_norm(grads, norm_type, foreach=bool(grads))


class GradNorm(steadytrain.Plugin):
    """Record the total gradient norm of the selected parameters every step."""

    name = "grad_norm"

    @attrs.frozen
    class Config:
        norm_type: float = attrs.field(default=2.0, validator=norm_order)

    @steadytrain.hookimpl
    def setup(self, run: steadytrain.Run) -> None:
        names = self.filter.select([n for n, _ in run.named_parameters()], kind="parameter")
        params = dict(run.named_parameters())
        self.params = [params[n] for n in names]

    @steadytrain.hookimpl(trylast=True)
    def after_backward(self, ctx: steadytrain.StepContext) -> None:
        ctx.log("norm", ctx.gradient_norm(self.params, norm_type=self.config.norm_type))
