"""The pipeline: plugin instances assembled in config order, called at the host's step points.

A plain training loop calls one method per hook point::

    pipe = steadytrain.Pipeline.from_config("stability.toml")
    pipe.setup(model, optimizer, total_steps=len(loader) * epochs)
    for epoch in range(epochs):
        pipe.epoch_start(epoch)
        for x, y in loader:
            pipe.before_step(batch=x, targets=y)
            logits = model(x)
            loss = pipe.compute_loss(F.cross_entropy(logits, y), outputs={"logits": logits})
            loss.backward()                       # the host's one backward
            if not pipe.after_backward().skip:    # a plugin may ask to skip this step
                optimizer.step()
            pipe.consolidate()
            optimizer.zero_grad()
        pipe.epoch_end()
    pipe.close()

The core never calls ``backward()`` nor steps an optimizer.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pluggy
import structlog
import torch

from ._version import __version__
from .config import FINITE_CHECKS, RunConfig, load_config
from .context import Run, StepContext, StepOutcome, _active_step
from .errors import (
    CheckpointError,
    ConfigError,
    HookError,
    RegistryError,
    SteadytrainError,
    TermError,
    suggest,
)
from .hookspecs import HOOK_NAMES
from .registry import Registry, hook_manager
from .schedules import Constant

DISABLE_ENV = "STEADYTRAIN_DISABLE"
CHECKPOINT_FORMAT = 1

log = structlog.get_logger("steadytrain")


def _name_of(plugin: object) -> str:
    return getattr(plugin, "name", "") or type(plugin).__name__


class Pipeline:
    """Plugin instances in hook order, bound to one model and its optimizers.

    Build it from a config with :meth:`from_config`, or from plugin objects directly.
    ``finite_check`` says when a non-finite regularizer term is an error: ``"step"``
    checks every term at once (a host sync per term on an accelerator), ``"log"`` checks
    when :meth:`metrics` is read, and ``"auto"`` checks at once for CPU tensors and at
    :meth:`metrics` otherwise.
    """

    def __init__(self, plugins: Sequence[object] = (), *, finite_check: str = "auto") -> None:
        if finite_check not in FINITE_CHECKS:
            raise ConfigError(
                f"finite_check: must be one of {', '.join(FINITE_CHECKS)}, got {finite_check!r}"
            )
        self.finite_check = finite_check
        self.run = Run()
        self.versions: dict[str, str | None] = {}
        self._instances: dict[str, object] = {}
        self._ctx: StepContext | None = None
        self._outcome: StepOutcome | None = None
        self._pending_state: Mapping[str, Any] | None = None
        self._is_setup = False
        self._closed = False
        for plugin in plugins:
            self._add(plugin, getattr(plugin, "id", None) or _name_of(plugin))
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
        ``enabled = false``.
        """
        config = load_config(source, registry=registry)
        if registry is None:
            registry = Registry.discover(autoload=None if config.autoload else False)
        known = {inst.plugin for inst in config.plugins} | {inst.id for inst in config.plugins}
        known |= set(registry.names())
        for name in (*config.disable, *disable):
            if name not in known:
                raise ConfigError(
                    f"disable: {name!r} is neither a plugin nor an instance id"
                    f"{suggest(name, known)}"
                )
        env = {n.strip() for n in os.environ.get(DISABLE_ENV, "").split(",") if n.strip()}
        disabled = set(config.disable) | set(disable) | env
        instances, versions = [], {}
        for inst in config.plugins:
            if not inst.enabled or inst.plugin in disabled or inst.id in disabled:
                continue
            instances.append(inst.build(registry.get(inst.plugin)))
            versions[inst.id] = registry.entry(inst.plugin).version
        pipeline = cls(instances, finite_check=config.finite_check)
        pipeline.versions.update(versions)
        return pipeline

    def register(self, plugin: object, name: str | None = None) -> None:
        """Add *plugin* (a :class:`Plugin`, or any object with hook implementations) last.

        For notebooks and tests; call it before :meth:`setup`.
        """
        if self._is_setup:
            raise RuntimeError("register() must be called before setup()")
        key = name or getattr(plugin, "id", None) or _name_of(plugin)
        self._add(plugin, key)
        try:
            self._assemble()
        except RegistryError:
            del self._instances[key]  # the pipeline stays as it was
            raise

    def _add(self, plugin: object, key: str) -> None:
        if key in self._instances:
            raise ConfigError(
                f"instance id {key!r} is used twice; give each instance of a plugin its own id"
            )
        self._instances[key] = plugin

    def _assemble(self) -> None:
        manager = hook_manager()
        # pluggy calls the last registered implementation first: register in reverse so
        # that hooks run in config order (tryfirst/trylast still move an implementation).
        for key, plugin in reversed(self._instances.items()):
            try:
                manager.register(plugin, name=key)
            except pluggy.PluginValidationError as exc:
                raise RegistryError(
                    f"plugin instance {key!r} ({_name_of(plugin)}): invalid hook "
                    f"implementation: {exc}"
                ) from None
        try:
            manager.check_pending()
        except pluggy.PluginValidationError as exc:
            raise RegistryError(f"unknown hook: {exc}") from None
        dispatch = {}
        for hook in HOOK_NAMES:
            impls = getattr(manager.hook, hook).get_hookimpls()
            for impl in impls:
                if impl.hookwrapper or impl.wrapper:
                    raise RegistryError(
                        f"plugin instance {impl.plugin_name!r}: hook {hook} is a wrapper; "
                        "hook wrappers are not supported"
                    )
            dispatch[hook] = tuple(
                (impl.plugin_name, impl.function, bool(impl.argnames)) for impl in reversed(impls)
            )
        self._dispatch = dispatch
        weights = {k: getattr(p, "weight", Constant(1.0)) for k, p in self._instances.items()}
        self._weights = {k: w.value for k, w in weights.items() if isinstance(w, Constant)}
        self._schedules = [(k, w) for k, w in weights.items() if not isinstance(w, Constant)]

    @property
    def is_setup(self) -> bool:
        """Whether :meth:`setup` has bound the pipeline to a run."""
        return self._is_setup

    @property
    def plugins(self) -> Mapping[str, object]:
        """The plugin instances by key, in hook order."""
        return dict(self._instances)

    @property
    def needs_create_graph(self) -> bool:
        """Whether the host must call ``backward(create_graph=True)``."""
        return any(getattr(p, "needs_create_graph", False) for p in self._instances.values())

    def parameters(self) -> Iterator[torch.nn.Parameter]:
        """Learnable parameters owned by plugins, for the host's optimizer."""
        for plugin in self._instances.values():
            params = getattr(plugin, "parameters", None)
            if params is not None:
                yield from params()

    # -- calling hooks ----------------------------------------------------------------

    def _call(self, hook: str, arg: Run | StepContext) -> list[tuple[str, Any]]:
        results: list[tuple[str, Any]] = []
        dispatch = self._dispatch[hook]
        if not dispatch:
            return results
        is_step = type(arg) is StepContext
        for key, function, takes_arg in dispatch:
            if is_step:
                arg.id = key
            try:
                result = function(arg) if takes_arg else function()
            except SteadytrainError as exc:
                exc.add_note(f"in plugin instance {key!r}, hook {hook}, step {self.run.step}")
                raise
            except Exception as exc:
                plugin = self._instances[key]
                raise HookError(
                    f"plugin instance {key!r} ({_name_of(plugin)}) raised "
                    f"{type(exc).__name__} in {hook} at step {self.run.step}: {exc}",
                    id=key, hook=hook, step=self.run.step,
                ) from exc
            if result is not None:
                results.append((key, result))
        return results

    # -- lifecycle --------------------------------------------------------------------

    def setup(
        self,
        model: torch.nn.Module | None = None,
        optimizers: torch.optim.Optimizer | Sequence[torch.optim.Optimizer] | None = None,
        *,
        total_steps: int | None = None,
    ) -> Pipeline:
        """Bind the pipeline to the model and optimizers and call every plugin's ``setup``.

        ``total_steps`` (optimizer steps in the whole run) gives ``progress`` its meaning;
        progress-driven schedules need it.
        """
        if self._is_setup:
            raise RuntimeError("setup() was already called on this pipeline")
        if isinstance(optimizers, torch.optim.Optimizer):
            optimizers = (optimizers,)
        for key, plugin in self._instances.items():
            weight = getattr(plugin, "weight", None)
            if total_steps is None and getattr(weight, "needs_progress", False):
                raise ConfigError(
                    f"{key}.weight: the {weight.kind} schedule follows the run's progress; "
                    "pass total_steps to setup() or give the schedule horizon_steps"
                )
        self.run.model = model
        self.run.optimizers = tuple(optimizers or ())
        self.run.total_steps = total_steps
        self._call("setup", self.run)
        self._is_setup = True
        if self._pending_state is not None:
            self._load_instances(self._pending_state)
            self._pending_state = None
        log.info(
            "pipeline.assembled",
            plugins=[
                {"id": key, "plugin": _name_of(p), "version": self.versions.get(key)}
                for key, p in self._instances.items()
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
        self._call("on_eval_start", self.run)
        try:
            yield
        finally:
            self._call("on_eval_end", self.run)

    # -- the step ---------------------------------------------------------------------

    def _require_setup(self, method: str) -> None:
        if not self._is_setup:
            raise RuntimeError(f"{method}() needs setup() first: pipe.setup(model, optimizer)")
        if self._closed:
            raise RuntimeError(f"{method}() on a closed pipeline")

    def _require_step(self, method: str) -> StepContext:
        if self._ctx is None:
            raise RuntimeError(f"{method}() outside a step: call before_step() first")
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
        ``loss_scale``, by default ``1 / num_micro_batches``; pass ``loss_scale=1`` when
        the host divides the loss itself.
        """
        self._require_setup("before_step")
        if not 0 <= micro_batch < num_micro_batches:
            raise ValueError(
                f"micro_batch must be in [0, num_micro_batches), got {micro_batch} of "
                f"{num_micro_batches}"
            )
        ctx = self._ctx
        if ctx is not None and micro_batch == 0 and ctx.is_last_micro_batch:
            raise RuntimeError(
                f"step {ctx.step} is still open: call after_backward() and consolidate() "
                "before the next before_step()"
            )
        if micro_batch == 0 and ctx is None:
            run = self.run
            progress = run.progress
            for key, schedule in self._schedules:
                self._weights[key] = schedule(run.step, progress)
            ctx = StepContext(run, run.step, run.epoch, progress, num_micro_batches,
                              weights=self._weights)
            self._ctx = ctx
        elif ctx is None or ctx.micro_batch != micro_batch - 1 or (
            ctx.num_micro_batches != num_micro_batches
        ):
            expected = "0" if ctx is None else f"{ctx.micro_batch + 1} of {ctx.num_micro_batches}"
            raise RuntimeError(
                f"micro_batch {micro_batch} of {num_micro_batches} out of order: expected "
                f"micro_batch {expected}"
            )
        self._flush_metrics(ctx)
        ctx.micro_batch = micro_batch
        ctx.loss_scale = 1.0 / num_micro_batches if loss_scale is None else loss_scale
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

        *outputs* are named tensors of this forward pass for the plugins (``logits``,
        ``gates``, ``corrections``, …); they join what modules passed to
        :func:`steadytrain.report`.
        """
        ctx = self._require_step("compute_loss")
        if outputs:
            ctx.outputs.update(outputs)
        ctx.task_loss = task_loss
        staged, step = ctx.staged, ctx.step
        total = task_loss
        if task_loss is not None:
            staged.append(("loss/task", task_loss))
        for key, terms in self._call("compute_regularizers", ctx):
            if not isinstance(terms, Mapping):
                raise TermError(
                    f"plugin instance {key!r}: compute_regularizers must return a mapping of "
                    f"term names to tensors, got {type(terms).__name__}"
                )
            weight = self._weights[key]
            for term, value in terms.items():
                self._check_term(key, term, value, task_loss, step)
                weighted = value * weight
                staged.append((f"reg/{key}/{term}", value))
                staged.append((f"reg_weighted/{key}/{term}", weighted))
                total = weighted if total is None else total + weighted
        if total is None:
            raise ValueError("compute_loss() got no task loss and no plugin returned a term")
        if ctx.loss_scale != 1.0:
            total = total * ctx.loss_scale
        staged.append(("loss/total", total))
        return total

    def _flush_metrics(self, ctx: StepContext) -> None:
        """Move what the step recorded into the metric store (after a backward)."""
        if ctx.staged:
            record, step = self.run.metrics.record, ctx.step
            for name, value in ctx.staged:
                record(name, value, step=step)
            ctx.staged.clear()

    def _check_term(
        self, key: str, term: str, value: Any, task_loss: torch.Tensor | None, step: int
    ) -> None:
        where = f"plugin instance {key!r}, term {term!r}, step {step}"
        if not isinstance(value, torch.Tensor):
            raise TermError(f"{where}: a term must be a tensor, got {type(value).__name__}")
        if value.numel() != 1:
            raise TermError(
                f"{where}: a term must be a scalar, got shape {tuple(value.shape)}; "
                "reduce it (mean or sum) in the plugin"
            )
        eager = self.finite_check == "step" or (
            self.finite_check == "auto" and value.device.type == "cpu"
        )
        # A non-finite task loss means the batch or the model broke, not this plugin: the
        # step is left to a guard (or to the host), as it would be without regularizers.
        if (
            eager
            and not bool(torch.isfinite(value.detach()).all())
            and (task_loss is None or bool(torch.isfinite(task_loss.detach()).all()))
        ):
            raise TermError(f"{where}: the term is {value.item()}, not finite")

    def after_backward(self) -> StepOutcome:
        """Gradients are complete: call ``after_backward`` and say whether to step.

        Call once per optimizer step, after the backward of the last micro-batch.
        """
        ctx = self._require_step("after_backward")
        if not ctx.is_last_micro_batch:
            raise RuntimeError(
                f"after_backward() after micro_batch {ctx.micro_batch} of "
                f"{ctx.num_micro_batches}: call it once, after the last micro-batch's backward"
            )
        self._flush_metrics(ctx)
        self._call("after_backward", ctx)
        self._outcome = StepOutcome(tuple(ctx.skip_requests))
        return self._outcome

    def consolidate(self) -> None:
        """The optimizer stepped (or skipped): call ``consolidate`` and close the step."""
        ctx = self._require_step("consolidate")
        if self._outcome is None:
            raise RuntimeError("consolidate() before after_backward(): call after_backward() "
                               "after the backward pass")
        outcome = ctx.outcome = self._outcome
        self._call("consolidate", ctx)
        self._flush_metrics(ctx)
        # The event needs the decision on the host: log it only when someone read it
        # already, so that a host stepping without a sync is not made to sync here.
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
        """The pipeline's state for ``torch.save``; loads with ``weights_only=True``."""
        return {
            "format": CHECKPOINT_FORMAT,
            "core_version": __version__,
            "counters": {
                "step": self.run.step,
                "epoch": self.run.epoch,
                "skipped_steps": self.run.skipped_steps,
            },
            "instances": {
                key: {
                    "plugin": _name_of(plugin),
                    "state": plugin.state_dict() if hasattr(plugin, "state_dict") else {},
                }
                for key, plugin in self._instances.items()
            },
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`; before ``setup`` the plugin states wait for it."""
        if not isinstance(state, Mapping) or state.get("format") != CHECKPOINT_FORMAT:
            raise CheckpointError(
                "not a steadytrain pipeline checkpoint (no 'format' "
                f"{CHECKPOINT_FORMAT} entry); pass what Pipeline.state_dict() returned"
            )
        saved = {key: entry["plugin"] for key, entry in state["instances"].items()}
        ours = {key: _name_of(p) for key, p in self._instances.items()}
        if saved != ours:
            problems = []
            if missing := sorted(set(ours) - set(saved)):
                problems.append(f"instances not in the checkpoint: {', '.join(missing)}")
            if extra := sorted(set(saved) - set(ours)):
                problems.append(f"instances only in the checkpoint: {', '.join(extra)}")
            problems += [
                f"instance {key!r} is {ours[key]} here but {saved[key]} in the checkpoint"
                for key in sorted(set(saved) & set(ours))
                if saved[key] != ours[key]
            ]
            raise CheckpointError(
                "the checkpoint was saved with another plugin set: " + "; ".join(problems)
                + ". Load it with the config it was saved with."
            )
        counters = state["counters"]
        self.run.step = counters["step"]
        self.run.epoch = counters["epoch"]
        self.run.skipped_steps = counters["skipped_steps"]
        if self._is_setup:
            self._load_instances(state["instances"])
        else:
            self._pending_state = state["instances"]

    def _load_instances(self, instances: Mapping[str, Any]) -> None:
        for key, plugin in self._instances.items():
            if hasattr(plugin, "load_state_dict"):
                try:
                    plugin.load_state_dict(instances[key]["state"])
                except CheckpointError:
                    raise
                except Exception as exc:
                    raise CheckpointError(
                        f"plugin instance {key!r} could not load its state: "
                        f"{type(exc).__name__}: {exc}"
                    ) from exc
