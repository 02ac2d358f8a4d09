"""What the pipeline hands to plugins: the run (``Run``) and the current step (``StepContext``)."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from contextvars import ContextVar
from typing import TYPE_CHECKING, Any

import attrs
import torch

from .errors import ConfigError, UsageError
from .filters import VariableFilter
from .grad_norms import GradientNorms, check_norm_type, total_norm
from .metrics import MetricStore

if TYPE_CHECKING:
    from .plugin import Plugin

_active_step: ContextVar[StepContext | None] = ContextVar("steadytrain_active_step", default=None)


def report(name: str, value: Any) -> None:
    """Put *value* into the outputs of the step that is open, as ``ctx.outputs[name]``.

    Modules call this from ``forward`` to hand gates, masks or corrections to the
    plugins without threading them through the model's return value. Outside a training
    step (evaluation, inference) it does nothing. Reporting the same name twice in one
    forward pass keeps every value: the output becomes a list in report order.
    """
    ctx = _active_step.get()
    if ctx is None:
        return
    if name in ctx.reported:
        previous = ctx.outputs[name]
        ctx.outputs[name] = [*previous, value] if isinstance(previous, list) else [previous, value]
    else:
        ctx.reported.add(name)
        ctx.outputs[name] = value


@attrs.define(eq=False)
class Run:
    """The training run a pipeline is bound to; handed to the lifecycle hooks.

    ``step`` counts optimizer steps completed (skipped ones included) and ``epoch`` the
    current epoch. ``total_steps`` is ``None`` when the host did not say how long the run
    is; then ``progress`` is ``None`` too.
    """

    model: torch.nn.Module | None = None
    optimizers: tuple[torch.optim.Optimizer, ...] = ()
    total_steps: int | None = None
    step: int = 0
    epoch: int = 0
    metrics: MetricStore = attrs.Factory(MetricStore)
    taps: dict[str, Any] = attrs.Factory(dict)
    _tap_handles: list[Any] = attrs.Factory(list)
    _skipped_known: int = 0
    _skipped_pending: torch.Tensor | None = None

    @property
    def skipped_steps(self) -> int:
        """Optimizer steps skipped so far (reads pending device flags: may sync once)."""
        if self._skipped_pending is not None:
            self._skipped_known += int(self._skipped_pending)
            self._skipped_pending = None
        return self._skipped_known

    @skipped_steps.setter
    def skipped_steps(self, value: int) -> None:
        self._skipped_known, self._skipped_pending = value, None

    def count_skip(self, outcome: StepOutcome) -> None:
        """Add a closed step's decision to ``skipped_steps`` without syncing."""
        if not outcome.requests:
            return
        if outcome.decided:
            self._skipped_known += int(outcome.skip)
            return
        flag = outcome.flag
        if not isinstance(flag, torch.Tensor):
            self._skipped_known += int(flag)
        elif self._skipped_pending is None:
            self._skipped_pending = flag.to(torch.int64)
        else:
            self._skipped_pending = self._skipped_pending + flag

    @property
    def optimizer(self) -> torch.optim.Optimizer | None:
        """The first optimizer, or ``None``."""
        return self.optimizers[0] if self.optimizers else None

    @property
    def progress(self) -> float | None:
        if self.total_steps is None:
            return None
        return min(1.0, self.step / self.total_steps)

    def named_parameters(self) -> list[tuple[str, torch.nn.Parameter]]:
        """The model's parameters by name (empty without a model)."""
        return [] if self.model is None else list(self.model.named_parameters())

    def tap(
        self, plugin: Plugin, patterns: str | Sequence[str], *, option: str = "taps"
    ) -> tuple[str, ...]:
        """Capture the outputs of the model's modules whose names match *patterns*.

        Returns the matched module names; during a step, ``ctx.taps[name]`` is the list of
        the outputs of module ``name`` in the current micro-batch's forward pass, one per
        call, in call order (still part of the graph). Outside a training step nothing is
        captured. A pattern that matches no module is an error naming the plugin and its
        *option* (the config option that holds the patterns).
        """
        if self.model is None:
            raise ConfigError(
                f"{plugin.id}.{option}: the instance taps modules but no model is bound; pass "
                "it to pipe.setup(model, optimizer)"
            )
        patterns = (patterns,) if isinstance(patterns, str) else tuple(patterns)
        modules = dict(self.model.named_modules())
        names = VariableFilter(include=patterns, owner=f"{plugin.id}.{option}").select(
            [n for n in modules if n], kind="module"
        )
        for name in names:
            if any(getattr(h, "tap_name", None) == name for h in self._tap_handles):
                continue
            handle = modules[name].register_forward_hook(self._capture(name))
            handle.tap_name = name
            self._tap_handles.append(handle)
        return names

    def _capture(self, name: str) -> Callable[..., None]:
        def hook(_module: torch.nn.Module, _args: Any, output: Any) -> None:
            # Only inside a training step: evaluation must not pile up outputs.
            if _active_step.get() is not None:
                self.taps.setdefault(name, []).append(output)

        return hook

    def log(self, plugin: Plugin, name: str, value: torch.Tensor | float) -> None:
        """Record a metric ``<id>/<name>`` from a lifecycle hook; stays on the device."""
        self.metrics.record(f"{plugin.id}/{name}", value, step=self.step)

    def remove_taps(self) -> None:
        for handle in self._tap_handles:
            handle.remove()
        self._tap_handles.clear()
        self.taps.clear()


