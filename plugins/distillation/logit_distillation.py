"""Logit distillation: match the student's softened output distribution to the teacher's.

What it does
    Adds ``T²·KL(softmax(z_t/T) ‖ softmax(z_s/T))`` (Hinton et al. 2015), the divergence
    of the student's distribution from the teacher's at temperature ``T``, summed over
    the classes (the last dimension) and averaged over the positions (every other
    dimension). ``T²`` keeps the gradient's size independent of ``T``: the gradient of
    the KL with respect to the student's logits shrinks as ``1/T²``. It is
    ``F.kl_div(log_softmax(z_s/T), log_softmax(z_t/T), log_target=True,
    reduction="batchmean") · T²`` over the positions flattened into one batch.

    The student's logits are ``outputs[logits_key]``. The teacher's are
    ``outputs[teacher_key]`` (the host ran the teacher), or the plugin runs a teacher the
    host binds with ``plugin.bind(teacher=module)`` on the step's batch
    (``before_step(batch=...)``; a mapping is passed as keyword arguments) without grad,
    and reads its logits (a tensor, or a ``logits`` attribute or key).

    ``top_k`` compares the two distributions on the teacher's ``k`` most likely classes
    only, both renormalized there (for large vocabularies). ``ignore_index`` leaves out
    the positions whose target (``before_step(targets=...)``, or the ``targets_key``
    entry of a targets mapping) equals it; the targets must have the logits' shape
    without its last dimension (shift them for next-token prediction, as the logits
    are). The metric ``<id>/temperature`` records ``T``.

When to use it
    A student that should reproduce a teacher's predictions (compression, a modified
    architecture initialized from the original), on top of or instead of hidden-state
    alignment (``hidden_alignment``).

Hyperparameters
    ``temperature`` T, a number or a :mod:`steadytrain.schedules` schedule that stays
    above 0 (default 1.0). Seed 002's intent, 3.0 annealed to 1.0 over the first 10% of
    a 10 000-step run, is
    ``temperature = { kind = "cosine_warmup", start = 3.0, value = 1.0, warmup_steps = 1000 }``
    (``linear_warmup`` for a straight line); Hinton et al. use T from 1 to 20 and find
    lower values better for small students. ``top_k`` (off), ``ignore_index`` (off;
    -100 is what ``F.cross_entropy`` and Hugging Face labels use), ``targets_key``,
    ``logits_key`` (``"logits"``), ``teacher_key`` (``"teacher_logits"``). The instance
    ``weight`` mixes the term with the task loss (Hinton et al. weigh the hard-label loss
    lightly beside it).

Source
    Seed 002 (teacher–student alignment of a modified transformer) divides the *hidden
    states* of both models by the temperature before their MSE and calls it knowledge
    distillation. Since ``MSE(s/T, t/T) = MSE(s, t)/T²`` and the cosine is scale-free,
    that only rescales the loss (a learning-rate change); it softens nothing. Temperature
    belongs on the logits, as here: Hinton, Vinyals and Dean 2015, "Distilling the
    Knowledge in a Neural Network".

Caveats
    The KL is computed in float32 at least, from log-softmaxes (no overflow for large
    logits). With a bound teacher every step runs one extra forward pass; a host that
    aligns hidden states as well should run the teacher once and pass both its logits and
    its hidden states as outputs. A position whose teacher distribution has zeros (a
    ``-inf`` logit) contributes its finite part only, as ``F.kl_div`` defines it. A step
    in which every position is ignored gives a term of 0.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import attrs
import torch
import torch.nn.functional as F

import steadytrain
from steadytrain.schedules import Schedule, numbers_as_constant
from steadytrain.sources import at_least_float32
from steadytrain.validators import non_empty_str, optional, positive_int

from .teacher import Teacher, logits_of


def _positive_schedule(_inst: Any, attr: attrs.Attribute, value: Any) -> None:
    if not isinstance(value, Schedule):
        raise steadytrain.OptionError(
            attr.name, f"must be a number or a steadytrain.schedules schedule, got {value!r}")
    if not value.lowest > 0:
        raise steadytrain.OptionError(
            attr.name, f"must stay > 0 (it divides the logits), got {value!r}, which reaches "
            f"{value.lowest}")


def distillation_loss(
    student: torch.Tensor,
    teacher: torch.Tensor,
    temperature: float,
    *,
    keep: torch.Tensor | None = None,
    top_k: int | None = None,
) -> torch.Tensor:
    """``T²·KL(softmax(teacher/T) ‖ softmax(student/T))`` over the last dimension, averaged
    over the positions where *keep* (boolean, the logits' shape without the last
    dimension) holds; with *top_k*, over the teacher's ``k`` most likely classes only."""
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    student, teacher = at_least_float32(student), at_least_float32(teacher.detach())
    if top_k is not None:
        classes = teacher.topk(min(top_k, teacher.shape[-1]), dim=-1).indices
        student, teacher = student.gather(-1, classes), teacher.gather(-1, classes)
    per_position = F.kl_div(
        F.log_softmax(student / temperature, dim=-1),
        F.log_softmax(teacher / temperature, dim=-1),
        reduction="none", log_target=True,
    ).sum(-1)
    if keep is None:
        return temperature**2 * per_position.mean()
    return temperature**2 * (per_position * keep).sum() / keep.sum().clamp(min=1)


