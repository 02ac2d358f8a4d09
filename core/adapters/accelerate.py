"""Stepping an optimizer that ``accelerator.prepare`` returned, under the pipeline's decision.

A loop under Accelerate calls the pipeline as a plain loop does; only the optimizer step
differs, because ``accelerator.prepare`` wraps the optimizer in an ``AcceleratedOptimizer``
and, under fp16, drives it through a ``GradScaler``::

    for index, (x, y) in enumerate(loader):
        with accelerator.accumulate(model):
            window = index - index % k                # the last one may be shorter
            pipe.before_step(batch=x, targets=y, micro_batch=index - window,
                             num_micro_batches=min(k, len(loader) - window), loss_scale=1.0)
            logits = model(x)
            loss = pipe.compute_loss(F.cross_entropy(logits, y), outputs={"logits": logits})
            accelerator.backward(loss)                # divides by k itself
            if accelerator.sync_gradients:
                accelerator.unscale_gradients()       # fp16: plugins see the true gradients
                outcome = pipe.after_backward()       # the clipping plugin clips here
                step_optimizer(optimizer, outcome)
                pipe.consolidate()
                optimizer.zero_grad()

``docs/accelerate.md`` has the whole loop. The Hugging Face ``Trainer`` adapter steps its
optimizer through :func:`step_optimizer` too.
"""

from __future__ import annotations

import torch
from accelerate.optimizer import AcceleratedOptimizer

import steadytrain


class _DecidingScaler:
    """A gradient scaler whose overflow check also holds the pipeline's skip decision."""

    def __init__(self, scaler: torch.amp.GradScaler, outcome: steadytrain.StepOutcome) -> None:
        self.scaler, self.outcome = scaler, outcome

    def step(self, optimizer: torch.optim.Optimizer, *_closure: object) -> None:
        steadytrain.step_optimizer(optimizer, self.outcome, scaler=self.scaler)

    def update(self) -> None:
        self.scaler.update()


def step_optimizer(
    optimizer: AcceleratedOptimizer | torch.optim.Optimizer, outcome: steadytrain.StepOutcome
) -> None:
    """Step *optimizer* (as ``accelerator.prepare`` returned it) unless *outcome* says skip.

    Without a gradient scaler the wrapped torch optimizer is stepped by
    :func:`steadytrain.step_optimizer`: a fused Adam, AdamW, SGD or Adagrad takes the
    decision on the device as ``found_inf``, any other optimizer reads it once. Under fp16
    Accelerate's own step runs, with the decision added to its ``GradScaler``'s overflow
    check as :func:`steadytrain.step_optimizer` adds it: a skipped step backs the scale off
    as an overflow does, and for an optimizer that is not fused Accelerate reports it in
    ``optimizer.step_was_skipped``. Call it where the loop would call ``optimizer.step()``,
    once the gradients are synchronized.
    """
    if not isinstance(optimizer, AcceleratedOptimizer):
        steadytrain.step_optimizer(optimizer, outcome)
        return
    scaler = optimizer.scaler
    if scaler is None:
        steadytrain.step_optimizer(optimizer.optimizer, outcome)
        return
    optimizer.scaler = _DecidingScaler(scaler, outcome)
    try:
        # The class's step, not the instance's: the Trainer adapter routes the instance's
        # step through this function.
        AcceleratedOptimizer.step(optimizer)
    finally:
        optimizer.scaler = scaler