@attrs.frozen
class SkipRequest:
    """A plugin's request that the host not step the optimizer this time."""

    id: str
    reason: str
    when: bool | torch.Tensor = True


def _collective_device(group: Any) -> torch.device:
    import torch.distributed as dist

    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


@attrs.define(eq=False)
class StepOutcome:
    """What the host needs after the backward: whether to step the optimizer.

    ``skip`` turns the requests into a bool, syncing the host once if a request's
    condition is a device tensor; ``flag`` is the same decision as a tensor (no sync).
    """

    requests: tuple[SkipRequest, ...] = ()
    _skip: bool | None = None
    _flag: torch.Tensor | bool | None = None

    def agree(self, group: Any = None) -> None:
        """Make the decision the same on every rank of *group*: skip if any rank skips.

        One all-reduce of a one-element tensor, which stays on the device (no host sync
        under NCCL). Every rank must call it, in every step.
        """
        import torch.distributed as dist

        flag = self.flag
        device = flag.device if isinstance(flag, torch.Tensor) else _collective_device(group)
        shared = torch.as_tensor(flag, dtype=torch.float32, device=device).reshape(1).clone()
        dist.all_reduce(shared, op=dist.ReduceOp.MAX, group=group)
        self._flag, self._skip = shared[0] > 0, None

    @property
    def skip(self) -> bool:
        if self._skip is None:
            self._skip = bool(self.flag)
        return self._skip

    @property
    def decided(self) -> bool:
        """Whether the decision is known on the host (so reading :attr:`skip` costs nothing)."""
        return self._skip is not None or not isinstance(self.flag, torch.Tensor)

    @property
    def reasons(self) -> list[str]:
        """``"instance: reason"`` for every request whose condition holds."""
        return [f"{r.id}: {r.reason}" for r in self.requests if bool(r.when)]

    @property
    def flag(self) -> torch.Tensor | bool:
        if self._flag is None:
            flags = [r.when for r in self.requests]
            tensors = [f.reshape(()).bool() for f in flags if isinstance(f, torch.Tensor)]
            if any(not isinstance(f, torch.Tensor) and bool(f) for f in flags):
                self._flag = True
            elif not tensors:
                self._flag = False
            else:
                self._flag = tensors[0] if len(tensors) == 1 else torch.stack(tensors).any()
        return self._flag


