"""Stability monitor: loss oscillation, loss variance, gradient norm, gates, sparsity, memory.

What it does
    Every optimizer step, records on the device: the oscillation ratio (max / min) and the
    sample variance of the task loss over the last ``window`` steps, the total gradient
    norm of the selected parameters, the mean entropy of the gate distributions in
    ``ctx.outputs[gates]``, the mean of ``ctx.outputs[mask]`` (the fraction of kept units)
    and the mean of ``ctx.outputs[memory]`` (a tensor, or a mapping such as
    ``{"stm": ..., "ltm": ...}`` logged per entry). Outputs that are absent in a step are
    not logged for that step. Nothing syncs the host in the step: the metrics are means
    over the log interval, read when the host asks ``pipe.metrics()``.

    Every ``check_every`` steps one small read (one host sync) compares the current
    oscillation ratio and the largest gradient norm since the last check with their
    thresholds and emits a structlog warning with the document's advice when one is
    crossed.

When to use it
    To see whether a run is stable, and to confirm that stability fixes work: the
    document's goal is a loss oscillation below 1.2× where it was 4–5×.

Hyperparameters
    ``window`` (100 steps), ``oscillation_threshold`` (2.0; 0 = no warning),
    ``grad_norm_threshold`` (10.0, ten times the document's clipping norm 1.0; 0 = no
    warning), ``check_every`` (100), ``norm_type`` (2.0), the output keys ``gates``,
    ``mask`` and ``memory``.

Source
    The memory-model stability document (seed 000), "Validation Metrics" (loss variance,
    gate entropy, gradient norm, memory utilization, sparsity) and "Expected Improvements"
    (oscillations from 4–5× down to below 1.2×).

Caveats
    * The oscillation ratio assumes positive losses; non-finite losses are left out of
      the window. Early in training a falling loss alone gives ratios above 1.2, hence
      the default threshold of 2.
    * The gradient norm is taken ``tryfirst``, before clipping plugins, so it shows the
      raw gradients; put a ``grad_norm`` instance last for the clipped ones.
    * The document's gate entropy sums over the whole batch; here it is the entropy of
      each distribution over the last dimension, averaged, so that it can be compared
      with ``ln(number of choices)``. The gates are not checked to sum to 1.
    * Warnings come at most every ``check_every`` steps and look at that moment's window
      and at the gradient norms since the previous check.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import attrs
import structlog
import torch

import steadytrain
from steadytrain.validators import non_negative, norm_order, positive_int

log = structlog.get_logger("steadytrain")

OSCILLATION_ADVICE = (
    "the memory-model document's remedies: clip memory gradients tighter than the rest "
    "(0.5 vs 1.0), lower the memory learning rate (x0.1, weight decay 0.001), consolidate "
    "at fixed intervals, average the weights (EMA 0.999), smooth the gates (temperature, "
    "smoothness and entropy penalties)"
)
GRAD_NORM_ADVICE = (
    "clip gradients per group (the document uses 0.5 for memory parameters, 1.0 for the "
    "rest), add a non-finite/spike guard, and look for a loss spike at the same step"
)


def oscillation_ratio(losses: torch.Tensor) -> torch.Tensor:
    """max / min of the finite entries of *losses* (NaN marks an empty slot)."""
    finite = torch.isfinite(losses)
    high = torch.where(finite, losses, -torch.inf).amax()
    low = torch.where(finite, losses, torch.inf).amin()
    return high / low


def loss_variance(losses: torch.Tensor) -> torch.Tensor:
    """Sample variance (divided by n − 1) of the finite entries of *losses*."""
    finite = torch.isfinite(losses)
    count = finite.sum()
    mean = torch.where(finite, losses, 0.0).sum() / count
    return torch.where(finite, (losses - mean) ** 2, 0.0).sum() / (count - 1)


def mean_gate_entropy(gates: torch.Tensor | Sequence[torch.Tensor]) -> torch.Tensor:
    """Mean entropy (nats) of the distributions along the last dimension of *gates*.

    A list of gate tensors (one per layer) gives the mean over the tensors of each one's
    the ``gate_entropy`` plugin's entropy, i.e. every tensor weighs the
    same.
    """
    if isinstance(gates, torch.Tensor):
        return _entropy(gates.detach())
    return torch.stack([_entropy(g.detach()) for g in gates]).mean()


def _entropy(gates: torch.Tensor) -> torch.Tensor:
    # torch.special.entr is -p·log p, with 0·log 0 = 0
    return torch.special.entr(gates.float()).sum(-1).mean()


def _mean(value: torch.Tensor | Sequence[torch.Tensor]) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value.detach().float().mean()
    return torch.stack([_mean(v) for v in value]).mean()


class StabilityMonitor(steadytrain.Plugin):
    """Record loss oscillation and variance, gradient norm, gate entropy, sparsity, memory."""

    name = "stability_monitor"

    @attrs.frozen
    class Config:
        window: int = attrs.field(default=100, validator=positive_int)
        oscillation_threshold: float = attrs.field(default=2.0, validator=non_negative)
        grad_norm_threshold: float = attrs.field(default=10.0, validator=non_negative)
        check_every: int = attrs.field(default=100, validator=positive_int)
        norm_type: float = attrs.field(default=2.0, validator=norm_order)
        gates: str = "gates"
        mask: str = "sparsity_mask"
        memory: str = "memory_utilization"

        def __attrs_post_init__(self) -> None:
            if self.window < 2:
                raise steadytrain.OptionError(
                    "window", f"must be at least 2 (a ratio and a variance need two "
                    f"losses), got {self.window}"
                )

    @steadytrain.hookimpl
    def setup(self, run: steadytrain.Run) -> None:
        named = run.named_parameters()
        names = set(self.filter.select([n for n, _ in named], kind="parameter")) if named else ()
        self.params = [p for n, p in named if n in names]
        self.device = self.params[0].device if self.params else torch.device("cpu")
        self.losses = torch.full((self.config.window,), torch.nan, device=self.device)
        self.peak_grad_norm = torch.zeros((), device=self.device)
        self.steps = 0
        self.seen: set[str] = set()
        self.absent_reported = False
        self._loss: torch.Tensor | None = None

    @steadytrain.hookimpl
    def compute_regularizers(self, ctx: steadytrain.StepContext) -> None:
        if ctx.task_loss is not None:
            loss = ctx.task_loss.detach().to(self.device, torch.float32)
            self._loss = loss if ctx.micro_batch == 0 or self._loss is None else self._loss + loss
        outputs = ctx.outputs
        cfg = self.config
        if cfg.gates in outputs:
            ctx.log("gate_entropy", mean_gate_entropy(outputs[cfg.gates]))
        if cfg.mask in outputs:
            ctx.log("sparsity", _mean(outputs[cfg.mask]))
        memory = outputs.get(cfg.memory)
        if isinstance(memory, Mapping):
            for part, value in memory.items():
                ctx.log(f"memory_utilization/{part}", _mean(value))
        elif memory is not None:
            ctx.log("memory_utilization", _mean(memory))
        self.seen.update(k for k in (cfg.gates, cfg.mask, cfg.memory) if k in outputs)

    @steadytrain.hookimpl(tryfirst=True)
    def after_backward(self, ctx: steadytrain.StepContext) -> None:
        grads = [p.grad for p in self.params if p.grad is not None]
        if grads:
            norm = torch.nn.utils.get_total_norm(grads, self.config.norm_type, foreach=True)
            torch.maximum(self.peak_grad_norm, norm.to(self.device), out=self.peak_grad_norm)
            ctx.log("grad_norm", norm)
        if self._loss is not None:
            slot = self.steps % self.config.window
            # A non-finite loss stays NaN in the window: the statistics leave it out.
            loss = self._loss / ctx.num_micro_batches
            self.losses[slot] = torch.where(torch.isfinite(loss), loss, torch.nan)
            self._loss = None
            self.steps += 1
            if self.steps >= 2:
                window = self.losses[: self.steps] if self.steps < self.config.window else \
                    self.losses
                ctx.log("loss_oscillation", oscillation_ratio(window))
                ctx.log("loss_variance", loss_variance(window))

    @steadytrain.hookimpl
    def consolidate(self, ctx: steadytrain.StepContext) -> None:
        if (ctx.step + 1) % self.config.check_every == 0:
            self.check(ctx.step)

    def check(self, step: int) -> dict[str, float]:
        """Read the oscillation ratio and peak gradient norm (one host sync); warn if high.

        Returns the values read: ``loss_oscillation`` (NaN before two losses) and
        ``peak_grad_norm`` since the previous check.
        """
        cfg = self.config
        window = self.losses[: max(self.steps, 1)] if self.steps < cfg.window else self.losses
        ratio, peak = torch.stack([oscillation_ratio(window).to(self.device),
                                   self.peak_grad_norm]).tolist()
        self.peak_grad_norm.zero_()
        if self.steps < 2:
            ratio = float("nan")
        if cfg.oscillation_threshold and ratio > cfg.oscillation_threshold:
            log.warning("stability.oscillation", id=self.id, step=step,
                        ratio=round(ratio, 3), threshold=cfg.oscillation_threshold,
                        window=min(self.steps, cfg.window), advice=OSCILLATION_ADVICE)
        if cfg.grad_norm_threshold and peak > cfg.grad_norm_threshold:
            log.warning("stability.grad_norm", id=self.id, step=step,
                        peak=round(peak, 4), threshold=cfg.grad_norm_threshold,
                        advice=GRAD_NORM_ADVICE)
        missing = [k for k in (cfg.gates, cfg.mask, cfg.memory) if k not in self.seen]
        if missing and not self.absent_reported:
            self.absent_reported = True
            log.info("stability.outputs_absent", id=self.id, keys=missing,
                     hint="these outputs never appeared; set gates/mask/memory to the names "
                          "the model reports, if it reports them")
        return {"loss_oscillation": ratio, "peak_grad_norm": peak}

    def state_dict(self) -> dict[str, Any]:
        return {"losses": self.losses.clone(), "peak_grad_norm": self.peak_grad_norm.clone(),
                "steps": self.steps}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.check_state(state, ("losses", "peak_grad_norm", "steps"))
        if state["losses"].shape != self.losses.shape:
            raise steadytrain.CheckpointError(
                f"{self.id}.window: the checkpoint holds {state['losses'].numel()} losses "
                f"but window = {self.config.window}; resume with the window it was saved with"
            )
        self.losses.copy_(state["losses"])
        self.peak_grad_norm.copy_(state["peak_grad_norm"])
        self.steps = int(state["steps"])
