"""The pipeline: the host-facing facade over the hook table, the loss composer and checkpoints.

A plain training loop calls one method per hook point and steps its optimizer through
:func:`steadytrain.step_optimizer`, which keeps the skip decision on the device::

    pipe = steadytrain.Pipeline.from_config("stability.toml")
    pipe.setup(model, optimizer, total_steps=len(loader) * epochs)
    for epoch in range(epochs):
        pipe.epoch_start(epoch)
        for x, y in loader:
            pipe.before_step(batch=x, targets=y)
            logits = model(x)
            loss = pipe.compute_loss(F.cross_entropy(logits, y), outputs={"logits": logits})
            loss.backward()                                     # the host's one backward
            steadytrain.step_optimizer(optimizer, pipe.after_backward())
            pipe.consolidate()
            optimizer.zero_grad()
        pipe.epoch_end()
    pipe.close()

The core never calls ``backward()`` nor steps an optimizer. Every call out of this order
is a :class:`~steadytrain.UsageError` saying which call was expected.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from ._version import __version__
from .checkpoint import load_instances, parse_state, pipeline_state
from .config import RunConfig, disabled_names, load_config
from .context import Run, StepContext, StepOutcome, _active_step
from .errors import ConfigError, TermError, UsageError
from .filters import VariableFilter
from .grad_norms import GradientNorms
from .hook_table import HookTable, name_of
from .logs import get_logger
from .loss import LossComposer, check_task_loss, instance_weight
from .registry import Registry

log = get_logger()


def _world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _mean_over_ranks(value: torch.Tensor) -> torch.Tensor:
    """*value* averaged over the ranks (an all-reduce that stays on the device)."""
    shared = value.clone()
    dist.all_reduce(shared)
    return shared / dist.get_world_size()


class Pipeline:
    """Plugin instances in hook order, bound to one model and its optimizers.

    Build it from a config with :meth:`from_config`, or from plugin instances directly.
    ``finite_check`` says when a non-finite regularizer term is an error: ``"step"``
    checks every term at once (a host sync per term on an accelerator), ``"log"`` checks
    when :meth:`metrics` is read, and ``"auto"`` checks at once for CPU tensors and at
    :meth:`metrics` otherwise.
    """

    def __init__(self, plugins: Sequence[object] = (), *, finite_check: str = "auto") -> None:
        if isinstance(plugins, (str, type)) or not isinstance(plugins, Iterable):
            raise UsageError(
                f"Pipeline() takes a list of plugin instances, got {plugins!r}; for names use "
                "Pipeline.from_config"
            )
        self.run = Run()
        self.versions: dict[str, str | None] = {}
        self._hooks = HookTable()
        self._ctx: StepContext | None = None
        self._outcome: StepOutcome | None = None
        self._pending_state: Mapping[str, Any] | None = None
        self._is_setup = False
        self._closed = False
        self._model_parameters: list[torch.nn.Parameter] | None = None
        self._finite_check = finite_check
        for plugin in plugins:
            self._hooks.add(plugin)
        self._assemble()

    # -- assembly -------------------------------------------------------------------

    @classmethod
    def from_config(
        cls,
        source: RunConfig | Mapping[str, Any] | str | Path,
        *,
        registry: Registry | None = None,
        disable: Iterable[str] = (),
    ) -> Pipeline:
        """Assemble the enabled instances of a config (a path, a mapping or a RunConfig).

        Instances whose plugin name or id is in the config's ``disable`` list, in
        *disable* (the CLI's ``-p no:NAME``) or in the comma-separated environment
        variable ``STEADYTRAIN_DISABLE`` are left out, as are those with
        ``enabled = false``. A name in any of these lists that is neither a plugin nor an
        instance id is an error.
        """
        config = load_config(source, registry=registry)
        registry = registry or config.registry or Registry.discover(
            autoload=None if config.autoload else False, allow=config.allow)
        disabled = disabled_names(config, registry, disable)
        kept = [inst for inst in config.plugins
                if inst.enabled and inst.plugin not in disabled and inst.id not in disabled]
        pipeline = cls([inst.build() for inst in kept], finite_check=config.finite_check)
        pipeline.versions.update({inst.id: inst.version for inst in kept})
        return pipeline

    def register(self, plugin: object, name: str | None = None) -> None:
        """Add *plugin* (a :class:`Plugin`, or any object with hook implementations) last.

        For notebooks and tests; call it before :meth:`setup`. A refused plugin leaves the
        pipeline as it was.
        """
        if self._is_setup:
            raise UsageError("register() must be called before setup()")
        key = self._hooks.add(plugin, name)
        try:
            self._assemble()
        except Exception:
            del self._hooks.instances[key]
            self._hooks._rebuild()
            self._assemble()
            raise

    def _assemble(self) -> None:
        instances = self._hooks.instances
        self._loss = LossComposer(
            {key: instance_weight(key, getattr(plugin, "weight", 1.0),
                                  allows_negative=getattr(plugin, "allows_negative_weight", False))
             for key, plugin in instances.items()},
            self._finite_check,
        )
        self._term_plugins = self._hooks.implementers("compute_regularizers")

    @property
    def finite_check(self) -> str:
        return self._loss.finite_check

    @property
    def is_setup(self) -> bool:
        """Whether :meth:`setup` has bound the pipeline to a run."""
        return self._is_setup

    @property
    def plugins(self) -> Mapping[str, object]:
        """The plugin instances by id, in hook order."""
        return dict(self._hooks.instances)

    @property
    def term_plugins(self) -> tuple[str, ...]:
        """Ids of the instances that return loss terms (implement ``compute_regularizers``)."""
        return self._term_plugins

    @property
    def gradient_rescalers(self) -> tuple[str, ...]:
        """Ids of the instances that rescale gradients (``rescales_gradients``: clipping)."""
        return tuple(key for key, plugin in self._hooks.instances.items()
                     if getattr(plugin, "rescales_gradients", False))

    @property
    def in_step(self) -> bool:
        """Whether a step is open (between ``before_step`` and ``consolidate``)."""
        return self._ctx is not None

    @property
    def needs_create_graph(self) -> bool:
        """Whether the host must call ``backward(create_graph=True)``."""
        return any(getattr(p, "needs_create_graph", False)
                   for p in self._hooks.instances.values())

    def _gradient_parameters(self) -> list[torch.nn.Parameter]:
        """The parameters whose gradient norms the first request of a step computes."""
        if self._model_parameters is None:
            model = self.run.model
            self._model_parameters = [] if model is None else list(model.parameters())
        return self._model_parameters

    def parameters(self) -> Iterator[torch.nn.Parameter]:
        """Learnable parameters owned by plugins, for the host's optimizer."""
        for plugin in self._hooks.instances.values():
            params = getattr(plugin, "parameters", None)
            if params is not None:
                yield from params()

    def _call(self, hook: str, arg: Run | StepContext) -> list[tuple[str, Any]]:
        return self._hooks.call(hook, arg, self.run.step)

    # -- lifecycle --------------------------------------------------------------------

    def setup(
        self,
        model: torch.nn.Module | None = None,
        optimizers: torch.optim.Optimizer | Sequence[torch.optim.Optimizer] | None = None,
        *,
        total_steps: int | None = None,
    ) -> Pipeline:
        """Bind the pipeline to the model and optimizers and call every plugin's ``setup``.

        ``total_steps`` (optimizer steps in the whole run, ≥ 1) gives ``progress`` its
        meaning; progress-driven schedules need it. A refused setup leaves no forward hook
        on the model and the pipeline unbound, so that ``setup`` may be called again.
        """
        if self._is_setup:
            raise UsageError("setup() was already called on this pipeline")
        if total_steps is not None and not (
            isinstance(total_steps, int) and not isinstance(total_steps, bool)
            and total_steps >= 1
        ):
            raise ConfigError(
                f"setup(total_steps=...): must be an integer >= 1 (optimizer steps in the "
                f"whole run) or None when unknown, got {total_steps!r}"
            )
        if isinstance(optimizers, torch.optim.Optimizer):
            optimizers = (optimizers,)
        if total_steps is None and (scheduled := self._loss.needs_progress):
            key, weight = scheduled[0]
            raise ConfigError(
                f"{key}.weight: the {weight.kind} schedule follows the run's progress; "
                "pass total_steps to setup() or give the schedule horizon_steps"
            )
        for plugin in self._hooks.instances.values():
            selector = getattr(plugin, "filter", None)
            if isinstance(selector, VariableFilter):
                selector.check_selects_something()
        self.run.model = model
        self.run.optimizers = tuple(optimizers or ())
        self.run.total_steps = total_steps
        try:
            self._call("setup", self.run)
            self._is_setup = True
            if self._pending_state is not None:
                counters, states = self._pending_state
                self._pending_state = None  # a refused state is not tried again
                load_instances(self._hooks.instances, states)
                self._set_counters(counters)
        except BaseException:
            self._is_setup = False
            self.run.remove_taps()
            self.run.model, self.run.optimizers, self.run.total_steps = None, (), None
            raise
        log.info(
            "pipeline.assembled",
            plugins=[
                {"id": key, "plugin": name_of(p), "version": self.versions.get(key)}
                for key, p in self._hooks.instances.items()
            ],
            core_version=__version__,
        )
        return self

    def close(self) -> None:
        """Call every plugin's ``teardown`` and remove forward taps; safe to call twice."""
        if self._closed or not self._is_setup:
            return
        self._closed = True
        try:
            self._call("teardown", self.run)
        finally:
            self.run.remove_taps()
            self._ctx = self._outcome = None
            _active_step.set(None)

    def __enter__(self) -> Pipeline:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def epoch_start(self, epoch: int | None = None) -> None:
        """Start an epoch (``epoch`` overrides the pipeline's own count)."""
        self._require_setup("epoch_start")
        if epoch is not None:
            self.run.epoch = epoch
        self._call("on_epoch_start", self.run)

    def epoch_end(self) -> None:
        """End the current epoch; the epoch counter moves on afterwards."""
        self._require_setup("epoch_end")
        self._call("on_epoch_end", self.run)
        self.run.epoch += 1

    @contextmanager
    def evaluating(self) -> Iterator[None]:
        """Wrap evaluation: plugins may swap weights in on entry and back on exit."""
        self._require_setup("evaluating")
        if self._ctx is not None:
            raise UsageError(
                f"evaluating() inside step {self._ctx.step}: evaluate between steps, after "
                "consolidate()"
            )
        self._call("on_eval_start", self.run)
        try:
            yield
        finally:
            self._call("on_eval_end", self.run)

    # -- the step ---------------------------------------------------------------------

    def _require_setup(self, method: str) -> None:
        if self._closed:
            raise UsageError(f"{method}() on a closed pipeline")
        if not self._is_setup:
            raise UsageError(f"{method}() needs setup() first: pipe.setup(model, optimizer)")

    def _open_step(self, method: str) -> StepContext:
        self._require_setup(method)
        if self._ctx is None:
            raise UsageError(f"{method}() outside a step: call before_step() first")
        return self._ctx

    def before_step(
        self,
        *,
        batch: Any = None,
        targets: Any = None,
        micro_batch: int = 0,
        num_micro_batches: int = 1,
        loss_scale: float | None = None,
    ) -> StepContext:
        """Open a micro-batch (the first one opens the optimizer step) and call ``before_step``.

        With gradient accumulation, call it for ``micro_batch`` 0 … ``num_micro_batches``
        − 1 of each optimizer step. :meth:`compute_loss` multiplies the combined loss by
        ``loss_scale`` (a number > 0), by default ``1 / num_micro_batches``; pass
        ``loss_scale=1`` when the host divides the loss itself.
        """
        self._require_setup("before_step")
        if not (isinstance(num_micro_batches, int) and num_micro_batches >= 1
                and isinstance(micro_batch, int) and 0 <= micro_batch < num_micro_batches):
            raise UsageError(
                f"before_step(): micro_batch must be in [0, num_micro_batches) and "
                f"num_micro_batches >= 1, got micro_batch {micro_batch!r} of "
                f"{num_micro_batches!r}"
            )
        if loss_scale is not None and not (
            isinstance(loss_scale, (int, float)) and math.isfinite(loss_scale) and loss_scale > 0
        ):
            raise UsageError(
                f"before_step(loss_scale=...): must be a finite number > 0, got {loss_scale!r}; "
                "it multiplies the combined loss (1 / num_micro_batches by default)"
            )
        ctx = self._ctx
        if ctx is not None and self._outcome is not None:
            raise UsageError(
                f"before_step() while step {ctx.step} waits for consolidate(): call "
                "pipe.consolidate() after stepping the optimizer"
            )
        if ctx is not None and micro_batch == 0 and ctx.is_last_micro_batch:
            raise UsageError(
                f"step {ctx.step} is still open: call after_backward() and consolidate() "
                "before the next before_step()"
            )
        if micro_batch == 0 and ctx is None:
            run = self.run
            progress = run.progress
            ctx = StepContext(run, run.step, run.epoch, progress, num_micro_batches,
                              weights=self._loss.advance(run.step, progress))
            ctx.micro_batch = -1
            self._ctx = ctx
        elif ctx is None or ctx.micro_batch != micro_batch - 1 or (
            ctx.num_micro_batches != num_micro_batches
        ):
            expected = "0" if ctx is None else f"{ctx.micro_batch + 1} of {ctx.num_micro_batches}"
            raise UsageError(
                f"before_step(): micro_batch {micro_batch} of {num_micro_batches} out of "
                f"order: expected micro_batch {expected}"
            )
        self._flush_metrics(ctx)
        ctx.micro_batch = micro_batch
        ctx.loss_scale = 1.0 / num_micro_batches if loss_scale is None else float(loss_scale)
        ctx.batch, ctx.targets, ctx.task_loss = batch, targets, None
        ctx.outputs, ctx.reported = {}, set()
        self.run.taps.clear()
        _active_step.set(ctx)
        self._call("before_step", ctx)
        return ctx

    def compute_loss(
        self, task_loss: torch.Tensor | None, *, outputs: Mapping[str, Any] | None = None
    ) -> torch.Tensor:
        """Return ``loss_scale · (task_loss + Σ weight_i · term_i)`` for the host's one backward.

        Call it once per micro-batch, after the forward pass. *task_loss* is a scalar
        tensor (or ``None`` when the terms are the whole loss). *outputs* are named tensors
        of this forward pass for the plugins (``logits``, ``gates``, ``corrections``, …);
        they join what modules passed to :func:`steadytrain.report`.
        """
        ctx = self._open_step("compute_loss")
        if self._outcome is not None or ctx.losses > ctx.micro_batch:
            raise UsageError(
                f"compute_loss() twice for micro_batch {ctx.micro_batch} of step {ctx.step}: "
                "call it once per micro-batch, between before_step() and the backward"
            )
        if task_loss is not None:
            check_task_loss(task_loss)
            loss = task_loss.detach().float()
            ctx.loss_sum = loss if ctx.loss_sum is None else ctx.loss_sum + loss
        ctx.losses += 1
        if outputs:
            ctx.outputs.update(outputs)
        ctx.task_loss = task_loss
        results = self._call("compute_regularizers", ctx)
        return self._loss.compose(task_loss, results, loss_scale=ctx.loss_scale,
                                  step=ctx.step, staged=ctx.staged)

    def _flush_metrics(self, ctx: StepContext) -> None:
        """Move what the step recorded into the metric store (after a backward)."""
        if ctx.staged:
            record, step = self.run.metrics.record, ctx.step
            for name, value in ctx.staged:
                record(name, value, step=step)
            ctx.staged.clear()

    def after_backward(self) -> StepOutcome:
        """Gradients are complete: call ``after_backward`` and say whether to step.

        Call once per optimizer step, after the backward of the last micro-batch. Under
        ``torch.distributed`` ``ctx.step_loss`` becomes the mean over the ranks before the
        hooks run, and the decision is made the same on every rank (two all-reduces of one
        element each, which stay on the device). The plugins share one computation of the
        gradients' norms (``ctx.gradient_norms``), dropped after each plugin that rescales
        gradients.
        """
        ctx = self._open_step("after_backward")
        if self._outcome is not None:
            raise UsageError(
                f"after_backward() twice in step {ctx.step}: call it once per optimizer step, "
                "then step the optimizer and call consolidate()"
            )
        if not ctx.is_last_micro_batch:
            raise UsageError(
                f"after_backward() after micro_batch {ctx.micro_batch} of "
                f"{ctx.num_micro_batches}: call it once, after the last micro-batch's backward"
            )
        if self._term_plugins and ctx.losses < ctx.num_micro_batches:
            raise UsageError(
                f"after_backward() in step {ctx.step}, but compute_loss() ran for "
                f"{ctx.losses} of {ctx.num_micro_batches} micro-batch(es): the terms of "
                f"{', '.join(self._term_plugins)} never reached the loss. Back-propagate "
                "loss = pipe.compute_loss(task_loss) instead of the task loss alone"
            )
        self._flush_metrics(ctx)
        distributed = _world_size() > 1
        if distributed and ctx.loss_sum is not None:
            ctx.loss_sum = _mean_over_ranks(ctx.loss_sum)
        ctx.norm_cache = GradientNorms(self._gradient_parameters)
        try:
            self._call("after_backward", ctx)
        finally:
            ctx.norm_cache = None
        outcome = StepOutcome(tuple(ctx.skip_requests))
        if distributed:
            outcome.agree()
        self._outcome = outcome
        return outcome

    def consolidate(self) -> None:
        """The optimizer stepped (or skipped): call ``consolidate`` and close the step."""
        self._require_setup("consolidate")
        if self._outcome is None:
            raise UsageError(
                "consolidate() before after_backward(): call it once per optimizer step, "
                "after after_backward() and the optimizer step"
                if self._ctx is not None else
                "consolidate() outside a step (called twice?): call it once per optimizer "
                "step, after after_backward() and the optimizer step"
            )
        ctx = self._ctx
        outcome = ctx.outcome = self._outcome
        self._call("consolidate", ctx)
        self._flush_metrics(ctx)
        # The event needs the decision on the host: log it only when it is known already,
        # so that a host stepping without a sync is not made to sync here.
        if outcome.decided and outcome.skip:
            log.warning("step.skipped", step=ctx.step, reasons=outcome.reasons)
        self.run.count_skip(outcome)
        self.run.step += 1
        self.run.taps.clear()
        self._ctx = self._outcome = None
        _active_step.set(None)

    # -- metrics and checkpoints -----------------------------------------------------------

    def metrics(self, *, reset: bool = True) -> dict[str, float]:
        """Means of every metric since the last reset, as floats (the one host sync)."""
        store = self.run.metrics
        values = store.compute()
        bad = [n for n, v in values.items() if n.startswith("reg/") and not math.isfinite(v)]
        task_broke = not math.isfinite(values.get("loss/task", 0.0))
        if bad and not task_broke and self.finite_check != "step":
            window = f"steps {store.first_step}..{store.last_step}"
            raise TermError(
                f"non-finite regularizer term(s) {', '.join(bad)} during {window}; set "
                "finite_check = 'step' to stop at the first one"
            )
        if reset:
            store.reset()
        return values

    def state_dict(self) -> dict[str, Any]:
        """The pipeline's state for ``torch.save``; loads with ``weights_only=True``.

        The layout is described in :mod:`steadytrain.checkpoint`. A plugin state that
        ``torch.load(weights_only=True)`` would refuse is a ``CheckpointError`` here,
        naming the instance and the key.
        """
        if self._ctx is not None:
            raise UsageError(
                f"state_dict() inside step {self._ctx.step}: save between steps, after "
                "consolidate()"
            )
        counters = {"step": self.run.step, "epoch": self.run.epoch,
                    "skipped_steps": self.run.skipped_steps}
        return pipeline_state(counters, self._hooks.instances)

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`; before ``setup`` the plugin states wait for it.

        All or nothing: the whole checkpoint is checked first, and if any instance refuses
        its state the counters and every instance keep what they had. Before ``setup`` the
        counters and states wait for it together: a state refused there fails ``setup``
        and leaves the counters as they were.
        """
        if self._ctx is not None:
            raise UsageError(
                f"load_state_dict() inside step {self._ctx.step}: load between steps"
            )
        counters, states = parse_state(state, self._hooks.instances)
        if self._is_setup:
            load_instances(self._hooks.instances, states)
            self._set_counters(counters)
        else:
            self._pending_state = counters, states

    def _set_counters(self, counters: Mapping[str, int]) -> None:
        self.run.step = counters["step"]
        self.run.epoch = counters["epoch"]
        self.run.skipped_steps = counters["skipped_steps"]
