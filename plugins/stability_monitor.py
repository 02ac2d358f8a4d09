"""Stability monitor: loss oscillation against its noise floor, gradient norm, gates, memory.

What it does
    Every optimizer step, records on the device: the oscillation ratio (max / min) and the
    sample variance of the task loss over the last ``window`` steps, the total gradient
    norm of the selected parameters, the mean entropy of the gate distributions in
    ``ctx.outputs[gates]``, the mean of ``ctx.outputs[mask]`` (the fraction of kept units)
    and the mean of ``ctx.outputs[memory]`` (a tensor, or a mapping such as
    ``{"stm": ..., "ltm": ...}`` logged per entry). Outputs that are absent in a step are
    not logged for that step. Nothing syncs the host in the step: the metrics are means
    over the log interval, read when the host asks ``pipe.metrics()``.

    Every ``check_every`` steps one small read (one host sync) looks at the loss window
    and the gradient norms since the previous check, and emits a structlog warning when
    either stands out from the noise:

    * ``stability.oscillation``: the window's oscillation ratio after removing its
      least-squares linear trend (so a loss that is simply falling does not count)
      exceeds the noise floor by more than ``tolerance`` times: ``r − 1 > tolerance ·
      (floor − 1)``. The floor is ``noise_floor`` when set: the same ratio for a frozen
      model on the same batches, which ``steadytrain run`` measures and reports.
      Without it, the floor is the median of the detrended ratios at the earlier checks
      (at least 3 of them: no warning before), i.e. the run's own typical batch noise.
    * ``stability.grad_norm``: the largest gradient norm since the last check exceeds
      ``grad_norm_tolerance`` times the median of the mean norms of the earlier checks
      (at least 3 of them).

    The advice in a warning fits the model: the memory-model document's remedies only
    when the model has memory (a module with ``consolidate()``, or gates in the outputs).

When to use it
    To see whether a run is stable, and to confirm that stability fixes work. The
    oscillation ratio alone mostly measures batch-to-batch noise: compare it with its
    noise floor (``steadytrain run`` reports both) before reading anything into it.

Hyperparameters
    ``window`` (10 steps, the document's oscillation window), ``check_every`` (100),
    ``noise_floor`` (unset: estimated from the run), ``tolerance`` (3; 0 = no
    oscillation warning), ``grad_norm_tolerance`` (10; 0 = no gradient-norm warning),
    ``norm_type`` (2.0), the output keys ``gates``, ``mask`` and ``memory``.

Source
    The memory-model stability document (seed 000), "Validation Metrics" (loss variance,
    gate entropy, gradient norm, memory utilization, sparsity) and "Expected Improvements"
    (oscillations from 4–5× down to below 1.2×). The noise floor: a frozen model scores
    1.12–1.27 on the batches where the document's memory model scored at most 1.42, so
    the ratio is compared with what the batch noise alone gives.

Caveats
    * The oscillation ratio assumes positive losses; non-finite losses are left out of
      the window (and of the trend).
    * The gradient norm is taken ``tryfirst``, before clipping plugins, so it shows the
      raw gradients; put a ``grad_norm`` instance last for the clipped ones. It comes from
      the norms the step's plugins share (``ctx.gradient_norms``), at no extra pass over
      the gradients when a guard or a clipping plugin takes them too.
    * The gate entropy is the entropy of each distribution over the last dimension,
      averaged (``torch.special.entr``), so that it can be compared with
      ``ln(number of choices)``; the document sums over the whole batch. The gates are
      not checked to sum to 1.
    * Warnings come at most every ``check_every`` steps and look at that moment's window
      and at the gradient norms since the previous check. The run's own floor assumes
      that most checks see a stable run; a run unstable from its start sets a high floor
      and warns late, if at all: pass ``noise_floor`` then.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from typing import Any

import attrs
import torch

import steadytrain
from steadytrain.nn import consolidating_modules
from steadytrain.validators import non_negative, norm_order, optional, positive_int

log = steadytrain.get_logger()

#: Earlier checks the run's own floors need before a warning.
FLOOR_CHECKS = 3

GENERIC_ADVICE = (
    "lower the learning rate or lengthen its warmup, skip outlier steps (guard), clip "
    "gradients (grad_clip), average the weights (ema); for Transformers, qk-layernorm and "
    "the z-loss (z_loss) widen the range of learning rates that train (Wortsman et al. 2023)"
)
MEMORY_ADVICE = (
    "the memory-model document's remedies: clip memory gradients tighter than the rest "
    "(0.5 vs 1.0), lower the memory learning rate (x0.1, weight decay 0.001), consolidate "
    "at fixed intervals, average the weights (EMA 0.999), smooth the gates (temperature, "
    "smoothness and entropy penalties)"
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


def detrended_oscillation(losses: Sequence[float]) -> float:
    """max / min of *losses* (in step order) after removing their least-squares line.

    The residuals are added back to the mean, so a loss that falls along a straight line
    scores 1 and the ratio keeps the scale of :func:`oscillation_ratio`. Non-finite
    entries are left out; fewer than 3 finite ones give NaN, a non-positive value inf.
    """
    points = [(t, y) for t, y in enumerate(losses) if math.isfinite(y)]
    if len(points) < 3:
        return math.nan
    steps, values = zip(*points, strict=True)
    slope, intercept = statistics.linear_regression(steps, values)
    mean = statistics.fmean(values)
    level = [mean + y - (intercept + slope * t) for t, y in points]
    low = min(level)
    return max(level) / low if low > 0 else math.inf


def mean_gate_entropy(gates: torch.Tensor | Sequence[torch.Tensor]) -> torch.Tensor:
    """Mean entropy (nats) of the distributions along the last dimension of *gates*.

    A list of gate tensors (one per layer) gives the mean of each one's mean entropy,
    i.e. every tensor weighs the same.
    """
    if isinstance(gates, torch.Tensor):
        probs = gates.detach()
        return torch.special.entr(probs.to(torch.promote_types(probs.dtype, torch.float32))) \
            .sum(-1).mean()
    return torch.stack([mean_gate_entropy(g) for g in gates]).mean()


def exceeds(value: float, floor: float, tolerance: float) -> bool:
    """Whether *value* − 1 is more than *tolerance* times *floor* − 1 (ratios ≥ 1)."""
    return value - 1 > tolerance * (floor - 1)


def _mean(value: torch.Tensor | Sequence[torch.Tensor]) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value.detach().float().mean()
    return torch.stack([_mean(v) for v in value]).mean()


def _tolerance(_inst: Any, attr: attrs.Attribute, value: Any) -> None:
    non_negative(_inst, attr, value)
    if 0 < value <= 1:
        raise steadytrain.OptionError(
            attr.name, f"must be 0 (no warning) or a factor > 1, got {value!r}"
        )


def _floor(_inst: Any, attr: attrs.Attribute, value: Any) -> None:
    non_negative(_inst, attr, value)
    if value < 1:
        raise steadytrain.OptionError(
            attr.name, f"must be an oscillation ratio (max / min, so >= 1), got {value!r}"
        )


class StabilityMonitor(steadytrain.Plugin):
    """Record loss oscillation and variance, gradient norm, gate entropy, sparsity, memory."""

    name = "stability_monitor"

    @attrs.frozen
    class Config:
        window: int = attrs.field(default=10, validator=positive_int)
        check_every: int = attrs.field(default=100, validator=positive_int)
        noise_floor: float | None = attrs.field(default=None, validator=optional(_floor))
        tolerance: float = attrs.field(default=3.0, validator=_tolerance)
        grad_norm_tolerance: float = attrs.field(default=10.0, validator=_tolerance)
        norm_type: float = attrs.field(default=2.0, validator=norm_order)
        gates: str = "gates"
        mask: str = "sparsity_mask"
        memory: str = "memory_utilization"

        def __attrs_post_init__(self) -> None:
            if self.window < 3:
                raise steadytrain.OptionError(
                    "window", f"must be at least 3 (a trend and a ratio need three "
                    f"losses), got {self.window}"
                )

    @steadytrain.hookimpl
    def setup(self, run: steadytrain.Run) -> None:
        named = run.named_parameters()
        names = set(self.filter.select([n for n, _ in named], kind="parameter")) if named else ()
        self.params = [p for n, p in named if n in names]
        self.device = self.params[0].device if self.params else torch.device("cpu")
        self.losses = torch.full((self.config.window,), torch.nan, device=self.device)
        # peak, sum and count of the gradient norms since the last check
        self.grad_stats = torch.zeros(3, device=self.device)
        self.steps = 0
        self.oscillations: list[float] = []
        self.grad_norms: list[float] = []
        self.has_memory = run.model is not None and bool(
            consolidating_modules(run.model))
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
        norm_type = self.config.norm_type
        norms = ctx.gradient_norms(self.params, norm_type=norm_type)  # shared with the step
        if norms:
            norm = steadytrain.grad_norms.total_norm(norms, norm_type).to(self.device)
            stats = self.grad_stats
            torch.maximum(stats[0], norm, out=stats[0])
            stats[1:] += torch.stack([norm, torch.ones_like(norm)])
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

    def _window(self) -> torch.Tensor:
        """The recorded losses, oldest first."""
        if self.steps < self.config.window:
            return self.losses[: max(self.steps, 1)]
        return self.losses.roll(-(self.steps % self.config.window))

    @steadytrain.hookimpl
    def consolidate(self, ctx: steadytrain.StepContext) -> None:
        if (ctx.step + 1) % self.config.check_every == 0:
            self.check(ctx.step)

    def check(self, step: int) -> dict[str, float]:
        """Read the loss window and the gradient norms (one host sync); warn if they stand out.

        Returns what was read: ``loss_oscillation`` (max / min of the window, NaN before
        two losses), ``detrended_oscillation``, the ``oscillation_floor`` it was compared
        with (NaN while there is none), and ``peak_grad_norm`` and ``mean_grad_norm``
        since the previous check (0 and NaN without gradients).
        """
        cfg = self.config
        read = torch.cat([self._window().to(self.device), self.grad_stats]).tolist()
        losses, (peak, total, count) = read[:-3], read[-3:]
        self.grad_stats.zero_()
        finite = [x for x in losses if math.isfinite(x)]
        ratio = max(finite) / min(finite) if len(finite) >= 2 else math.nan
        detrended = detrended_oscillation(losses)
        floor = self._oscillation_floor()
        advice = MEMORY_ADVICE if self._has_memory() else GENERIC_ADVICE
        if cfg.tolerance and math.isfinite(floor) and exceeds(detrended, floor, cfg.tolerance):
            log.warning("stability.oscillation", id=self.id, step=step,
                        ratio=round(detrended, 4), raw_ratio=round(ratio, 4),
                        floor=round(floor, 4), floor_from=self._floor_source(),
                        tolerance=cfg.tolerance, window=len(losses), advice=advice)
        mean = total / count if count else math.nan
        if cfg.grad_norm_tolerance and len(self.grad_norms) >= FLOOR_CHECKS:
            typical = statistics.median(self.grad_norms)
            if peak > cfg.grad_norm_tolerance * typical:
                log.warning("stability.grad_norm", id=self.id, step=step,
                            peak=round(peak, 4), typical=round(typical, 4),
                            tolerance=cfg.grad_norm_tolerance, advice=advice)
        if math.isfinite(detrended):
            self.oscillations.append(detrended)
        if math.isfinite(mean):
            self.grad_norms.append(mean)
        missing = [k for k in (cfg.gates, cfg.mask, cfg.memory) if k not in self.seen]
        if missing and not self.absent_reported:
            self.absent_reported = True
            log.info("stability.outputs_absent", id=self.id, keys=missing,
                     hint="these outputs never appeared; set gates/mask/memory to the names "
                          "the model reports, if it reports them")
        return {"loss_oscillation": ratio, "detrended_oscillation": detrended,
                "oscillation_floor": floor, "peak_grad_norm": peak, "mean_grad_norm": mean}

    def _oscillation_floor(self) -> float:
        if self.config.noise_floor is not None:
            return self.config.noise_floor
        if len(self.oscillations) < FLOOR_CHECKS:
            return math.nan
        return statistics.median(self.oscillations)

    def _floor_source(self) -> str:
        if self.config.noise_floor is not None:
            return "noise_floor"
        return f"median of {len(self.oscillations)} earlier checks"

    def _has_memory(self) -> bool:
        return self.has_memory or self.config.gates in self.seen

    def state_dict(self) -> dict[str, Any]:
        return {"losses": self.losses.clone(), "grad_stats": self.grad_stats.clone(),
                "steps": self.steps, "oscillations": list(self.oscillations),
                "grad_norms": list(self.grad_norms)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.check_state(state, ("losses", "grad_stats", "steps", "oscillations",
                                 "grad_norms"))
        if state["losses"].shape != self.losses.shape:
            raise steadytrain.CheckpointError(
                f"{self.id}.window: the checkpoint holds {state['losses'].numel()} losses "
                f"but window = {self.config.window}; resume with the window it was saved with"
            )
        self.losses.copy_(state["losses"])
        self.grad_stats.copy_(state["grad_stats"])
        self.steps = int(state["steps"])
        self.oscillations = [float(x) for x in state["oscillations"]]
        self.grad_norms = [float(x) for x in state["grad_norms"]]
