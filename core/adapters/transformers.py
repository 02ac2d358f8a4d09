"""The Hugging Face ``Trainer`` with a steadytrain pipeline.

    from steadytrain.adapters.transformers import SteadytrainTrainer

    args = TrainingArguments(output_dir="out", max_grad_norm=0, ...)
    trainer = SteadytrainTrainer(model=model, args=args, train_dataset=data, pipeline=pipe)
    trainer.train()

:class:`SteadytrainMixin` (first among the bases of any ``Trainer`` subclass) routes the
loss through the pipeline and installs a :class:`SteadytrainCallback`, which calls the
pipeline at the Trainer's hook points:

=================================  ======================================================
Trainer                            pipeline
=================================  ======================================================
``on_train_begin``                 ``setup(model, optimizer, total_steps=max_steps)``,
                                   after loading the state of ``resume_from_checkpoint``
``on_epoch_begin/end``             ``epoch_start()`` / ``epoch_end()``
``compute_loss`` (each micro-      ``before_step`` before the forward pass, then
batch of the training step)        ``compute_loss(task_loss, outputs=model outputs)``
``on_pre_optimizer_step``          ``after_backward()`` (after the Trainer's
                                   ``max_grad_norm`` clip, which unscales fp16 gradients)
``optimizer.step()``               :func:`steadytrain.adapters.accelerate.step_optimizer`
``on_optimizer_step``              ``consolidate()``
``evaluate`` / ``predict``         inside ``evaluating()``
``log`` (training logs)            ``metrics()`` joins the Trainer's logs
``on_save``                        ``state_dict()`` into ``checkpoint-N/steadytrain.pt``
=================================  ======================================================
"""

from __future__ import annotations

import contextlib
import os
import types
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from accelerate.optimizer import AcceleratedOptimizer
from transformers import Trainer, TrainerCallback, TrainerControl, TrainerState, TrainingArguments
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, get_last_checkpoint

import steadytrain

from .accelerate import step_optimizer

__all__ = ["STATE_FILE", "SteadytrainCallback", "SteadytrainMixin",
           "SteadytrainTrainer"]

if not hasattr(Trainer, "loss_is_scaled_for_ga"):
    raise ImportError(
        "steadytrain.adapters.transformers needs a transformers whose Trainer has "
        "loss_is_scaled_for_ga (5.24 is tested): pip install 'transformers>=5.24'"
    )

#: The pipeline's state inside each of the Trainer's checkpoint folders.
STATE_FILE = "steadytrain.pt"


def _check_arguments(pipeline: steadytrain.Pipeline, args: TrainingArguments) -> None:
    """Raise :class:`steadytrain.ConfigError` for training arguments that defeat a plugin."""
    clippers = list(pipeline.gradient_rescalers)
    if clippers and args.max_grad_norm and args.max_grad_norm > 0:
        raise steadytrain.ConfigError(
            f"TrainingArguments.max_grad_norm is {args.max_grad_norm} (1.0 unless set) and "
            f"plugin instance(s) {', '.join(map(repr, clippers))} clip the gradients too: the "
            "Trainer clips every gradient before the plugins see them, so their thresholds "
            "would act on gradients already clipped. Pass max_grad_norm=0 to "
            "TrainingArguments and let the plugin clip, or remove the instance"
        )
    if args.deepspeed:
        raise steadytrain.ConfigError(
            "TrainingArguments.deepspeed: DeepSpeed partitions and steps the gradients "
            "itself, out of the plugins' reach; train without it"
        )


