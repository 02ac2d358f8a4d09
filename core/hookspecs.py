"""The hook contract: the points of a training step at which a plugin runs.

This module is the first file a plugin author reads. Every hook below is called by the
pipeline, never by a plugin, and every hook takes keyword arguments only: ``run`` for the
lifecycle hooks, ``ctx`` for the step hooks. An implementation may leave an argument out
of its signature; pluggy then does not pass it.

Implement a hook by naming a method after it and marking it with
:data:`steadytrain.hookimpl`::

    class MyPenalty(steadytrain.Plugin):
        name = "my_penalty"

        @steadytrain.hookimpl
        def compute_regularizers(self, ctx):
            return {"l2": ctx.outputs["hidden"].pow(2).mean()}

Rules that hold for every hook:

* The core is gradient-free. No hook may call ``backward()``, step or zero an optimizer:
  the host owns the training loop. A plugin whose terms need the parameter gradients
  themselves to be differentiable (the host's ``backward(create_graph=True)``) declares
  ``needs_create_graph = True`` on its class, and the host asks the pipeline
  (:attr:`steadytrain.Pipeline.needs_create_graph`) before calling backward. A term that
  takes its own gradient inside the step (``torch.autograd.grad(..., create_graph=True)``,
  as ``gradient_penalty`` does) needs no such flag: the ordinary backward differentiates
  through it.
* Arguments never have defaults in an implementation: pluggy does not pass arguments
  that have defaults, so ``def before_step(self, ctx=None)`` would always see ``None``;
  such an implementation is refused when the plugin is registered, and so is a method
  named like a hook but not marked with ``@hookimpl`` (it would never run).
* ``ctx.id`` (and ``plugin.id``) is the id of the plugin instance whose hook runs: the
  name metrics, errors and checkpoints use.
* Hooks run in the order of the config's plugin list. ``@hookimpl(tryfirst=True)`` and
  ``@hookimpl(trylast=True)`` move an implementation to the front or the back; keep them
  for the few plugins that must run first or last (a non-finite guard, a metric of the
  final gradients). Hook wrappers are not supported.
* An exception raised in a hook is re-raised as :class:`steadytrain.HookError` naming the
  plugin instance, the hook and the step (a steadytrain error raised on purpose, such as
  a ``ConfigError``, keeps its type and gains a note saying the same); the pipeline's
  counters are left as they were before the failing call, so the host may save a
  checkpoint and stop.
* Tensors recorded with ``ctx.log`` stay on their device: logging a metric never syncs
  the host with an accelerator. Do not call ``.item()``, ``float()`` or ``bool()`` on a
  device tensor in a step hook.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

import pluggy
import torch

if TYPE_CHECKING:
    from .context import Run, StepContext

PROJECT_NAME = "steadytrain"

hookspec = pluggy.HookspecMarker(PROJECT_NAME)
hookimpl = pluggy.HookimplMarker(PROJECT_NAME)


@hookspec
def setup(run: Run) -> None:
    """Bind the plugin to the model and optimizers; called once, before the first step.

    ``run`` holds the model, the optimizers, the total number of steps when known, and
    the pipeline's counters (non-zero when a checkpoint was loaded before ``setup``).
    Resolve include/exclude filters here (``self.filter.select(...)``), allocate state
    (shadow weights, running statistics) and ask for forward taps with
    ``run.tap(self, patterns)``. Nothing may be computed here that depends on a batch.
    """


@hookspec
def teardown(run: Run) -> None:
    """Release what ``setup`` took; called once when the pipeline is closed.

    Forward taps are removed by the core. A plugin that swapped weights into the model
    must leave the model as the host expects it (training weights).
    """


@hookspec
def on_epoch_start(run: Run) -> None:
    """An epoch begins; ``run.epoch`` is its zero-based index."""


@hookspec
def on_epoch_end(run: Run) -> None:
    """An epoch ended; ``run.epoch`` is the index of the epoch that ended.

    Epoch-level work goes here: consolidation at epoch boundaries, epoch aggregates.
    """


@hookspec
def on_eval_start(run: Run) -> None:
    """The host is about to evaluate the model.

    A weight-averaging plugin swaps its averaged weights into the model here.
    """


@hookspec
def on_eval_end(run: Run) -> None:
    """Evaluation finished: undo what ``on_eval_start`` did (swap training weights back)."""


@hookspec
def before_step(ctx: StepContext) -> None:
    """A micro-batch is about to go through the forward pass.

    Called once per micro-batch: ``ctx.micro_batch`` counts from 0 to
    ``ctx.num_micro_batches - 1`` within one optimizer step. Schedules, curricula,
    temperatures and per-step bookkeeping go here. ``ctx.task_loss`` and ``ctx.outputs``
    are not set yet; ``ctx.batch`` and ``ctx.targets`` are, when the host passed them.
    """


@hookspec
def compute_regularizers(ctx: StepContext) -> Mapping[str, torch.Tensor] | None:
    """Return the loss terms of this plugin instance for the current micro-batch.

    Called after the forward pass and before the single backward, once per micro-batch.
    ``ctx.task_loss``, ``ctx.outputs`` (the named tensors the host passed and modules
    reported; ``ctx.reports(name, option=...)`` lists every report of a name in call
    order) and ``ctx.tapped(module)`` (the outputs of a tapped module, one per call) are
    set.

    Return a mapping of term name to a scalar tensor that is part of the forward graph,
    or ``None`` for no term this time. Return raw terms: the core multiplies each by the
    instance's ``weight`` (a constant or a schedule), adds them to the task loss in a fixed
    order (the config's order, then the term names in the order returned), scales the
    sum for gradient accumulation and hands it to the host for one backward. Raw and
    weighted terms are recorded as metrics ``reg/<instance>/<term>`` and
    ``reg_weighted/<instance>/<term>``.

    A term that is not a tensor, has more than one element, does not require grad while
    the task loss does (a constant), or is not finite while the task loss is finite is a
    :class:`~steadytrain.TermError` naming the instance and the term. (When the task
    loss itself is not finite the batch or the model broke, and the step is left to a
    guard plugin or to the host.)
    """


@hookspec
def after_backward(ctx: StepContext) -> None:
    """Gradients of the whole optimizer step are ready; the optimizer has not stepped.

    Called once per optimizer step, after the backward of the last micro-batch. Clip or
    inspect gradients here. ``ctx.step_loss`` is the step's task loss (the mean over its
    micro-batches, detached, and under ``torch.distributed`` over the ranks), recorded once
    by the core for every plugin. To ask the host
    not to step the optimizer this time, call ``ctx.request_skip(reason, when=...)``;
    ``when`` may be a device tensor so that the decision costs no host sync until the host
    reads it.

    Take gradient norms with ``ctx.gradient_norms(params)`` (per tensor) and
    ``ctx.gradient_norm(params)`` (total) rather than computing them: every plugin of the
    step shares one fused computation. A plugin whose hook changes the gradients declares
    ``rescales_gradients = True`` (the core then drops the shared norms after its hook) or
    calls ``ctx.gradients_changed()``.
    """


@hookspec
def consolidate(ctx: StepContext) -> None:
    """The optimizer stepped (or the step was skipped: ``ctx.skip_flag`` says which).

    Update averages of the weights, move memories, decay buffers. A plugin that averages
    weights must not update on a skipped step. ``ctx.skip_flag`` is the decision as a bool
    or a device tensor (use it in ``torch.where`` to stay on the device); ``ctx.skipped``
    is the same as a Python bool and syncs the host once when the decision is a tensor.
    """


STEP_HOOKS = ("before_step", "compute_regularizers", "after_backward", "consolidate")
LIFECYCLE_HOOKS = (
    "setup",
    "teardown",
    "on_epoch_start",
    "on_epoch_end",
    "on_eval_start",
    "on_eval_end",
)
HOOK_NAMES = STEP_HOOKS + LIFECYCLE_HOOKS
