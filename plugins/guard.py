"""Non-finite and loss-spike guard: skip bad optimizer steps, decided on the device.

What it does
    After the backward of every optimizer step, asks the host not to step the optimizer
    when the task loss or a selected gradient is not finite, or when the loss exceeds
    ``spike_factor`` times the mean of the last ``window`` recorded losses. The decision
    is a boolean tensor on the device (``ctx.request_skip(..., when=tensor)``): the hook
    itself never syncs the host. Skips are counted by cause on the device; every
    ``check_every`` steps one small read (one host sync) looks at the longest run of
    consecutive skips, restores an in-memory snapshot of the model and optimizer state
    after ``restore_after`` of them when asked to, and raises after
    ``max_consecutive_skips`` rather than skipping forever.

    :func:`guarded_step` steps an optimizer under the decision. Fused optimizers (Adam,
    AdamW, SGD, Adagrad with ``fused=True``) take the flag on the device the way
    :class:`torch.amp.GradScaler` drives them (``optimizer.found_inf``), so a loop using it
    needs no host sync for the decision; any other optimizer costs one sync.

When to use it
    Long runs where one bad batch (a NaN from an overflow, an outlier loss) must not wreck
    the weights or the optimizer's moments, and where a run that keeps failing should stop
    with a clear error instead of burning compute.

Hyperparameters
    ``spike_factor`` k (default 4; 3–5 is the usual range; 0 turns the spike rule off),
    ``window`` N (default 10 losses), ``max_consecutive_skips`` (10), ``check_every``
    (10 steps between host reads of the counters), ``snapshot_every`` M (0: no snapshot),
    ``restore_after`` (0: never restore), ``snapshot_device`` (``"same"`` or ``"cpu"``),
    ``check_loss`` / ``check_grads`` (both on).

Source
    The memory-model stability document (seed 000) and its issue: skip the step on
    non-finite values or when the loss exceeds k× the mean of the last N losses (k 3–5,
    N 10). Skipping on non-finite gradients is what ``torch.amp.GradScaler`` does.

Caveats
    * Order: ``after_backward`` runs ``tryfirst`` so the guard sees the gradients before
      a clipping plugin rescales them (clipping by an infinite norm turns an inf into
      zeros or NaNs and hides which it was). Every skip request is OR-ed by the core, so
      the order does not change the decision, only what the guard sees.
    * The spike rule needs a full history (N finite losses) before it applies, and
      assumes positive losses (cross-entropy and the like). A loss above the limit is
      recorded as the limit (winsorized): one outlier cannot inflate the mean, and a
      lasting change of the loss level is accepted after a few skipped steps instead of
      being skipped forever. Non-finite losses are never recorded.
    * With gradient accumulation the loss is the mean of the micro-batches' task losses.
    * The consecutive-skip limit and the restore act at the next check, up to
      ``check_every - 1`` steps late. The skip itself is never late.
    * The snapshot is kept in memory only and is not part of the checkpoint: after a
      resume the first restore point is the first snapshot taken after it. A snapshot is
      taken only after a step that was not skipped.
    * :func:`guarded_step`: the first step of a fresh optimizer costs one host sync (a
      fused SGD with momentum would otherwise start from an uninitialized buffer when that
      step is skipped). It cannot be combined with ``torch.amp.GradScaler``, which sets
      ``found_inf`` itself (and skips non-finite gradients on its own). Learning-rate
      schedulers still advance on a skipped step, as they do under ``GradScaler``.
    * The decision reaches the host only when something reads it: ``outcome.skip`` in
      the host's loop, or a ``consolidate`` plugin reading ``ctx.skipped`` (one sync per
      step then). With :func:`guarded_step` and plugins that use ``ctx.skip_flag``, the
      guard costs one sync every ``check_every`` steps; ``benchmarks/bench_guard.py``
      counts them.
    * Gradients are checked through their float32 2-norms: a finite gradient whose norm
      overflows float32 (elements around 1e19) counts as non-finite too.
    * Under FSDP each rank checks its own gradient shards; the flag is not all-reduced.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import attrs
import structlog
import torch

import steadytrain
from steadytrain.validators import non_negative_int, one_of, positive_int

log = structlog.get_logger("steadytrain")

#: Order of the skip counters kept on the device (and of ``state_dict()["counters"]``).
CAUSES = ("skipped", "nonfinite_loss", "nonfinite_grads", "spike")


def nonfinite_grads(grads: Sequence[torch.Tensor]) -> torch.Tensor:
    """A boolean scalar tensor: whether any element of *grads* is NaN or infinite.

    One fused 2-norm per tensor (``torch._foreach_norm``), accumulated and returned in
    float32 so that half-precision gradients do not overflow: a NaN or inf element makes
    its norm non-finite. The 2-norm is several times faster than a max-abs reduction on
    the CPU; the price is that a finite gradient whose 2-norm exceeds the float32 range
    (elements around 1e19) also counts as non-finite.
    """
    if not grads:
        return torch.zeros((), dtype=torch.bool)
    norms = torch._foreach_norm(list(grads), 2, dtype=torch.float32)
    return ~torch.isfinite(torch.stack(norms)).all()


def spike_check(
    loss: torch.Tensor, history: torch.Tensor, filled: torch.Tensor, factor: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Whether *loss* is a spike against *history*, and the value to record for it.

    A spike is a finite loss above ``factor`` × the mean of *history*, once *filled* (a
    boolean tensor) says the history is full. The value to record is the loss, capped at
    that limit while the history is full, so that one outlier cannot inflate the mean.
    """
    limit = history.mean() * factor
    spike = filled & torch.isfinite(loss) & (loss > limit)
    record = torch.where(filled, torch.minimum(loss, limit), loss)
    return spike, record


