"""Non-finite and loss-spike guard: skip bad optimizer steps, decided on the device.

What it does
    After the backward of every optimizer step, asks the host not to step the optimizer
    when the task loss or a selected gradient is not finite, or when the loss exceeds
    ``spike_factor`` times the mean of the last ``window`` recorded losses. The decision
    is a boolean tensor on the device (``ctx.request_skip(..., when=tensor)``): the hook
    itself never syncs the host.

    A loss that stays high is a new level, not a spike: after ``rebaseline_after`` loss
    spikes in a row the guard resets its loss history to the latest loss and judges the
    following steps against that level, so a lasting shift of the loss costs a few
    skipped steps instead of the run. The structlog event ``guard.rebaselined`` says so.

    Skips are counted by cause on the device. Every ``check_every`` steps the guard reads
    these counters without making the host wait: on an accelerator it copies them to
    pinned host memory with ``non_blocking=True`` and reads them once a device event
    recorded after the copy reports it done (asked at each later step, never waited
    for); on the CPU it reads them at once.
    Reading them, it logs ``guard.skipped`` and ``guard.rebaselined`` for what happened
    since the last read (each event carries the instance ``id``, the ``step`` whose
    counters it reports, the number ``new`` since the last event, and totals), restores
    an in-memory snapshot of the model and optimizer state after ``restore_after``
    consecutive skipped steps when asked to, and stops the run with
    :class:`steadytrain.TrainingError` after ``max_consecutive_skips`` of them rather
    than skipping forever. Consecutive skips are counted on the step's decision (any
    plugin's request; under ``torch.distributed`` the decision all ranks share).

    The host steps with :func:`steadytrain.step_optimizer`: fused optimizers (Adam,
    AdamW, SGD, Adagrad with ``fused=True``) take the flag on the device the way
    :class:`torch.amp.GradScaler` drives them (``optimizer.found_inf``), so the loop needs
    no host sync for the decision; any other optimizer costs one sync.

When to use it
    Long runs where one bad batch (a NaN from an overflow, an outlier loss) must not wreck
    the weights or the optimizer's moments, and where a run that keeps failing should stop
    with a clear error instead of burning compute.

Hyperparameters
    ``check_loss`` / ``check_grads`` (both on) and ``spike_factor`` k (default 4; 0 turns
    the spike rule off) are the three checks; at least one must be on. ``window`` N
    (default 10 losses), ``rebaseline_after`` (default 3 spikes in a row; 0 never
    re-baselines, so a lasting rise of the loss is skipped until the winsorized history
    catches up with it or the run stops at ``max_consecutive_skips``),
    ``max_consecutive_skips`` (10), ``check_every`` (10 steps between reads of the
    counters), ``snapshot_every`` M (0: no snapshot), ``restore_after`` (0: never
    restore), ``snapshot_device`` (``"same"`` or ``"cpu"``).
    ``rebaseline_after`` and ``restore_after`` must be below ``max_consecutive_skips``.
    These defaults are this plugin's choices, not values taken from a source.

    ```toml
    [[plugins]]
    plugin = "guard"
    spike_factor = 4
    rebaseline_after = 3
    ```

Source
    Skipping the optimizer step on non-finite gradients is what
    :class:`torch.amp.GradScaler` does. Chowdhery et al. 2022 ("PaLM: Scaling Language
    Modeling with Pathways", section 5.1) handled loss spikes by restarting from a
    checkpoint about 100 steps before the spike and skipping 200–500 data batches; the
    spike rule here (k × the mean of the last N losses), its winsorized history and its
    re-baselining are this plugin's own, decided step by step instead of by a restart.
    The seed documents prescribe no guard; for NaN losses the convergence guide (seed
    002) advises a lower learning rate and stronger gradient clipping.

Caveats
    * Order: ``after_backward`` runs ``tryfirst`` so the guard sees the gradients before
      a clipping plugin rescales them (clipping by an infinite norm turns an inf into
      zeros or NaNs and hides which it was). Every skip request is OR-ed by the core, so
      the order does not change the decision, only what the guard sees.
    * The spike rule needs a full history (N finite losses) before it applies, and
      assumes positive losses (cross-entropy and the like). A loss above the limit is
      recorded as the limit (winsorized): one outlier cannot inflate the mean. A step
      that re-baselines is itself skipped (it is the last spike of the run); the next
      one is judged against k × its loss. Non-finite losses are never recorded, and a
      step whose loss is not a spike ends a run of spikes.
    * With gradient accumulation the loss is the mean of the micro-batches' task losses.
    * The consecutive-skip limit, the restore and the events act when the counters are
      read: up to ``check_every - 1`` steps after the skips on the CPU, and at least one
      step later on an accelerator. The skip and the re-baselining are never late.
    * The snapshot is kept in memory only and is not part of the checkpoint: after a
      resume the first restore point is the first snapshot taken after it. A snapshot is
      taken only after a step that was not skipped. A read of the counters still on its
      way is part of the checkpoint and completes after the resume.
    * :func:`steadytrain.step_optimizer`: the first step of a fresh optimizer costs one
      host sync (a fused SGD with momentum would otherwise start from an uninitialized
      buffer when that step is skipped). Under ``torch.amp.GradScaler`` pass
      ``scaler=``: the decision joins the scaler's overflow check. Learning-rate
      schedulers still advance on a skipped step, as they do under ``GradScaler``.
    * The decision reaches the host only when something reads it: ``outcome.skip`` in
      the host's loop, or a ``consolidate`` plugin reading ``ctx.skipped`` (one sync per
      step then). With :func:`steadytrain.step_optimizer` and plugins that use
      ``ctx.skip_flag``, the guard itself never makes the host wait on an accelerator;
      ``benchmarks/bench_guard.py`` counts the syncs.
    * Gradients are checked through their float32 2-norms, the ones the step's plugins
      share (``ctx.gradient_norms``): the guard adds no pass over the gradients of its
      own when a clipping plugin takes the same norms. A finite gradient whose norm
      overflows float32 (elements around 1e19) counts as non-finite too.
    * Under ``torch.distributed`` each rank checks the gradients it holds (under FSDP2,
      through the norms of the whole sharded gradients, which every rank shares); the
      core all-reduces the decision, so every rank skips the same steps. The spike rule
      judges ``ctx.step_loss``, which the core makes the global batch's loss.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import attrs
import torch

import steadytrain
from steadytrain.validators import boolean, non_negative_int, one_of, positive_int

log = steadytrain.get_logger()

#: Order of the skip counters kept on the device (and of ``state_dict()["counters"]``).
CAUSES = ("skipped", "nonfinite_loss", "nonfinite_grads", "spike")


def any_nonfinite(norms: Sequence[torch.Tensor]) -> torch.Tensor:
    """A boolean scalar tensor: whether any of the gradient *norms* is NaN or infinite."""
    if not norms:
        return torch.zeros((), dtype=torch.bool)
    return ~torch.isfinite(torch.stack(list(norms))).all()


def nonfinite_grads(grads: Sequence[torch.Tensor]) -> torch.Tensor:
    """A boolean scalar tensor: whether any element of *grads* is NaN or infinite.

    Checked through the float32 2-norm of each gradient (one fused kernel,
    :func:`steadytrain.grad_norms.tensor_norms`): a NaN or inf element makes its norm
    non-finite. The 2-norm is several times faster than a max-abs reduction on the CPU;
    the price is that a finite gradient whose 2-norm exceeds the float32 range (elements
    around 1e19) also counts as non-finite. A sharded gradient (a DTensor, under FSDP2)
    is checked whole, through the norm every rank shares.
    """
    return any_nonfinite(steadytrain.grad_norms.tensor_norms(list(grads)))


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


class _CounterRead:
    """The guard's counters of one step on their way to the host.

    On an accelerator the copy goes to pinned host memory without blocking, and a device
    event recorded after it tells when it has arrived: :meth:`arrived` asks the event and
    never waits. Counters on the CPU have arrived at once.
    """

    def __init__(self, counters: torch.Tensor, step: int) -> None:
        self.counters = counters
        self.step = step
        self._event: torch.Event | None = None
        self._host = counters
        if counters.device.type != "cpu":
            self._host = torch.empty(counters.shape, dtype=counters.dtype, pin_memory=True)
            self._host.copy_(counters, non_blocking=True)
            self._event = torch.Event(device=counters.device)
            self._event.record()

    def arrived(self) -> bool:
        return self._event is None or self._event.query()

    def values(self) -> list[int]:
        return self._host.tolist()


class Guard(steadytrain.Plugin):
    """Skip the optimizer step on non-finite loss or gradients, or on a loss spike."""

    name = "guard"
    #: The device tensors of its state, checkpointed as they are.
    _TENSORS = ("history", "count", "counters", "run_length", "longest", "spike_run",
                "rebaselines")

    @attrs.frozen
    class Config:
        check_loss: bool = attrs.field(default=True, validator=boolean)
        check_grads: bool = attrs.field(default=True, validator=boolean)
        spike_factor: float = attrs.field(default=4.0, validator=_spike_factor)
        window: int = attrs.field(default=10, validator=positive_int)
        rebaseline_after: int = attrs.field(default=3, validator=non_negative_int)
        max_consecutive_skips: int = attrs.field(default=10, validator=positive_int)
        check_every: int = attrs.field(default=10, validator=positive_int)
        snapshot_every: int = attrs.field(default=0, validator=non_negative_int)
        restore_after: int = attrs.field(default=0, validator=non_negative_int)
        snapshot_device: str = attrs.field(default="same", validator=one_of("same", "cpu"))

        def __attrs_post_init__(self) -> None:
            if not (self.check_loss or self.check_grads or self.spike_factor):
                raise steadytrain.OptionError(
                    "check_loss", "check_loss and check_grads are false and spike_factor is "
                    "0: every check is off and the guard would never skip a step; set "
                    "check_loss or check_grads to true, or spike_factor > 1 (4 is the "
                    "default), or remove the instance"
                )
            if self.restore_after and not self.snapshot_every:
                raise steadytrain.OptionError(
                    "restore_after", "needs snapshot_every > 0 (nothing to restore without "
                    "snapshots); set snapshot_every or restore_after = 0"
                )
            limit = self.max_consecutive_skips
            for option, action, applies in (
                ("restore_after", "restoring", True),
                ("rebaseline_after", "re-baselining", self.spike_factor > 0),
            ):
                value = getattr(self, option)
                if applies and value >= limit:
                    raise steadytrain.OptionError(
                        option,
                        f"must be below max_consecutive_skips ({limit}), got {value}: the "
                        f"run would stop before {action}; lower {option} (0 turns it off) "
                        "or raise max_consecutive_skips",
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
        if run.model is None and not self.needs_loss:
            raise steadytrain.ConfigError(
                f"{self.id}.check_grads: only the gradient check is on, and without a model "
                "there are no gradients to check; pass the model to pipe.setup(model, "
                "optimizer), or set check_loss = true or spike_factor > 1"
            )
        named = run.named_parameters()
        # Without a model only the loss is guarded; with one, a typo in the patterns is
        # an error rather than a silently unguarded gradient.
        names = set(self.filter.select([n for n, _ in named], kind="parameter")) if named else ()
        self.params = [p for n, p in named if n in names]
        self.device = self.params[0].device if self.params else torch.device("cpu")

        def counter() -> torch.Tensor:
            return torch.zeros((), dtype=torch.int64, device=self.device)

        self.history = torch.zeros(self.config.window, device=self.device)
        self.positions = torch.arange(self.config.window, device=self.device)
        self.count = counter()
        self.counters = torch.zeros(len(CAUSES), dtype=torch.int64, device=self.device)
        self.run_length, self.longest = counter(), counter()
        self.spike_run, self.rebaselines = counter(), counter()
        self._false = torch.zeros((), dtype=torch.bool, device=self.device)
        self.reported_skips = self.reported_rebaselines = 0
        self.restored = False
        self._read: _CounterRead | None = None
        self._optimizers = run.optimizers
        self._snapshot: _Snapshot | None = None
        if self.config.snapshot_every:
            self._live = list(run.model.state_dict(keep_vars=True).values())
            self._snapshot = _Snapshot(self.config.snapshot_device)

    def step_loss(self, ctx: steadytrain.StepContext) -> torch.Tensor:
        """The step's task loss (the core's ``ctx.step_loss``), float32 on the guard's device."""
        if ctx.step_loss is None:
            raise steadytrain.ConfigError(
                f"{self.id}: no task loss this step; pass it to pipe.compute_loss(loss), "
                "or set check_loss = false and spike_factor = 0 to guard gradients only"
            )
        return ctx.step_loss.to(self.device, torch.float32)

    # -- the decision -----------------------------------------------------------------

    @steadytrain.hookimpl(tryfirst=True)
    def after_backward(self, ctx: steadytrain.StepContext) -> None:
        cfg = self.config
        grads_bad = loss_bad = spike = self._false
        # The norms the step's other plugins (clipping, metrics) share: no pass of its own.
        norms = ctx.gradient_norms(self.params) if cfg.check_grads else []
        if norms:
            grads_bad = any_nonfinite(norms).to(self.device)
        if self.needs_loss:
            loss = self.step_loss(ctx)
            finite = torch.isfinite(loss)
            if cfg.check_loss:
                loss_bad = ~finite
            recorded = loss
            if cfg.spike_factor:
                filled = self.count >= cfg.window
                spike, recorded = spike_check(loss, self.history, filled, cfg.spike_factor)
            self._record(loss, recorded, finite, spike)
        skip = loss_bad | grads_bad | spike
        causes = torch.stack([skip, loss_bad, grads_bad, spike])
        self.counters.add_(causes.to(torch.int64))
        for name, flag in zip(CAUSES, causes.to(torch.float32).unbind(), strict=True):
            ctx.log(name, flag)
        ctx.request_skip("non-finite loss or gradients, or a loss spike", when=skip)

    def _record(
        self, loss: torch.Tensor, recorded: torch.Tensor, finite: torch.Tensor,
        spike: torch.Tensor,
    ) -> None:
        """Put *recorded* into the loss history, or after ``rebaseline_after`` spikes in a
        row fill the whole history with *loss*, the new level."""
        slot = (self.positions == self.count % self.config.window) & finite
        history = torch.where(slot, recorded, self.history)
        after = self.config.rebaseline_after
        if after and self.config.spike_factor:
            self.spike_run.add_(1).mul_(spike)
            rebaseline = self.spike_run >= after
            history = torch.where(rebaseline, loss, history)
            self.spike_run.mul_(~rebaseline)
            self.rebaselines.add_(rebaseline)
        self.history.copy_(history)
        self.count.add_(finite.to(torch.int64))

    # -- reading the counters ---------------------------------------------------------

    @steadytrain.hookimpl
    def consolidate(self, ctx: steadytrain.StepContext) -> None:
        # Runs of skips follow the step's decision, the same on every rank under
        # torch.distributed, so that a restore or a stop happens on all ranks alike.
        flag = ctx.skip_flag
        skipped = flag.to(self.device, torch.int64) if isinstance(flag, torch.Tensor) else int(flag)
        self.run_length.add_(1).mul_(skipped)
        torch.maximum(self.longest, self.run_length, out=self.longest)
        done = ctx.step + 1
        every = self.config.snapshot_every
        # ctx.skipped is only read on snapshot steps: at most one sync per snapshot.
        if self._snapshot is not None and done % every == 0 and not ctx.skipped:
            self._snapshot.take(self._live, self._optimizers)
        if done % self.config.check_every == 0 and self._read is None:
            self._read = _CounterRead(self._take_counters(), ctx.step)
        if self._read is not None and self._read.arrived():
            read, self._read = self._read, None
            self.review(read.values(), read.step)

    def _take_counters(self) -> torch.Tensor:
        """The counters as one tensor; the longest run of skips restarts from the current."""
        counters = torch.cat([self.run_length.reshape(1), self.longest.reshape(1),
                              self.rebaselines.reshape(1), self.counters])
        self.longest.copy_(self.run_length)
        return counters

    def review(self, values: Sequence[int], step: int) -> None:
        """Act on the counters of *step*: log, re-baseline events, restore or stop the run."""
        run_length, longest, rebaselines, *counts = values
        by_cause = dict(zip(CAUSES, counts, strict=True))
        if by_cause["skipped"] > self.reported_skips:
            log.warning("guard.skipped", id=self.id, step=step,
                        new=by_cause["skipped"] - self.reported_skips, consecutive=run_length,
                        **{f"total_{k}": v for k, v in by_cause.items()})
            self.reported_skips = by_cause["skipped"]
        if rebaselines > self.reported_rebaselines:
            log.warning("guard.rebaselined", id=self.id, step=step,
                        new=rebaselines - self.reported_rebaselines, total=rebaselines,
                        rebaseline_after=self.config.rebaseline_after)
            self.reported_rebaselines = rebaselines
        limit = self.config.max_consecutive_skips
        if longest >= limit:
            raise steadytrain.TrainingError(
                f"{self.id}: {longest} optimizer steps in a row were skipped by step {step} "
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

    # -- checkpoints ------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        read = self._read
        return {
            **{name: getattr(self, name).clone() for name in self._TENSORS},
            "reported_skips": self.reported_skips,
            "reported_rebaselines": self.reported_rebaselines,
            "restored": self.restored,
            "pending_read": None if read is None else {"step": read.step,
                                                       "counters": read.counters.clone()},
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.check_state(state, self.state_dict())
        if state["history"].shape != self.history.shape:
            raise steadytrain.CheckpointError(
                f"{self.id}.window: the checkpoint holds {state['history'].numel()} losses "
                f"but window = {self.config.window}; resume with the window it was saved with"
            )
        for name in self._TENSORS:
            getattr(self, name).copy_(state[name])
        self.reported_skips = int(state["reported_skips"])
        self.reported_rebaselines = int(state["reported_rebaselines"])
        self.restored = bool(state["restored"])
        pending = state["pending_read"]
        self._read = None if pending is None else _CounterRead(
            pending["counters"].to(self.device), int(pending["step"]))
