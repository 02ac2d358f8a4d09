"""Scheduled consolidation: move memories at fixed points of training, never at random.

What it does
    Calls ``consolidate()`` on every module of the model that implements
    :class:`steadytrain.nn.Consolidating` (for instance :class:`steadytrain.nn.DualMemory`,
    which copies well-used short-term memories into long-term memory), every ``interval``
    optimizer steps and/or at the end of every epoch. What each module reports is recorded
    as metrics ``<id>/<module>/<stat>`` (``<id>/<stat>`` for the model itself), and each
    run emits the structlog event ``consolidation.ran``.

When to use it
    With models that keep memories outside their parameters and move them from one store
    to another (short-term to long-term memory). The memory-model document counts random
    consolidation among the discontinuous operations it blames for its 4-5× loss
    oscillations, and asks for consolidation at regular intervals instead.

Hyperparameters
    ``interval`` (default 500 optimizer steps, 0 to turn it off) and ``at_epoch_end``
    (default false); at least one must be on. The default interval is this plugin's
    choice: the source names no value. ``include``/``exclude`` select modules by name
    among those that implement the protocol; each selected module's ``consolidate`` must
    be callable without arguments, which ``setup`` checks.

Source
    The memory-model stability document (seed 000), section 3 "Stable Memory
    Consolidation": consolidate "at regular intervals, not randomly", every
    ``config.consolidation_interval`` steps, a value the document does not give.

Caveats
    A skipped optimizer step (non-finite gradients, a loss spike) does not consolidate:
    its forward pass is not trusted, and a guard may be restoring the model. A
    consolidation that falls due on a skipped step waits for the next step that
    completes, and the schedule stays on multiples of ``interval``. An epoch that ends
    right after an interval consolidation does not consolidate a second time.
    Consolidating a :class:`~steadytrain.nn.DualMemory` syncs the host once (to count
    its candidates); that happens every ``interval`` steps, not every step.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Mapping
from typing import Any

import attrs
import torch

import steadytrain
from steadytrain.nn import consolidating_modules
from steadytrain.validators import boolean, non_negative_int

log = steadytrain.get_logger()

Record = Callable[[str, torch.Tensor | float], None]


def consolidate_modules(
    modules: Mapping[str, steadytrain.nn.Consolidating], record: Record | None = None
) -> dict[str, Mapping[str, torch.Tensor | float]]:
    """Call ``consolidate()`` on each module by name, without gradients; return what moved.

    *record*, when given, receives every statistic as ``("<module>/<stat>", value)``
    (``"<stat>"`` for the root module, whose name is ``""``).
    """
    moved = {}
    with torch.no_grad():
        for name, module in modules.items():
            stats = module.consolidate()
            if not isinstance(stats, Mapping):
                raise TypeError(
                    f"module {name!r} ({type(module).__name__}): consolidate() must return a "
                    f"mapping of statistics, got {type(stats).__name__}"
                )
            moved[name] = stats
            if record is not None:
                for stat, value in stats.items():
                    record(f"{name}/{stat}" if name else stat, value)
    return moved


class ScheduledConsolidation(steadytrain.Plugin):
    """Consolidate the model's memory modules every N optimizer steps or at epoch ends."""

    name = "scheduled_consolidation"

    @attrs.frozen
    class Config:
        interval: int = attrs.field(default=500, validator=non_negative_int)
        at_epoch_end: bool = attrs.field(
            default=False, validator=boolean
        )

        def __attrs_post_init__(self) -> None:
            if self.interval == 0 and not self.at_epoch_end:
                raise steadytrain.OptionError(
                    "interval",
                    "is 0 and at_epoch_end is false, so nothing would ever consolidate; "
                    "set interval >= 1 or at_epoch_end = true",
                )

    @steadytrain.hookimpl
    def setup(self, run: steadytrain.Run) -> None:
        if run.model is None:
            raise steadytrain.ConfigError(
                f"{self.id}: no model is bound; pass the model to Pipeline.setup()"
            )
        found = consolidating_modules(run.model)
        if not found:
            raise steadytrain.ConfigError(
                f"{self.id}: the model has no module with a consolidate() method "
                "(steadytrain.nn.Consolidating, e.g. steadytrain.nn.DualMemory); add one "
                "or remove this plugin"
            )
        names = self.filter.select(found, kind="consolidating module")
        self.modules = {name: found[name] for name in names}
        for name, module in self.modules.items():
            self._check_protocol(name, module)
        self.last_step: int | None = None
        self.pending = False
        self.runs = 0

    def _check_protocol(self, name: str, module: torch.nn.Module) -> None:
        """Refuse a module whose ``consolidate`` cannot be called without arguments."""
        method = module.consolidate
        # A submodule's own signature is (*args, **kwargs): what it needs is its forward's.
        if isinstance(method, torch.nn.Module):
            method = method.forward
        try:
            signature = inspect.signature(method)
        except TypeError:
            problem = f"its consolidate is a {type(method).__name__}, not a method"
        else:
            try:
                signature.bind()
                return
            except TypeError:
                problem = f"its consolidate{signature} takes required arguments"
        what = f"module {name!r}" if name else "the model"
        hint = f"exclude = [{name!r}]" if name else "remove this plugin"
        raise steadytrain.ConfigError(
            f"{self.id}: {what} ({type(module).__name__}) does not implement "
            f"steadytrain.nn.Consolidating: {problem}, and the plugin calls consolidate() "
            f"with none; give it a consolidate() that needs no arguments, or leave it out "
            f"({hint})"
        )

    @steadytrain.hookimpl
    def consolidate(self, ctx: steadytrain.StepContext) -> None:
        done = ctx.step + 1
        interval = self.config.interval
        if interval and done % interval == 0:
            self.pending = True
        if self.pending and not ctx.skipped:
            self._run(done, "interval", ctx.run, ctx.log)

    @steadytrain.hookimpl
    def on_epoch_end(self, run: steadytrain.Run) -> None:
        if self.config.at_epoch_end and self.last_step != run.step:
            self._run(run.step, "epoch_end", run, functools.partial(run.log, self))

    def _run(self, step: int, trigger: str, run: steadytrain.Run, record: Record) -> None:
        consolidate_modules(self.modules, record)
        self.pending = False
        self.last_step = step
        self.runs += 1
        log.info(
            "consolidation.ran", id=self.id, step=step, epoch=run.epoch,
            trigger=trigger, modules=list(self.modules),
        )

    def state_dict(self) -> dict[str, Any]:
        return {"last_step": self.last_step, "pending": self.pending, "runs": self.runs}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.check_state(state, ("last_step", "pending", "runs"))
        self.last_step = state["last_step"]
        self.pending = state["pending"]
        self.runs = state["runs"]

    @classmethod
    def conformance_fixture(cls) -> steadytrain.testing.Fixture:
        """The conformance kit trains a memory model that consolidates on step 2 (a host
        sync, documented), so that the step after it is the one watched for syncs."""
        from steadytrain.testing import memory_model_fixture

        return memory_model_fixture({"interval": 2}, steps=3, warmup_steps=2)
