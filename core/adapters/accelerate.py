"""Stepping an optimizer that ``accelerator.prepare`` returned, under the pipeline's decision.

A loop under Accelerate calls the pipeline as a plain loop does; only the optimizer step
differs, because ``accelerator.prepare`` wraps the optimizer in an ``AcceleratedOptimizer``
and, under fp16, drives it through a ``GradScaler``::

    for index, (x, y) in enumerate(loader):
        with accelerator.accumulate(model):
            pipe.before_step(batch=x, targets=y, micro_batch=index % k,
                             num_micro_batches=k, loss_scale=1.0)
            logits = model(x)
            loss = pipe.compute_loss(F.cross_entropy(logits, y), outputs={"logits": logits})
            accelerator.backward(loss)                # divides by k itself
            if accelerator.sync_gradients:
                accelerator.unscale_gradients()       # fp16: plugins see the true gradients
                outcome = pipe.after_backward()       # the clipping plugin clips here
                step_optimizer(optimizer, outcome)
                pipe.consolidate()
                optimizer.zero_grad()

The Hugging Face ``Trainer`` adapter steps its optimizer through :func:`step_optimizer` too.
"""

from __future__ import annotations

import torch
from accelerate.optimizer import AcceleratedOptimizer

import steadytrain


def step_optimizer(
    optimizer: AcceleratedOptimizer | torch.optim.Optimizer, outcome: steadytrain.StepOutcome
) -> None:
    """Step *optimizer* (as ``accelerator.prepare`` returned it) unless *outcome* says skip.

    Without a gradient scaler the wrapped torch optimizer is stepped by
    :func:`steadytrain.step_optimizer`: a fused Adam, AdamW, SGD or Adagrad takes the
    decision on the device as ``found_inf``, any other optimizer reads it once. Under fp16
    with a ``GradScaler`` the decision is read on the host (the scaler reads its own
    overflow flag on the host as well): a step to keep goes through Accelerate's own
    ``optimizer.step()``, a skipped one only lets the scaler update its scale. Call it
    where the loop would call ``optimizer.step()``, once the gradients are synchronized.
    """
    if not isinstance(optimizer, AcceleratedOptimizer):
        steadytrain.step_optimizer(optimizer, outcome)
        return
    scaler = optimizer.scaler
    if scaler is None:
        steadytrain.step_optimizer(optimizer.optimizer, outcome)
    elif outcome.skip:
        scaler.update()
    else:
        # The class's step, not the instance's: the Trainer adapter routes the instance's
        # step through this function.
        AcceleratedOptimizer.step(optimizer)