def guarded_step(
    optimizer: torch.optim.Optimizer, skip: steadytrain.StepOutcome | torch.Tensor | bool
) -> None:
    """Step *optimizer* unless *skip* holds, without a host sync where the optimizer allows.

    *skip* is what ``pipe.after_backward()`` returned, or its ``flag``. A Python bool
    steps or not. A tensor is handed to an optimizer that supports it
    (``_step_supports_amp_scaling``: the fused Adam, AdamW, SGD and Adagrad) as
    ``found_inf``, so the optimizer leaves parameters, moments and its step count as they
    were when the flag is set, on the device. Any other optimizer, and the first step of
    a fused one, read the flag on the host (one sync).
    """
    flag = skip.flag if isinstance(skip, steadytrain.StepOutcome) else skip
    if not isinstance(flag, torch.Tensor):
        if not flag:
            optimizer.step()
        return
    if hasattr(optimizer, "found_inf"):
        raise RuntimeError(
            "guarded_step: the optimizer already has a found_inf set (a torch.amp.GradScaler "
            "is driving it); with GradScaler, read outcome.skip and call scaler.step() yourself"
        )
    if getattr(optimizer, "_step_supports_amp_scaling", False) and optimizer.state:
        optimizer.found_inf = flag.detach().reshape(()).to(torch.float32)  # type: ignore[attr-defined]
        try:
            optimizer.step()
        finally:
            del optimizer.found_inf  # type: ignore[attr-defined]
    elif not bool(flag):
        optimizer.step()


def _spike_factor(_inst: Any, attr: attrs.Attribute, value: Any) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and (
        value == 0 or (math.isfinite(value) and value > 1)
    )
    if not ok:
        raise steadytrain.OptionError(
            attr.name, f"must be 0 (off) or a number > 1 (3 to 5 is usual), got {value!r}"
        )


class _Snapshot:
    """Copies of the model's parameters and buffers and the optimizers' state tensors."""

    def __init__(self, device: str) -> None:
        self.device = device
        self.model: list[torch.Tensor] = []
        self.optim: list[dict[Any, dict[str, Any]]] = []

    def _copy(self, tensor: torch.Tensor) -> torch.Tensor:
        target = tensor.device if self.device == "same" else torch.device("cpu")
        return tensor.detach().to(target, copy=True)

    @torch.no_grad()
    def take(self, live: list[torch.Tensor], optimizers: Sequence[torch.optim.Optimizer]) -> None:
        if self.model:
            torch._foreach_copy_(self.model, live)
        else:
            self.model = [self._copy(t) for t in live]
        # Optimizer state appears lazily (first step, newly trained parameters), so it is
        # copied afresh rather than into buffers whose layout may no longer fit.
        self.optim = [
            {
                param: {k: self._copy(v) if isinstance(v, torch.Tensor) else v
                        for k, v in state.items()}
                for param, state in opt.state.items()
            }
            for opt in optimizers
        ]

    @torch.no_grad()
    def restore(
        self, live: list[torch.Tensor], optimizers: Sequence[torch.optim.Optimizer]
    ) -> None:
        torch._foreach_copy_(live, self.model)
        for opt, saved in zip(optimizers, self.optim, strict=True):
            for param in [p for p in opt.state if p not in saved]:
                del opt.state[param]
            for param, state in saved.items():
                current = opt.state[param]
                for key, value in state.items():
                    if isinstance(value, torch.Tensor) and isinstance(current.get(key),
                                                                      torch.Tensor):
                        current[key].copy_(value)
                    else:
                        current[key] = value


