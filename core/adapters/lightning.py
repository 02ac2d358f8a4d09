"""PyTorch Lightning: a callback drives the pipeline, a mixin adds its terms to the loss.

Lightning callbacks cannot change the loss, so the module adds the regularizer terms itself
with one call in ``training_step``; the callback does everything else::

    class Classifier(PipelineLossMixin, lightning.pytorch.LightningModule):
        def training_step(self, batch, batch_idx):
            x, y = batch
            logits = self.net(x)
            return self.pipeline_loss(F.cross_entropy(logits, y), outputs={"logits": logits})

    trainer = lightning.pytorch.Trainer(callbacks=[PipelineCallback("stability.toml")])

Where each pipeline call happens (automatic optimization, one process):

* ``on_fit_start``: ``setup(module, trainer.optimizers, total_steps=estimated_stepping_batches)``;
* ``on_train_epoch_start`` / ``on_train_epoch_end``: ``epoch_start(current_epoch)`` /
  ``epoch_end()``;
* ``on_train_batch_start``: ``before_step`` for micro-batch ``batch_idx %
  accumulate_grad_batches`` with ``loss_scale=1`` (Lightning divides the loss by
  ``accumulate_grad_batches`` itself); ``pipeline_loss`` in ``training_step`` is
  ``compute_loss``;
* ``on_before_optimizer_step``: ``after_backward`` (Lightning calls it inside the optimizer
  step, once per step, after unscaling and before its own clipping); a skip request turns
  the update that follows into a no-op;
* ``on_train_batch_end`` of the batch whose optimizer step ran: ``consolidate``, and the
  metrics go to ``LightningModule.log_dict`` every ``log_every_n_steps`` steps;
* validation, test and predict run inside ``pipe.evaluating()``;
* the callback's ``state_dict`` is the pipeline's, so Lightning checkpoints carry it and
  ``Trainer.fit(ckpt_path=...)`` resumes it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch

from steadytrain import (
    ConfigError,
    Pipeline,
    Registry,
    RunConfig,
    StepContext,
    StepOutcome,
    UsageError,
    get_logger,
)

__all__ = ["PipelineCallback", "PipelineLossMixin"]

log = get_logger()

#: Plugins that clip gradients; Lightning's own clipping would clip them a second time.
#: The checkpoint entry that ``save_eval_weights`` adds.
EVAL_WEIGHTS_KEY = "eval_state_dict"


def default_split_batch(batch: Any) -> tuple[Any, Any]:
    """``(inputs, targets)`` of a pair; any other batch is the inputs, without targets."""
    if isinstance(batch, (tuple, list)) and len(batch) == 2:
        return batch[0], batch[1]
    return batch, None


def _clone(state: Any) -> Any:
    """*state* with every tensor copied: a checkpoint must not change after it is taken."""
    if isinstance(state, torch.Tensor):
        return state.detach().clone()
    if isinstance(state, Mapping):
        return {key: _clone(value) for key, value in state.items()}
    if isinstance(state, (list, tuple)):
        return type(state)(_clone(value) for value in state)
    return state


def _derives_from(loss: torch.Tensor, source: torch.Tensor) -> bool:
    """Whether *source* is part of the graph that ``loss.backward()`` walks."""
    target = source.grad_fn
    if target is None:
        return True  # no graph to find: nothing can be said
    pending, seen = [loss.grad_fn], set()
    while pending:
        node = pending.pop()
        if node is None or node in seen:
            continue
        if node is target:
            return True
        seen.add(node)
        pending.extend(parent for parent, _ in node.next_functions)
    return False


def _hold_step(
    optimizer: torch.optim.Optimizer,
    outcome: StepOutcome,
    scaler: torch.amp.GradScaler | None,
) -> bool:
    """Make the optimizer update that is about to run a no-op where *outcome* says skip.

    Lightning calls ``on_before_optimizer_step`` inside its optimizer step, so the step
    cannot be left out; it is emptied instead, with the semantics of
    :func:`steadytrain.step_optimizer`:

    * under a ``GradScaler`` (which Lightning has unscaled with already) the decision joins
      the scaler's overflow record, on the device: the scaler skips the update and backs
      off its scale, as for an overflow;
    * a fused optimizer that already has state takes the decision on the device as
      ``found_inf`` (returns ``True``: remove it after the step);
    * any other optimizer reads the decision (one host sync) and, to skip, loses its
      gradients: every torch optimizer leaves a parameter without a gradient as it is,
      moments and step count included.
    """
    if not outcome.requests:
        return False
    flag = outcome.skip if outcome.decided else outcome.flag
    if scaler is not None:
        # the record step_optimizer(scaler=...) uses too
        record = scaler._per_optimizer_states[id(optimizer)]["found_inf_per_device"]
        for found_inf in record.values():
            found_inf.copy_(torch.maximum(found_inf, torch.as_tensor(flag).to(found_inf)))
        return False
    if (
        isinstance(flag, torch.Tensor) and optimizer.state
        and getattr(optimizer, "_step_supports_amp_scaling", False)
    ):
        optimizer.found_inf = flag.detach().reshape(()).to(torch.float32)  # type: ignore[attr-defined]
        return True
    if outcome.skip:  # read once, and known from here on (to the EMA, to the event log)
        for group in optimizer.param_groups:
            for param in group["params"]:
                param.grad = None
    return False


class PipelineCallback(pl.Callback):
    """Runs a steadytrain pipeline inside ``lightning.pytorch.Trainer``.

    *config* is what :meth:`steadytrain.Pipeline.from_config` takes (a path, a mapping or a
    :class:`steadytrain.RunConfig`); *registry* and *disable* are passed on to it. The
    module adds the terms to its loss with :meth:`PipelineLossMixin.pipeline_loss`.

    *split_batch* turns a training batch into the ``(batch, targets)`` the plugins see as
    ``ctx.batch`` and ``ctx.targets``; by default a pair ``(x, y)`` is split and any other
    batch is passed whole, without targets. Metrics are logged with ``log_dict`` every
    ``log_every_n_steps`` optimizer steps, their names prefixed with *prefix*. With
    *save_eval_weights* every checkpoint also holds the weights the model evaluates with
    (the EMA average) under ``"eval_state_dict"``; its ``state_dict`` keeps the training
    weights either way.
    """

    def __init__(
        self,
        config: RunConfig | Mapping[str, Any] | str | Path,
        *,
        registry: Registry | None = None,
        disable: Iterable[str] = (),
        split_batch: Callable[[Any], tuple[Any, Any]] = default_split_batch,
        prefix: str = "",
        save_eval_weights: bool = False,
    ) -> None:
        self._config, self._registry, self._disable = config, registry, tuple(disable)
        self.split_batch = split_batch
        self.prefix = prefix
        self.save_eval_weights = save_eval_weights
        # Built now: a broken config fails here, and configure_optimizers can reach the
        # plugins' parameters through it before the Trainer starts.
        self._pipeline = self._build()
        self._stage: str | None = None
        self._state: Mapping[str, Any] | None = None
        self._total_steps: int | None = None
        self._eval: contextlib.ExitStack | None = None
        self._reset_step()

    def _build(self) -> Pipeline:
        return Pipeline.from_config(self._config, registry=self._registry, disable=self._disable)

    def _reset_step(self) -> None:
        self._ctx: StepContext | None = None
        self._window_end = False
        self._loss: torch.Tensor | None = None
        self._stepped = False
        self._found_inf: torch.optim.Optimizer | None = None

    @property
    def pipeline(self) -> Pipeline:
        """The pipeline: before the first stage the one the next fit sets up, during a stage
        (fit, validate, test, predict) the one bound to it, afterwards the closed one.

        Before fitting, ``pipeline.parameters()`` gives the plugins' parameters for
        ``configure_optimizers``. After ``Trainer.fit`` it still answers ``metrics()``,
        ``run`` and ``plugins`` (for instance ``plugins["ema"].averaged_state_dict()``).
        """
        return self._pipeline

    # -- lifecycle --------------------------------------------------------------------

    def _open(self, trainer: pl.Trainer, module: pl.LightningModule, stage: str) -> Pipeline:
        pipeline = self._build() if self._pipeline.is_setup else self._pipeline
        if self._state is not None:
            pipeline.load_state_dict(self._state)
        if stage == "fit":
            optimizers = trainer.optimizers
            # inf, or -1 for data without a length and no max_steps: unknown
            estimate = trainer.estimated_stepping_batches
            total = int(estimate) if 1 <= estimate < float("inf") else None
            self._total_steps = total
        else:
            # Evaluation takes no step: the progress schedules only need a horizon.
            optimizers, total = (), self._total_steps or max(pipeline.run.step, 1)
        pipeline.setup(module, optimizers, total_steps=total)
        self._pipeline, self._stage = pipeline, stage
        self._term_ids = list(pipeline.term_plugins)
        self._graph_checked = False
        return pipeline

    def _close(self) -> None:
        self._exit_eval()
        if self._stage is not None:
            if self._ctx is None:  # inside a step (an exception) the last saved state stays
                self._state = _clone(self.pipeline.state_dict())
            self.pipeline.close()
        self._stage = None
        self._reset_step()

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._check_fit(trainer, pl_module)
        self._close()
        pipeline = self._open(trainer, pl_module, "fit")
        owned = {id(p) for p in pipeline.parameters()}
        optimized = {id(p) for opt in trainer.optimizers for g in opt.param_groups
                     for p in g["params"]}
        if owned - optimized:
            raise UsageError(
                "PipelineCallback: plugins own parameters that no optimizer trains; add "
                "self.pipeline.parameters() to the optimizer in configure_optimizers"
            )

    def _check_fit(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        pipeline = self.pipeline
        if not module.automatic_optimization:
            raise UsageError(
                f"{type(module).__name__}: manual optimization (automatic_optimization = "
                "False) is not supported by PipelineCallback: it maps the pipeline onto "
                "Lightning's automatic step. Use automatic optimization, or call the pipeline "
                "in training_step as the plain loop does, without the callback"
            )
        if trainer.world_size > 1:
            raise UsageError(
                f"PipelineCallback runs in one process; this Trainer has world_size "
                f"{trainer.world_size}. Train with devices=1"
            )
        adders = list(pipeline.term_plugins)
        if adders and not isinstance(module, PipelineLossMixin):
            raise UsageError(
                f"{type(module).__name__}: plugin instance(s) {', '.join(adders)} add terms "
                "to the loss, but the module cannot take them: subclass PipelineLossMixin and "
                "return self.pipeline_loss(task_loss, outputs=...) from training_step"
            )
        clip = trainer.gradient_clip_val
        clippers = pipeline.gradient_rescalers
        if clip and clippers:
            raise ConfigError(
                f"Trainer(gradient_clip_val={clip}) and plugin instance(s) "
                f"{', '.join(clippers)} both clip gradients: Lightning clips after the "
                "pipeline's after_backward, so the gradients would be clipped twice. Remove "
                "gradient_clip_val from the Trainer or the clipping plugin from the config"
            )
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        unscales_itself = [type(opt).__name__ for opt in trainer.optimizers
                           if getattr(opt, "_step_supports_amp_scaling", False)]
        if scaler is not None and unscales_itself:
            raise UsageError(
                f"a GradScaler and the fused optimizer {unscales_itself[0]}: the gradients "
                "reach on_before_optimizer_step still scaled, so the pipeline would clip and "
                "check scaled gradients. Use a non-fused optimizer or precision='bf16-mixed'"
            )

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.pipeline.epoch_start(trainer.current_epoch)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == self._stage:
            self._close()

    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        # Training weights back into the model, as after a normal end.
        self._close()

    # -- the step ---------------------------------------------------------------------

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        pipeline = self.pipeline
        every = trainer.accumulate_grad_batches
        micro = batch_idx % every
        remaining = trainer.num_training_batches - (batch_idx - micro)
        size = int(min(every, remaining))
        is_last = trainer.fit_loop.epoch_loop.batch_progress.is_last_batch
        if is_last and micro < size - 1:
            raise UsageError(
                f"the epoch ended at batch {batch_idx}, inside an accumulation window of "
                f"{every} batches whose length could not be known in advance (the dataloader "
                "has no length). Give the dataloader a __len__, or make its number of batches "
                "a multiple of accumulate_grad_batches"
            )
        inputs, targets = self.split_batch(batch)
        self._ctx = pipeline.before_step(
            batch=inputs, targets=targets, micro_batch=micro, num_micro_batches=size,
            loss_scale=1.0,
        )
        self._window_end = micro == size - 1
        self._loss = None

    def _compute_loss(
        self,
        module: pl.LightningModule,
        task_loss: torch.Tensor | None,
        outputs: Mapping[str, Any] | None = None,
    ) -> torch.Tensor:
        """The pipeline's loss of the micro-batch that is open; see ``pipeline_loss``."""
        if self._ctx is None or not module.trainer.training:
            raise UsageError(
                "pipeline_loss() outside a training step: call it in training_step only; in "
                "validation_step and test_step compute the task loss alone"
            )
        self._loss = self.pipeline.compute_loss(task_loss, outputs=outputs)
        return self._loss

    def on_before_backward(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: torch.Tensor
    ) -> None:
        if self._loss is None:
            if self._term_ids:
                raise UsageError(
                    f"{type(pl_module).__name__}.training_step did not call "
                    f"self.pipeline_loss() at step {self.pipeline.run.step}: plugin "
                    f"instance(s) {', '.join(self._term_ids)} would run without their terms. "
                    "Return self.pipeline_loss(task_loss, outputs=...) from training_step"
                )
        elif not self._graph_checked:
            # Once per fit: the walk over the graph costs about a backward's bookkeeping.
            if not _derives_from(loss, self._loss):
                raise UsageError(
                    f"{type(pl_module).__name__}.training_step called self.pipeline_loss() "
                    "but returned a loss that does not contain its value: the regularizer "
                    "terms would not be trained. Return what pipeline_loss() returned (or a loss "
                    "built from it)"
                )
            self._graph_checked = True

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        if _hold_step(optimizer, self.pipeline.after_backward(), scaler):
            self._found_inf = optimizer
        self._stepped = True

    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        if self._found_inf is not None:
            del self._found_inf.found_inf
        if not self._stepped:
            if self._window_end:
                raise UsageError(
                    f"batch {batch_idx} ends an accumulation window but its optimizer step "
                    "did not reach on_before_optimizer_step: an optimizer_step override must "
                    "call optimizer.step(closure=optimizer_closure)"
                )
            return  # accumulating
        pipeline = self.pipeline
        self._reset_step()
        pipeline.consolidate()
        if trainer.global_step % trainer.log_every_n_steps == 0:
            metrics = pipeline.metrics()
            if metrics:
                pl_module.log_dict(
                    {self.prefix + name: value for name, value in metrics.items()},
                    on_step=True, on_epoch=False,
                )

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._ctx is not None:
            raise UsageError(
                f"the epoch ended inside optimizer step {self.pipeline.run.step}: the step "
                "was opened but Lightning never stepped the optimizer (did on_train_batch_start "
                "return -1?). End epochs at the boundary of an accumulation window"
            )
        self.pipeline.epoch_end()

    # -- evaluation -------------------------------------------------------------------

    def _between_steps(self, what: str, advice: str) -> None:
        """Refuse *what* while an optimizer step is open (inside an accumulation window)."""
        if self._ctx is not None:
            raise UsageError(
                f"{what} inside optimizer step {self._ctx.step}, after micro-batch "
                f"{self._ctx.micro_batch + 1} of {self._ctx.num_micro_batches} of its "
                f"accumulation window: the pipeline's state is only whole between steps. "
                f"{advice}"
            )

    def _enter_eval(self, trainer: pl.Trainer, module: pl.LightningModule, stage: str) -> None:
        self._between_steps(
            "validation", "Make val_check_interval a multiple of accumulate_grad_batches")
        if self._stage is None:
            self._open(trainer, module, stage)
        if self._eval is None:
            stack = contextlib.ExitStack()
            stack.enter_context(self.pipeline.evaluating())
            self._eval = stack

    def _exit_eval(self) -> None:
        if self._eval is not None:
            stack, self._eval = self._eval, None
            stack.close()

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._enter_eval(trainer, pl_module, "validate")

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._exit_eval()

    def on_test_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._enter_eval(trainer, pl_module, "test")

    def on_test_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._exit_eval()

    def on_predict_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._enter_eval(trainer, pl_module, "predict")

    def on_predict_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._exit_eval()

    # -- checkpoints ------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        self._between_steps(
            "a checkpoint", "Save after an optimizer step: ModelCheckpoint(every_n_train_steps"
            "=...) or at epoch ends, not by time or from inside the window")
        if self._stage is not None:
            return _clone(self.pipeline.state_dict())
        return _clone(dict(self._state or {}))

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Keep *state_dict* for the pipeline of the next stage (Lightning restores
        checkpoints before a stage starts)."""
        self._state = state_dict

    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        if self._stage is None:
            if self.save_eval_weights:
                raise UsageError(
                    "PipelineCallback(save_eval_weights=True): this checkpoint is written "
                    "outside fit, validate, test and predict, when no pipeline is bound to "
                    "the model, so it cannot hold the evaluation weights. Save it during the "
                    "stage (ModelCheckpoint), or take them from "
                    "callback.pipeline.plugins[<ema id>].averaged_state_dict()"
                )
            return
        evaluating = self._eval is not None
        if evaluating:
            # Saved from inside evaluation: the model holds the evaluation weights, but
            # the checkpoint's state_dict must be the training weights, for resuming.
            self._exit_eval()
            checkpoint["state_dict"] = _clone(pl_module.state_dict())
        if self.save_eval_weights:
            with self.pipeline.evaluating():
                checkpoint[EVAL_WEIGHTS_KEY] = _clone(pl_module.state_dict())
        if evaluating:
            self._enter_eval(trainer, pl_module, self._stage)

    def on_load_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        if not checkpoint.get("callbacks", {}).get(self.state_key):
            log.warning(
                "lightning.no_pipeline_state",
                detail="the checkpoint holds no pipeline state; the plugins start afresh",
            )


class PipelineLossMixin:
    """Mixin for a ``LightningModule`` trained with a :class:`PipelineCallback`.

    Put it before ``LightningModule`` in the bases and return :meth:`pipeline_loss` from
    ``training_step``.
    """

    def _pipeline_callback(self) -> PipelineCallback:
        trainer = self.trainer  # type: ignore[attr-defined]
        found = [c for c in trainer.callbacks if isinstance(c, PipelineCallback)]
        if len(found) != 1:
            raise UsageError(
                f"{type(self).__name__}.pipeline_loss() needs exactly one PipelineCallback "
                f"in Trainer(callbacks=...), found {len(found)}"
            )
        return found[0]

    @property
    def pipeline(self) -> Pipeline:
        """The pipeline of the Trainer's :class:`PipelineCallback`."""
        return self._pipeline_callback().pipeline

    def pipeline_loss(
        self, task_loss: torch.Tensor | None, *, outputs: Mapping[str, Any] | None = None
    ) -> torch.Tensor:
        """``task_loss + Σ weight · term`` of this micro-batch; return it from ``training_step``.

        *outputs* are the named tensors of the forward pass the plugins read (``logits``,
        ``gates``, ...), as for :meth:`steadytrain.Pipeline.compute_loss`. Lightning divides
        the returned loss by ``accumulate_grad_batches``; it is not divided here. Call it
        once per ``training_step``.
        """
        return self._pipeline_callback()._compute_loss(self, task_loss, outputs)