class SteadytrainCallback(TrainerCallback):
    """Calls a pipeline at the hook points of a ``Trainer``; :class:`SteadytrainMixin`
    installs it and feeds it the loss of each micro-batch."""

    def __init__(self, pipeline: steadytrain.Pipeline) -> None:
        if not isinstance(pipeline, steadytrain.Pipeline):
            raise TypeError(
                f"pipeline must be a steadytrain.Pipeline, got {type(pipeline).__name__}"
            )
        if pipeline.is_setup:
            raise steadytrain.UsageError(
                "the pipeline is bound to another run already (setup() was called); build "
                "a new Pipeline for each Trainer"
            )
        self.pipeline = pipeline
        #: The checkpoint folder ``train()`` resumes from; set by :class:`SteadytrainMixin`.
        self.resume_from: str | None = None
        self._micro_batch: int | None = None  # next micro-batch of the open step, or None
        self._outcome: steadytrain.StepOutcome | None = None
        self._optimizer: AcceleratedOptimizer | None = None

    @property
    def in_step(self) -> bool:
        """Whether the Trainer is inside a training step (between its first micro-batch and
        the optimizer step)."""
        return self._micro_batch is not None

    # -- the run ------------------------------------------------------------------------

    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
        model: torch.nn.Module | None = None, optimizer: AcceleratedOptimizer | None = None,
        **kwargs: Any,
    ) -> None:
        pipe = self.pipeline
        if pipe.is_setup:
            raise steadytrain.UsageError(
                "train() was called again with the same pipeline; build a new Trainer and "
                "Pipeline, and pass resume_from_checkpoint to continue a run"
            )
        _check_arguments(pipe, args)
        if self.resume_from is not None:
            pipe.load_state_dict(self._read_state(self.resume_from))
        pipe.setup(model, optimizer.optimizer, total_steps=state.max_steps)
        if pipe.run.step != state.global_step:
            raise steadytrain.CheckpointError(
                f"{self.resume_from}: the pipeline's state is at step {pipe.run.step} but the "
                f"Trainer's at step {state.global_step}; the checkpoint folder mixes two runs"
            )
        if self._optimizer is not optimizer:
            self.route_steps(optimizer)

    def route_steps(self, optimizer: AcceleratedOptimizer) -> None:
        """Make *optimizer*'s ``step()`` honour the pipeline's skip decision.

        The Trainer calls ``optimizer.step()`` on every optimizer step; from now on that
        call goes through :func:`~steadytrain.adapters.accelerate.step_optimizer` with the
        outcome of the step's ``after_backward()``. Called before the Trainer creates its
        learning-rate scheduler, whose own wrapper of ``step()`` then wraps this one.
        """
        callback = self

        def step(opt: AcceleratedOptimizer, closure: Any = None) -> None:
            outcome, callback._outcome = callback._outcome, None
            if outcome is None:
                raise steadytrain.UsageError(
                    "the Trainer's optimizer was stepped outside the Trainer's optimizer "
                    "step (no on_pre_optimizer_step before it): the plugins would not see "
                    "that step. Leave stepping to the Trainer"
                )
            step_optimizer(opt, outcome)

        optimizer.step = types.MethodType(step, optimizer)
        self._optimizer = optimizer

    def on_epoch_begin(self, args: TrainingArguments, state: TrainerState,
                       control: TrainerControl, **kwargs: Any) -> None:
        self.pipeline.epoch_start()

    def on_epoch_end(self, args: TrainingArguments, state: TrainerState,
                     control: TrainerControl, **kwargs: Any) -> None:
        self.pipeline.epoch_end()

    # -- the step -----------------------------------------------------------------------

    def on_step_begin(self, args: TrainingArguments, state: TrainerState,
                      control: TrainerControl, **kwargs: Any) -> None:
        self._micro_batch = 0

    def loss(
        self,
        task_loss: torch.Tensor,
        outputs: Any,
        *,
        num_micro_batches: int,
        window_normalized: bool,
    ) -> torch.Tensor:
        """The loss of the micro-batch whose ``before_micro_batch`` ran last, with the
        plugins' terms, scaled the way the Trainer expects it back from ``compute_loss``.

        *window_normalized* says that *task_loss* is already divided by the size of the
        whole step (``num_items_in_batch``), so that the Trainer will not divide it by the
        number of micro-batches *k*: the pipeline then gets ``k · task_loss``, the
        micro-batch's mean, and the combined loss is divided by *k* here instead.
        """
        k = num_micro_batches
        if window_normalized and k != 1:
            task_loss = task_loss * k
        named = dict(outputs) if isinstance(outputs, Mapping) else None
        total = self.pipeline.compute_loss(task_loss, outputs=named)
        return total / k if window_normalized and k != 1 else total

    def before_micro_batch(self, batch: Any, targets: Any, num_micro_batches: int) -> None:
        """Open the next micro-batch of the step (before its forward pass)."""
        index = self._micro_batch
        self.pipeline.before_step(batch=batch, targets=targets, micro_batch=index,
                                  num_micro_batches=num_micro_batches, loss_scale=1.0)
        self._micro_batch = index + 1

    def on_pre_optimizer_step(self, args: TrainingArguments, state: TrainerState,
                              control: TrainerControl, **kwargs: Any) -> None:
        pipe = self.pipeline
        if self._micro_batch == 0:
            terms = list(pipe.term_plugins)
            what = (f"plugin instance(s) {', '.join(map(repr, terms))} would train without "
                    "their terms" if terms else "the plugins would see no loss")
            raise steadytrain.UsageError(
                f"optimizer step {state.global_step}: no micro-batch went through the "
                f"pipeline's loss, so {what}. Put SteadytrainMixin first among the "
                "Trainer's bases and call super().compute_loss() from any compute_loss you "
                "write"
            )
        self._micro_batch = None
        self._outcome = pipe.after_backward()

    def on_optimizer_step(self, args: TrainingArguments, state: TrainerState,
                          control: TrainerControl, **kwargs: Any) -> None:
        self.pipeline.consolidate()

    # -- checkpoints --------------------------------------------------------------------

    def on_save(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                **kwargs: Any) -> None:
        if not args.should_save:
            return
        folder = os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")
        if not os.path.isdir(folder):
            raise steadytrain.CheckpointError(
                f"{folder}: the Trainer saved its checkpoint elsewhere (a hyperparameter "
                "search?); the pipeline's state has no place to go"
            )
        torch.save(self.pipeline.state_dict(), os.path.join(folder, STATE_FILE))

    @staticmethod
    def _read_state(folder: str) -> Mapping[str, Any]:
        path = os.path.join(folder, STATE_FILE)
        if not os.path.isfile(path):
            raise steadytrain.CheckpointError(
                f"{path}: not found; the checkpoint was saved without the pipeline. Resume "
                "from a checkpoint that SteadytrainTrainer saved, or start a new run from "
                "the checkpoint's weights"
            )
        return torch.load(path, map_location="cpu", weights_only=True)


