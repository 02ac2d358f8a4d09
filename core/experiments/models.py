"""The models a run can train: the built-in ones by name, or the user's ``module:callable``.

A built-in model has an attrs options class (the ``[model]`` table) and the data it
trains on. A user model is a callable that returns a ``torch.nn.Module`` mapping byte
ids ``(batch, seq_len)`` (int64 in [0, 256)) to logits ``(batch, seq_len, 256)``, or a
tuple whose first item is those logits. It is called with the other keys of the
``[model]`` table as keyword arguments, plus ``vocab_size=256`` and
``context=seq_len`` if it has parameters of those names (or ``**kwargs``). The module
is imported from ``sys.path`` or from the current directory.
"""

from __future__ import annotations

import importlib
import inspect
import os
import sys
from collections.abc import Callable, Mapping
from typing import Any

import attrs
import torch

from ..errors import ConfigError, suggest
from .data import VOCAB, load_corpus
from .distillation import DistillationTask, load_teacher
from .emulator import EmulationTask, EmulatorOptions
from .gpt import GPT, GPTOptions
from .language import LanguageTask
from .memory_lm import MemoryLM, MemoryLMOptions
from .settings import ExperimentConfig, structure_model_options
from .student import StudentGPT, StudentOptions


@attrs.frozen
class BuiltInModel:
    """A model ``steadytrain run`` knows by name."""

    options: type
    data: str
    summary: str
    factory: Callable[..., torch.nn.Module] | None = None


MODELS: dict[str, BuiltInModel] = {
    "gpt": BuiltInModel(GPTOptions, "text", "a small pre-norm byte-level GPT", GPT),
    "memory_lm": BuiltInModel(MemoryLMOptions, "text",
                              "a byte-level GPT with short- and long-term memory", MemoryLM),
    "emulator": BuiltInModel(EmulatorOptions, "simulation",
                             "a grid emulator with a physics corrector"),
    "gpt_student": BuiltInModel(StudentOptions, "text",
                                "the GPT with one low-rank MLP, distilled from a trained gpt",
                                StudentGPT),
}
#: The models that learn from a teacher (a ``[teacher]`` table).
STUDENTS = ("gpt_student",)


def is_user_model(name: str) -> bool:
    return ":" in name


def model_options(name: str, table: Mapping[str, Any]) -> Any:
    """The ``[model]`` options of *name*: its options class, or a mapping for a user model."""
    if is_user_model(name):
        return dict(table)
    if name not in MODELS:
        raise ConfigError(
            f"model.name: unknown model {name!r}{suggest(name, MODELS)}; the built-in models "
            f"are {', '.join(MODELS)}, or give a 'package.module:callable' of your own"
        )
    return structure_model_options(table, MODELS[name].options)


def user_factory(name: str) -> Callable[..., Any]:
    """The callable ``module:attribute`` names; errors say what could not be found."""
    module_name, _, attribute = name.partition(":")
    if not module_name or not attribute:
        raise ConfigError(f"model.name: {name!r} must be 'package.module:callable'")
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError(f"model.name: cannot import {module_name!r}: {exc}") from None
    factory: Any = module
    for part in attribute.split("."):
        factory = getattr(factory, part, None)
        if factory is None:
            raise ConfigError(f"model.name: module {module_name!r} has no {attribute!r}")
    if not callable(factory):
        raise ConfigError(f"model.name: {name!r} is a {type(factory).__name__}, not callable")
    return factory


def build_user_model(name: str, options: Mapping[str, Any], context: int) -> torch.nn.Module:
    factory = user_factory(name)
    kwargs = dict(options)
    try:
        parameters = inspect.signature(factory).parameters
    except (TypeError, ValueError):
        parameters = {}
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())
    for key, value in (("vocab_size", VOCAB), ("context", context)):
        if takes_any or key in parameters:
            kwargs.setdefault(key, value)
    try:
        model = factory(**kwargs)
    except TypeError as exc:
        raise ConfigError(f"model: calling {name}({', '.join(kwargs)}) failed: {exc}") from None
    if not isinstance(model, torch.nn.Module):
        raise ConfigError(
            f"model.name: {name} returned a {type(model).__name__}, not a torch.nn.Module"
        )
    return model


Task = LanguageTask | DistillationTask | EmulationTask


def check_teacher_table(config: ExperimentConfig) -> None:
    """A ``[teacher]`` table where, and only where, the model learns from a teacher."""
    name = config.model.name
    if name in STUDENTS and config.teacher is None:
        raise ConfigError(
            f"teacher: the {name} model learns from a teacher; add a [teacher] table with "
            "checkpoint = the checkpoint.pt (or run directory) of a finished gpt run"
        )
    if name not in STUDENTS and config.teacher is not None:
        raise ConfigError(
            f"teacher: the {name} model does not learn from a teacher; remove the [teacher] "
            f"table, or train {' or '.join(STUDENTS)}"
        )


def build_task(config: ExperimentConfig, device: torch.device) -> Task:
    """The task of *config*: its data, batches, loss and evaluation, and its model factory."""
    name, options, data = config.model.name, config.model.options, config.data
    seed = config.train.seed
    check_teacher_table(config)
    if not is_user_model(name) and MODELS[name].data == "simulation":
        if data.source != "simulation":
            raise ConfigError(
                f"data.source: the {name} model trains on its own simulation; set "
                f"source = \"simulation\" (got {data.source!r})"
            )
        return EmulationTask(options, batch_size=data.batch_size, seed=seed, device=device)
    base = config.origin.parent if config.origin is not None else None
    corpus = load_corpus(data.source, base=base)
    if is_user_model(name):
        def factory() -> torch.nn.Module:
            return build_user_model(name, options, data.seq_len)
        user_factory(name)  # fail on a bad name before any data work
    else:
        model_cls = MODELS[name].factory
        assert model_cls is not None

        def factory() -> torch.nn.Module:
            return model_cls(options, vocab=VOCAB, context=data.seq_len)

    if config.teacher is not None:
        teacher = load_teacher(config.teacher, options, data.seq_len, base=base)
        return DistillationTask(corpus, data, seed=seed, device=device, factory=factory,
                                teacher=teacher, task_weight=config.teacher.task_weight)
    return LanguageTask(corpus, data, seed=seed, device=device, factory=factory)