@attrs.define(eq=False)
class StepContext:
    """Everything a step hook may read, for one optimizer step.

    The same object serves every micro-batch of the step: ``micro_batch``, ``batch``,
    ``targets``, ``task_loss``, ``outputs`` and ``taps`` are replaced for each one.
    ``id`` is the id of the plugin instance whose hook is running; :meth:`log` uses it
    to name metrics. ``step_loss`` is the step's task loss, recorded once by the core.
    """

    run: Run
    step: int
    epoch: int
    progress: float | None
    num_micro_batches: int = 1
    micro_batch: int = 0
    loss_scale: float = 1.0
    batch: Any = None
    targets: Any = None
    task_loss: torch.Tensor | None = None
    outputs: dict[str, Any] = attrs.Factory(dict)
    reported: set[str] = attrs.Factory(set)
    skip_requests: list[SkipRequest] = attrs.Factory(list)
    outcome: StepOutcome | None = None
    id: str = ""
    staged: list[tuple[str, torch.Tensor | float]] = attrs.Factory(list)
    weights: Mapping[str, float] = attrs.Factory(dict)
    loss_sum: torch.Tensor | None = None
    losses: int = 0
    #: The shared gradient norms; set by the core while ``after_backward`` runs.
    norm_cache: GradientNorms | None = None

    @property
    def step_loss(self) -> torch.Tensor | None:
        """The step's task loss: the mean of its micro-batches' task losses, detached.

        Complete from ``after_backward`` on (during ``compute_regularizers`` it covers the
        micro-batches so far, on this rank); under ``torch.distributed`` it is the mean over
        the ranks from ``after_backward`` on, the loss of the global batch. ``None`` when
        the host passed no task loss.
        """
        return None if self.loss_sum is None else self.loss_sum / self.losses

    @property
    def weight(self) -> float:
        """The weight the core applies this step to the running instance's terms."""
        return self.weights.get(self.id, 1.0)

    @property
    def skipped(self) -> bool:
        """In ``consolidate``: whether the optimizer step was skipped.

        Free when the host already read ``outcome.skip``; otherwise it reads the device
        flag once (a host sync). Use :attr:`skip_flag` to stay on the device.
        """
        return self.outcome is not None and self.outcome.skip

    @property
    def skip_flag(self) -> torch.Tensor | bool:
        """The skip decision without a host sync: a bool, or a boolean device tensor."""
        return False if self.outcome is None else self.outcome.flag

    @property
    def model(self) -> torch.nn.Module | None:
        return self.run.model

    @property
    def optimizer(self) -> torch.optim.Optimizer | None:
        return self.run.optimizer

    @property
    def optimizers(self) -> tuple[torch.optim.Optimizer, ...]:
        return self.run.optimizers

    @property
    def taps(self) -> Mapping[str, list[Any]]:
        """Outputs of the tapped modules in this micro-batch: name → one output per call."""
        return self.run.taps

    @property
    def is_last_micro_batch(self) -> bool:
        return self.micro_batch == self.num_micro_batches - 1

    def output(self, name: str, *, option: str) -> Any:
        """``outputs[name]``, or a :class:`~steadytrain.ConfigError` naming the running
        instance's *option* and the outputs this step has."""
        try:
            return self.outputs[name]
        except KeyError:
            present = ", ".join(sorted(self.outputs)) or "(none)"
            raise ConfigError(
                f"{self.id}.{option}: no output {name!r} in this step; the outputs "
                f"are: {present}. Report it from the model with steadytrain.report({name!r}, "
                f"tensor), pass it to compute_loss(outputs=...), or set {option}."
            ) from None

    def reports(self, name: str, *, option: str) -> list[Any]:
        """Every value reported (or passed) under *name* in this micro-batch, in call order.

        A module that reports once per time step (a gate inside a loop) gives one value per
        call; a value passed as a list counts as that many reports.
        """
        value = self.output(name, option=option)
        values = list(value) if isinstance(value, (list, tuple)) else [value]
        if not values:
            raise ConfigError(f"{self.id}.{option}: outputs[{name!r}] is an empty list")
        return values

    def tapped(self, module: str, *, option: str = "taps") -> list[Any]:
        """The outputs of tapped *module* in this micro-batch, one per call, in call order.

        Ask for the tap in ``setup`` with ``run.tap(self, patterns)``. A module that did
        not run in this forward pass is an error naming the running instance's *option*.
        """
        calls = self.run.taps.get(module)
        if not calls:
            raise ConfigError(
                f"{self.id}.{option}: module {module!r} did not run in this forward pass, so "
                "its output cannot be read; tap a module that runs in every training step"
            )
        return calls

    def log(self, name: str, value: torch.Tensor | float) -> None:
        """Record a scalar metric as ``<id>/<name>``; stays on the device."""
        if isinstance(value, torch.Tensor) and value.numel() != 1:
            raise UsageError(
                f"{self.id}: metric {name!r} must be a scalar, got a tensor of shape "
                f"{tuple(value.shape)}"
            )
        # Staged, and detached by the pipeline after the backward: a detached alias of a
        # tensor that backward is about to use slows that backward down.
        self.staged.append((f"{self.id}/{name}", value))

    def gradient_norms(
        self, parameters: Iterable[torch.Tensor], *, norm_type: float = 2.0
    ) -> list[torch.Tensor]:
        """The ``norm_type`` norm of the gradient of each of *parameters* that has one.

        In ``after_backward`` only. Float32 0-d tensors on the gradients' devices, in the
        order of *parameters*; parameters without a gradient are left out. A sharded
        gradient (a DTensor, under FSDP2) gets the norm of the whole gradient, the same on
        every rank. Every plugin of the step shares one computation: the first request
        takes the norms of all the model's gradients in one fused kernel, and they serve
        every later request until a plugin that rescales gradients has run; requests after
        it see the rescaled gradients.
        """
        norm_type = check_norm_type(norm_type, owner=f"{self.id}: ctx.gradient_norms()")
        if self.norm_cache is None:
            raise UsageError(
                f"{self.id}: ctx.gradient_norms() and ctx.gradient_norm() are available in "
                "after_backward only, where the step's gradients are complete"
            )
        return self.norm_cache.of(parameters, norm_type)

    def gradient_norm(
        self, parameters: Iterable[torch.Tensor], *, norm_type: float = 2.0
    ) -> torch.Tensor:
        """The total ``norm_type`` norm of the gradients of *parameters*, as
        ``torch.nn.utils.get_total_norm`` gives it, from the shared norms of
        :meth:`gradient_norms`; a float32 0-d tensor, 0 when no parameter has a gradient."""
        parameters = list(parameters)
        norms = self.gradient_norms(parameters, norm_type=norm_type)
        device = parameters[0].device if parameters else None
        return total_norm(norms, norm_type, device=device)

    def gradients_changed(self) -> None:
        """Say that the running hook changed gradients: norms asked for after it are
        computed from the new values.

        The core calls it after the ``after_backward`` of every plugin that declares
        ``rescales_gradients = True``; a plugin that changes gradients otherwise calls it.
        """
        if self.norm_cache is not None:
            self.norm_cache.clear()

    def request_skip(self, reason: str, *, when: bool | torch.Tensor = True) -> None:
        """Ask the host not to step the optimizer this time, if *when* holds.

        *when* may be a boolean device tensor: nothing is synced until the host reads
        the outcome.
        """
        self.skip_requests.append(SkipRequest(self.id, reason, when))