class Guard(steadytrain.Plugin):
    """Skip the optimizer step on non-finite loss or gradients, or on a loss spike."""

    name = "guard"

    @attrs.frozen
    class Config:
        check_loss: bool = True
        check_grads: bool = True
        spike_factor: float = attrs.field(default=4.0, validator=_spike_factor)
        window: int = attrs.field(default=10, validator=positive_int)
        max_consecutive_skips: int = attrs.field(default=10, validator=positive_int)
        check_every: int = attrs.field(default=10, validator=positive_int)
        snapshot_every: int = attrs.field(default=0, validator=non_negative_int)
        restore_after: int = attrs.field(default=0, validator=non_negative_int)
        snapshot_device: str = attrs.field(default="same", validator=one_of("same", "cpu"))

        def __attrs_post_init__(self) -> None:
            if self.restore_after and not self.snapshot_every:
                raise steadytrain.OptionError(
                    "restore_after", "needs snapshot_every > 0 (nothing to restore without "
                    "snapshots); set snapshot_every or restore_after = 0"
                )
            if self.restore_after >= self.max_consecutive_skips:
                raise steadytrain.OptionError(
                    "restore_after",
                    f"must be below max_consecutive_skips ({self.max_consecutive_skips}), "
                    f"got {self.restore_after}: the run would stop before restoring",
                )

    @property
    def needs_loss(self) -> bool:
        return self.config.check_loss or self.config.spike_factor > 0

    @steadytrain.hookimpl
    def setup(self, run: steadytrain.Run) -> None:
        if self.config.snapshot_every and run.model is None:
            raise steadytrain.ConfigError(
                f"{self.id}.snapshot_every: snapshots need the model; pass it to "
                "pipe.setup(model, optimizer) or set snapshot_every = 0"
            )
        named = run.named_parameters()
        # Without a model only the loss is guarded; with one, a typo in the patterns is
        # an error rather than a silently unguarded gradient.
        names = set(self.filter.select([n for n, _ in named], kind="parameter")) if named else ()
        self.params = [p for n, p in named if n in names]
        self.device = self.params[0].device if self.params else torch.device("cpu")
        self.history = torch.zeros(self.config.window, device=self.device)
        self.positions = torch.arange(self.config.window, device=self.device)
        self.count = torch.zeros((), dtype=torch.int64, device=self.device)
        self.counters = torch.zeros(len(CAUSES), dtype=torch.int64, device=self.device)
        self.run_length = torch.zeros((), dtype=torch.int64, device=self.device)
        self.longest = torch.zeros((), dtype=torch.int64, device=self.device)
        self._false = torch.zeros((), dtype=torch.bool, device=self.device)
        self.reported_skips = 0
        self.restored = False
        self._loss: torch.Tensor | None = None
        self._optimizers = run.optimizers
        self._snapshot: _Snapshot | None = None
        if self.config.snapshot_every:
            self._live = list(run.model.state_dict(keep_vars=True).values())
            self._snapshot = _Snapshot(self.config.snapshot_device)

    @steadytrain.hookimpl
    def compute_regularizers(self, ctx: steadytrain.StepContext) -> None:
        if ctx.task_loss is None:
            if self.needs_loss:
                raise steadytrain.ConfigError(
                    f"{self.id}: no task loss this step; pass it to pipe.compute_loss(loss), "
                    "or set check_loss = false and spike_factor = 0 to guard gradients only"
                )
            return
        loss = ctx.task_loss.detach().to(self.device, torch.float32)
        self._loss = loss if ctx.micro_batch == 0 else self._loss + loss

    @steadytrain.hookimpl(tryfirst=True)
    def after_backward(self, ctx: steadytrain.StepContext) -> None:
        cfg = self.config
        grads_bad = loss_bad = spike = self._false
        grads = [p.grad for p in self.params if p.grad is not None] if cfg.check_grads else []
        if grads:
            grads_bad = nonfinite_grads(grads).to(self.device)
        if self.needs_loss:
            if self._loss is None:
                raise RuntimeError(
                    f"{self.id}: after_backward() without compute_loss(): call "
                    "pipe.compute_loss(loss) for every micro-batch"
                )
            loss = self._loss / ctx.num_micro_batches
            self._loss = None
            finite = torch.isfinite(loss)
            if cfg.check_loss:
                loss_bad = ~finite
            if cfg.spike_factor:
                filled = self.count >= cfg.window
                spike, loss = spike_check(loss, self.history, filled, cfg.spike_factor)
            slot = (self.positions == self.count % cfg.window) & finite
            self.history.copy_(torch.where(slot, loss, self.history))
            self.count.add_(finite.to(torch.int64))
        skip = loss_bad | grads_bad | spike
        causes = torch.stack([skip, loss_bad, grads_bad, spike])
        self.counters.add_(causes.to(torch.int64))
        self.run_length.add_(1).mul_(skip.to(torch.int64))
        torch.maximum(self.longest, self.run_length, out=self.longest)
        for name, flag in zip(CAUSES, causes.to(torch.float32).unbind(), strict=True):
            ctx.log(name, flag)
        ctx.request_skip("non-finite loss or gradients, or a loss spike", when=skip)

    @steadytrain.hookimpl
    def consolidate(self, ctx: steadytrain.StepContext) -> None:
        done = ctx.step + 1
        every = self.config.snapshot_every
        # ctx.skipped is only read on snapshot steps: at most one sync per snapshot.
        if self._snapshot is not None and done % every == 0 and not ctx.skipped:
            self._snapshot.take(self._live, self._optimizers)
        if done % self.config.check_every == 0:
            self.check(ctx.step)

    def check(self, step: int) -> None:
        """Read the skip counters (one host sync); log, restore or raise as configured."""
        run_length, longest, *counts = torch.cat(
            [self.run_length.reshape(1), self.longest.reshape(1), self.counters]
        ).tolist()
        self.longest.copy_(self.run_length)
        by_cause = dict(zip(CAUSES, counts, strict=True))
        if by_cause["skipped"] > self.reported_skips:
            log.warning("guard.skipped", id=self.id, step=step,
                        new=by_cause["skipped"] - self.reported_skips, consecutive=run_length,
                        **{f"total_{k}": v for k, v in by_cause.items()})
            self.reported_skips = by_cause["skipped"]
        limit = self.config.max_consecutive_skips
        if longest >= limit:
            raise RuntimeError(
                f"{self.id}: {longest} optimizer steps in a row were skipped "
                f"(max_consecutive_skips = {limit}); causes so far: "
                + ", ".join(f"{k} {v}" for k, v in by_cause.items() if k != "skipped")
                + ". Lower the learning rate, check the data near this step, or resume "
                "from an earlier checkpoint"
            )
        if run_length == 0:
            self.restored = False
        elif (
            self.config.restore_after and run_length >= self.config.restore_after
            and not self.restored
        ):
            self.restore(step)

    def restore(self, step: int) -> None:
        """Copy the last snapshot back into the model and the optimizers' state."""
        self.restored = True
        if self._snapshot is None or not self._snapshot.model:
            log.warning("guard.no_snapshot", id=self.id, step=step)
            return
        self._snapshot.restore(self._live, self._optimizers)
        log.warning("guard.restored", id=self.id, step=step)

    def state_dict(self) -> dict[str, Any]:
        return {
            "history": self.history.clone(),
            "count": self.count.clone(),
            "counters": self.counters.clone(),
            "run_length": self.run_length.clone(),
            "longest": self.longest.clone(),
            "reported_skips": self.reported_skips,
            "restored": self.restored,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.check_state(state, self.state_dict())
        if state["history"].shape != self.history.shape:
            raise steadytrain.CheckpointError(
                f"{self.id}.window: the checkpoint holds {state['history'].numel()} losses "
                f"but window = {self.config.window}; resume with the window it was saved with"
            )
        for name in ("history", "count", "counters", "run_length", "longest"):
            getattr(self, name).copy_(state[name])
        self.reported_skips = int(state["reported_skips"])
        self.restored = bool(state["restored"])