class LogitDistillation(steadytrain.Plugin):
    """Match the student's softened output distribution to a frozen teacher's (T²·KL)."""

    name = "logit_distillation"
    uses_filter = False

    @attrs.frozen
    class Config:
        temperature: Schedule = attrs.field(
            default=1.0, converter=numbers_as_constant, validator=_positive_schedule)
        top_k: int | None = attrs.field(default=None, validator=optional(positive_int))
        ignore_index: int | None = None
        targets_key: str | None = None
        logits_key: str = attrs.field(default="logits", validator=non_empty_str)
        teacher_key: str = attrs.field(default="teacher_logits", validator=non_empty_str)

    def __init__(self, config: Any = None, **settings: Any) -> None:
        super().__init__(config, **settings)
        self.temperature: Schedule = self.config.temperature
        self._teacher = Teacher(self.id)

    def bind(self, *, teacher: torch.nn.Module) -> LogitDistillation:
        """Run *teacher* (frozen: no parameter requires grad, eval mode) on every batch."""
        self._teacher.bind(teacher)
        return self

    @steadytrain.hookimpl
    def setup(self, run: steadytrain.Run) -> None:
        self._teacher.check()
        if self.config.targets_key is not None and self.config.ignore_index is None:
            raise steadytrain.ConfigError(
                f"{self.id}.targets_key: the targets are only read to mask ignore_index, "
                "which is not set; set ignore_index or remove targets_key"
            )

    def _teacher_logits(self, ctx: steadytrain.StepContext) -> torch.Tensor:
        key = self.config.teacher_key
        if self._teacher.module is None:
            return ctx.output(key, option="teacher_key")
        if key in ctx.outputs:
            raise steadytrain.ConfigError(
                f"{self.id}.teacher_key: a teacher is bound and outputs[{key!r}] is passed too; "
                "use one: unbind the teacher, or stop passing its logits"
            )
        output, _ = self._teacher.run(ctx.batch)
        return logits_of(output, f"{self.id}: the bound teacher")

    def _keep(self, ctx: steadytrain.StepContext, shape: torch.Size) -> torch.Tensor | None:
        cfg = self.config
        if cfg.ignore_index is None:
            return None
        targets, where = ctx.targets, "before_step(targets=...)"
        if cfg.targets_key is not None:
            if not isinstance(targets, Mapping) or cfg.targets_key not in targets:
                raise steadytrain.ConfigError(
                    f"{self.id}.targets_key: the targets have no entry {cfg.targets_key!r}; "
                    "pass before_step(targets={...}) with it"
                )
            targets, where = targets[cfg.targets_key], f"targets[{cfg.targets_key!r}]"
        if not isinstance(targets, torch.Tensor) or targets.shape != shape[:-1]:
            raise steadytrain.ConfigError(
                f"{self.id}.ignore_index: masking needs targets of shape {tuple(shape[:-1])} "
                f"(the logits' without the classes) in {where}, got "
                f"{tuple(targets.shape) if isinstance(targets, torch.Tensor) else targets!r}"
            )
        return targets != cfg.ignore_index

    @steadytrain.hookimpl
    def compute_regularizers(self, ctx: steadytrain.StepContext) -> dict[str, torch.Tensor]:
        student = ctx.output(self.config.logits_key, option="logits_key")
        teacher = self._teacher_logits(ctx)
        for label, value in (("logits_key", student), ("teacher_key", teacher)):
            if not isinstance(value, torch.Tensor) or not value.is_floating_point():
                raise steadytrain.ConfigError(
                    f"{self.id}.{label}: the logits must be a floating-point tensor, got "
                    f"{getattr(value, 'dtype', type(value).__name__)}"
                )
        if student.shape != teacher.shape:
            raise steadytrain.ConfigError(
                f"{self.id}: the student's logits have shape {tuple(student.shape)} and the "
                f"teacher's {tuple(teacher.shape)}; distillation compares them class by class"
            )
        temperature = self.temperature(ctx.step, ctx.progress)
        ctx.log("temperature", temperature)
        keep = self._keep(ctx, student.shape)
        return {"kl": distillation_loss(student, teacher, temperature, keep=keep,
                                        top_k=self.config.top_k)}

    @classmethod
    def conformance_fixture(cls) -> steadytrain.testing.Fixture:
        """The conformance kit trains a student whose frozen teacher reports its outputs."""
        from steadytrain.testing import distillation_fixture

        return distillation_fixture()