class SteadytrainMixin:
    """Puts a pipeline into a ``Trainer`` subclass: ``class T(SteadytrainMixin, Trainer)``.

    Takes the keyword argument ``pipeline`` on top of the Trainer's. The mixin wraps the
    ``compute_loss`` that comes after it in the bases (the Trainer's, or your own), so the
    plugins' terms join that loss; it runs ``evaluate`` and ``predict`` inside
    ``pipe.evaluating()`` and adds ``pipe.metrics()`` to each training log.
    """

    def __init__(self, *args: Any, pipeline: steadytrain.Pipeline, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.steadytrain = SteadytrainCallback(pipeline)
        _check_arguments(pipeline, self.args)
        self.add_callback(self.steadytrain)

    @property
    def pipeline(self) -> steadytrain.Pipeline:
        return self.steadytrain.pipeline

    def train(self, resume_from_checkpoint: str | bool | None = None, *args: Any,
              **kwargs: Any) -> Any:
        folder = resume_from_checkpoint
        if folder is True:
            folder = get_last_checkpoint(self.args.output_dir)
        self.steadytrain.resume_from = folder or None
        return super().train(resume_from_checkpoint, *args, **kwargs)

    def create_scheduler(self, num_training_steps: int, optimizer: Any = None) -> Any:
        optimizer = optimizer or self.optimizer
        if isinstance(optimizer, AcceleratedOptimizer):
            self.steadytrain.route_steps(optimizer)
        return super().create_scheduler(num_training_steps, optimizer)

    def compute_loss(
        self,
        model: torch.nn.Module,
        inputs: dict[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: torch.Tensor | int | None = None,
    ) -> Any:
        hook = self.steadytrain
        if not hook.in_step:  # evaluation and prediction
            return super().compute_loss(model, inputs, return_outputs=return_outputs,
                                        num_items_in_batch=num_items_in_batch)
        k = self.current_gradient_accumulation_steps
        hook.before_micro_batch(inputs, inputs.get("labels"), k)
        # A copy: the Trainer's compute_loss pops the labels off the dict it gets.
        loss, outputs = super().compute_loss(model, dict(inputs), return_outputs=True,
                                             num_items_in_batch=num_items_in_batch)
        total = hook.loss(loss, outputs, num_micro_batches=k,
                          window_normalized=self._loss_is_window_normalized(num_items_in_batch))
        return (total, outputs) if return_outputs else total

    def _loss_is_window_normalized(self, num_items_in_batch: torch.Tensor | int | None) -> bool:
        # The rule by which the Trainer's training_step decides not to divide the loss by
        # the number of micro-batches.
        if self.loss_is_scaled_for_ga is not None:
            return self.loss_is_scaled_for_ga
        return bool(
            (self.model_accepts_loss_kwargs and num_items_in_batch is not None)
            or self.compute_loss_func is not None
        )

    @contextlib.contextmanager
    def _evaluating(self) -> Iterator[None]:
        if self.pipeline.is_setup:
            with self.pipeline.evaluating():
                yield
        else:
            yield

    def evaluate(self, *args: Any, **kwargs: Any) -> dict[str, float]:
        with self._evaluating():
            return super().evaluate(*args, **kwargs)

    def predict(self, *args: Any, **kwargs: Any) -> Any:
        with self._evaluating():
            return super().predict(*args, **kwargs)

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        # Training logs carry "loss"; evaluation logs carry "eval_loss" and the like.
        if "loss" in logs and self.pipeline.is_setup:
            logs.update(self.pipeline.metrics())
        super().log(logs, *args, **kwargs)


class SteadytrainTrainer(SteadytrainMixin, Trainer):
    """``transformers.Trainer`` with a steadytrain pipeline (``pipeline=`` keyword)."""
