"""A student learning from a frozen teacher: the teacher's checkpoint, and the distillation task.

The teacher is a finished ``steadytrain run`` of the ``gpt`` model (its ``checkpoint.pt``,
named by the ``[teacher]`` table), loaded frozen: no parameter requires grad, eval mode.
Its architecture must be the student's but for the student's modified block, and its
context (``data.seq_len``) the student's. The student starts from the teacher's weights
where names and shapes match.

Every training step runs the teacher once, without grad, on the student's batch, and
passes the pipeline the outputs the distillation plugins read: ``logits`` and
``hidden_states`` (the student's logits and block outputs, first block to last) and
``teacher_logits`` and ``teacher_hidden_states`` (the teacher's). A ``hidden_alignment``
instance that taps the teacher's modules itself (``teacher_taps``) gets the teacher
bound (``plugin.bind(teacher=...)``) instead.

The task loss is the student's next-byte cross-entropy, weighted by ``task_weight`` in
the objective (0 by default: the student learns from the teacher only). The evaluation
reports, on the validation windows, the student's cross-entropy (``loss``), the
teacher's (``teacher_loss``), their perplexity ratio ``exp(loss − teacher_loss)``, the
KL divergence of the student's next-byte distribution from the teacher's (``kl``) and the
mean squared difference of every block's output (``mse/<block>``).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import attrs
import torch
import torch.nn.functional as F

from ..errors import ConfigError, SteadytrainError
from ..pipeline import Pipeline
from .checkpoint import CHECKPOINT, load_checkpoint
from .data import VOCAB, Corpus
from .gpt import GPT, GPTOptions, cross_entropy
from .language import LanguageTask
from .settings import DataSettings, TeacherSettings, structure_model_options
from .student import StudentOptions, copy_matching

#: The command that trains the example teacher, for the error messages.
TEACHER_HINT = "steadytrain run examples/distillation/teacher.toml --out runs/teacher"


def teacher_path(settings: TeacherSettings, base: Path | None) -> Path:
    """The teacher's checkpoint file: ``checkpoint``, taken from *base* when relative, or
    the ``checkpoint.pt`` in it when it is a run directory."""
    path = Path(settings.checkpoint).expanduser()
    if not path.is_absolute() and base is not None:
        path = base / path
    if path.is_dir():
        path = path / CHECKPOINT
    if not path.is_file():
        raise ConfigError(
            f"teacher.checkpoint: {settings.checkpoint!r} is no checkpoint file or run "
            f"directory ({path} does not exist); train the teacher first ({TEACHER_HINT}) "
            "and name its checkpoint.pt or run directory (a relative path is taken from the "
            "config file's folder)"
        )
    return path


def _architecture(state: dict[str, Any], path: Path) -> tuple[GPTOptions, int]:
    """The teacher's GPT options and context from its run's saved config."""
    model = dict(state["config"].get("model", {}))
    name = model.pop("name", None)
    if name != "gpt":
        raise ConfigError(
            f"teacher.checkpoint: {path} is a run of the {name!r} model; the student distils "
            "a 'gpt' teacher: name the checkpoint of a gpt run"
        )
    try:
        options = structure_model_options(model, GPTOptions)
    except ConfigError as exc:
        raise ConfigError(f"teacher.checkpoint: {path}: its model options are not a gpt's: "
                          f"{exc}") from None
    return options, int(state["config"]["data"]["seq_len"])


def load_teacher(settings: TeacherSettings, student: StudentOptions, seq_len: int, *,
                 base: Path | None) -> GPT:
    """The frozen teacher of *settings*, after checking that *student* is its modification."""
    path = teacher_path(settings, base)
    try:
        state = load_checkpoint(path)
    except SteadytrainError as exc:
        raise ConfigError(f"teacher.checkpoint: {exc}") from None
    options, context = _architecture(state, path)
    wanted = student.teacher
    changed = [f"{field.name} = {getattr(options, field.name)!r} there, "
               f"{getattr(wanted, field.name)!r} here" for field in attrs.fields(GPTOptions)
               if getattr(options, field.name) != getattr(wanted, field.name)]
    if context != seq_len:
        changed.append(f"data.seq_len = {context} there, {seq_len} here")
    if changed:
        raise ConfigError(
            f"teacher.checkpoint: {path} holds a teacher of another architecture ("
            + "; ".join(changed) + "); the student has its teacher's [model] options and "
            "data.seq_len: change them here, or name another teacher"
        )
    teacher = GPT(options, vocab=VOCAB, context=context)
    teacher.load_state_dict(state["model"])
    return teacher.requires_grad_(False).eval()


class DistillationTask(LanguageTask):
    """The language task of a student, with its frozen teacher's outputs beside its own."""

    def __init__(self, corpus: Corpus, data: DataSettings, *, seed: int, device: torch.device,
                 factory: Callable[[], torch.nn.Module], teacher: GPT,
                 task_weight: float) -> None:
        super().__init__(corpus, data, seed=seed, device=device, factory=factory)
        self.teacher = teacher.to(device)
        self.task_weight = task_weight
        self.teacher_loss = super().evaluate(self.teacher)["loss"]

    def build_model(self) -> torch.nn.Module:
        """The student, with the teacher's weights wherever the two match."""
        student = self.factory()
        copy_matching(student, self.teacher)
        return student

    def prepare(self, pipe: Pipeline) -> None:
        """Bind the teacher to every ``hidden_alignment`` instance that taps its modules."""
        for plugin in pipe.plugins.values():
            if getattr(plugin, "name", "") == "hidden_alignment" and \
                    plugin.config.teacher_taps:  # type: ignore[attr-defined]
                plugin.bind(teacher=self.teacher)  # type: ignore[attr-defined]

    def loss(self, model: torch.nn.Module, inputs: torch.Tensor,
             targets: torch.Tensor) -> tuple[torch.Tensor, dict[str, Any]]:
        states = model.block_states(inputs)
        logits = model.logits(states[-1])
        with torch.no_grad():
            teacher_states = self.teacher.block_states(inputs)
            teacher_logits = self.teacher.logits(teacher_states[-1])
        return cross_entropy(logits, targets), {
            "logits": logits, "hidden_states": states,
            "teacher_logits": teacher_logits, "teacher_hidden_states": teacher_states,
        }

    @torch.no_grad()
    def evaluate(self, model: torch.nn.Module) -> dict[str, float]:
        """The student's validation loss, and how far it is from the teacher (module doc)."""
        ce = kl = 0.0
        squares = [0.0] * len(self.teacher.blocks)
        for start in range(0, len(self.val), self.data.batch_size):
            chunk = self.val[start : start + self.data.batch_size]
            ids = chunk[:, :-1]
            states, teacher_states = model.block_states(ids), self.teacher.block_states(ids)
            logits = model.logits(states[-1]).flatten(0, 1).float()
            teacher_logits = self.teacher.logits(teacher_states[-1]).flatten(0, 1).float()
            ce += F.cross_entropy(logits, chunk[:, 1:].flatten(), reduction="sum").item()
            kl += F.kl_div(F.log_softmax(logits, -1), F.log_softmax(teacher_logits, -1),
                           log_target=True, reduction="sum").item()
            for i, (s, t) in enumerate(zip(states, teacher_states, strict=True)):
                squares[i] += F.mse_loss(s.float(), t.float(), reduction="sum").item()
        positions = len(self.val) * self.data.seq_len
        loss = ce / positions
        elements = positions * states[0].shape[-1]
        return {"loss": loss, "teacher_loss": self.teacher_loss,
                "perplexity_ratio": math.exp(loss - self.teacher_loss), "kl": kl / positions,
                **{f"mse/{i}": total / elements for i, total in enumerate(squares)}}
