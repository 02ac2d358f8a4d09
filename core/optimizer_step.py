"""Stepping the host's optimizer under the pipeline's skip decision, without a host sync.

The pipeline never steps an optimizer: the host calls :func:`step_optimizer` where it
would call ``optimizer.step()``, as it calls ``scaler.step(optimizer)`` under mixed
precision. The decision stays on the device where the optimizer allows it, the way
:class:`torch.amp.GradScaler` drives the fused optimizers.
"""

from __future__ import annotations

from typing import Any

import torch

from .context import StepOutcome
from .errors import UsageError


def _grad_scaler_state(scaler: Any, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    state = scaler._per_optimizer_states[id(optimizer)]
    if state["stage"].name != "UNSCALED":
        raise UsageError(
            "step_optimizer(scaler=...): call scaler.unscale_(optimizer) before "
            "pipe.after_backward(), so that the plugins see the true gradients and the "
            "scaler's own overflow check is in place"
        )
    return state


def step_optimizer(
    optimizer: torch.optim.Optimizer,
    outcome: StepOutcome | torch.Tensor | bool,
    *,
    scaler: torch.amp.GradScaler | None = None,
) -> None:
    """Step *optimizer* unless the pipeline decided to skip this step.

    *outcome* is what ``pipe.after_backward()`` returned (or its ``flag``, or a bool).

    * No skip request this step, or a decision already read on the host: the optimizer
      steps or not, and nothing is synced.
    * A decision on the device and an optimizer that takes ``found_inf`` (the fused Adam,
      AdamW, SGD and Adagrad: ``fused=True``): the flag is handed over as ``found_inf``,
      so a skipped step leaves parameters, moments and the step count as they were,
      without a host sync. The first step of a fresh optimizer reads the flag once (a
      fused SGD with momentum would start from an uninitialized buffer otherwise).
    * Any other optimizer: the flag is read on the host (one sync per step).
    * With *scaler* (a :class:`torch.amp.GradScaler`; call ``scaler.unscale_(optimizer)``
      before ``pipe.after_backward()``): the decision is added to the scaler's overflow
      check and ``scaler.step(optimizer)`` steps. A skipped step therefore also makes
      ``scaler.update()`` back off the scale, as an overflow does. This uses the
      scaler's per-optimizer record of found infs (``_per_optimizer_states``).

    Learning-rate schedulers still advance on a skipped step, as they do under GradScaler.
    """
    flag = outcome.flag if isinstance(outcome, StepOutcome) else outcome
    if isinstance(outcome, StepOutcome) and outcome.decided:
        flag = outcome.skip
    if scaler is not None:
        state = _grad_scaler_state(scaler, optimizer)
        for found_inf in state["found_inf_per_device"].values():
            if isinstance(flag, torch.Tensor):
                torch.maximum(found_inf, flag.to(found_inf), out=found_inf)
            elif flag:
                # A fill, not a tensor made from the bool: that would be a copy from
                # pageable host memory, which waits for the device.
                found_inf.fill_(1.0)
        scaler.step(optimizer)
        return
    if not isinstance(flag, torch.Tensor):
        if not flag:
            optimizer.step()
        return
    if hasattr(optimizer, "found_inf"):
        raise UsageError(
            "step_optimizer: the optimizer already has a found_inf set (a "
            "torch.amp.GradScaler is driving it); pass the scaler: "
            "step_optimizer(optimizer, outcome, scaler=scaler)"
        )
    if getattr(optimizer, "_step_supports_amp_scaling", False) and optimizer.state:
        optimizer.found_inf = flag.detach().reshape(()).to(torch.float32)  # type: ignore[attr-defined]
        try:
            optimizer.step()
        finally:
            del optimizer.found_inf  # type: ignore[attr-defined]
    elif not bool(flag):
        optimizer.step()
