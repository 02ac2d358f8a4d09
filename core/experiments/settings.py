"""Run configs: which model, which data, how to train, and the pipeline, in one file.

A run config is a pipeline config (``[[plugins]]``, ``[[param_groups]]``, ``disable``,
``autoload``, ``finite_check``: the core's :class:`~steadytrain.RunConfig`) with three
more tables (and ``[teacher]`` for a model that learns from one, :class:`TeacherSettings`)::

    [model]
    name = "gpt"               # a built-in model, or "package.module:callable"
    qk_layernorm = true        # the model's own options

    [data]
    source = "pydoc"           # built-in data, or a text file / directory of .txt files
    seq_len = 64
    batch_size = 16

    [train]
    steps = 300
    lr = 1e-2
    seed = 0

    [[plugins]]
    plugin = "z_loss"

Every table is optional and every key has a default. Errors name their path
(``train.lr: must be a positive number, got -1``) and suggest close matches for unknown
keys, as for the pipeline part; all errors of a file are reported at once.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import attrs

from .. import validators
from ..config import (
    RUN_KEYS,
    RunConfig,
    converter,
    error_messages,
    read_config_file,
    structure_config,
    structure_options,
    unstructure_config,
)
from ..errors import ConfigError, OptionError, suggest

OPTIMIZERS = ("adamw", "adam", "sgd")
SCHEDULES = ("cosine", "constant")
DEVICES = ("cpu", "cuda")
TABLES = ("model", "data", "train", "teacher")


def _fraction_below_one(_inst: Any, attr: attrs.Attribute, value: Any) -> None:
    if not (isinstance(value, (int, float)) and 0 <= value < 1):
        raise OptionError(attr.name, f"must be in [0, 1), got {value!r}")


def _betas(_inst: Any, attr: attrs.Attribute, value: tuple[float, float]) -> None:
    if not all(0 <= b < 1 for b in value):
        raise OptionError(attr.name, f"must be two numbers in [0, 1), got {value!r}")


@attrs.frozen
class DataSettings:
    """Where the training text comes from and how it is cut into batches."""

    source: str = attrs.field(default="pydoc", validator=validators.non_empty_str)
    seq_len: int = attrs.field(default=64, validator=validators.positive_int)
    batch_size: int = attrs.field(default=16, validator=validators.positive_int)
    eval_batches: int = attrs.field(default=8, validator=validators.positive_int)


@attrs.frozen
class TrainSettings:
    """The optimizer, the learning-rate schedule, the budget, logging and checkpoints."""

    steps: int = attrs.field(default=300, validator=validators.positive_int)
    lr: float = attrs.field(default=1e-2, validator=validators.positive)
    optimizer: str = attrs.field(default="adamw", validator=validators.one_of(*OPTIMIZERS))
    betas: tuple[float, float] = attrs.field(default=(0.9, 0.95), validator=_betas)
    momentum: float = attrs.field(default=0.9, validator=_fraction_below_one)
    weight_decay: float = attrs.field(default=0.0, validator=validators.non_negative)
    warmup: float = attrs.field(default=0.1, validator=_fraction_below_one)
    schedule: str = attrs.field(default="cosine", validator=validators.one_of(*SCHEDULES))
    seed: int = attrs.field(default=0, validator=validators.non_negative_int)
    log_every: int = attrs.field(default=10, validator=validators.positive_int)
    checkpoint_every: int = attrs.field(default=100, validator=validators.positive_int)
    device: str = attrs.field(default="cpu", validator=validators.one_of(*DEVICES))
    #: The peak learning rate of the pipeline's own parameters (``None``: ``lr``).
    pipeline_lr: float | None = attrs.field(
        default=None, validator=validators.optional(validators.positive))

    def __attrs_post_init__(self) -> None:
        if self.checkpoint_every % self.log_every:
            raise OptionError(
                "checkpoint_every",
                f"must be a multiple of log_every ({self.log_every}), got "
                f"{self.checkpoint_every}: a checkpoint is written where a metrics line is",
            )

    @property
    def warmup_steps(self) -> int:
        return math.ceil(self.warmup * self.steps)


@attrs.frozen
class TeacherSettings:
    """The ``[teacher]`` table of a distillation run (model ``gpt_student``).

    ``checkpoint`` is the teacher: the ``checkpoint.pt`` of a finished ``steadytrain run``
    of the ``gpt`` model, or its run directory; a relative path is taken from the config
    file's folder. ``task_weight`` weighs the next-byte cross-entropy in the student's
    objective: at 0 (the default) the student learns from the teacher only, through the
    pipeline's distillation terms.
    """

    checkpoint: str = attrs.field(validator=validators.non_empty_str)
    task_weight: float = attrs.field(default=0.0, validator=validators.non_negative)


@attrs.frozen
class ModelSettings:
    """A model by name (built-in, or ``module:callable``) and its options."""

    name: str = "gpt"
    options: Any = None


@attrs.frozen
class ExperimentConfig:
    """One training run: model, data, training settings and the pipeline.

    ``data.source`` is resolved against the config file's folder; ``origin`` is the
    file (``None`` for a config made from a mapping).
    """

    model: ModelSettings = ModelSettings()
    data: DataSettings = DataSettings()
    train: TrainSettings = TrainSettings()
    pipeline: RunConfig = RunConfig()
    origin: Path | None = attrs.field(default=None, eq=False)
    teacher: TeacherSettings | None = None

    def with_overrides(self, **train: Any) -> ExperimentConfig:
        """This config with some training settings replaced (``lr``, ``seed``, ``steps``)."""
        changed = {k: v for k, v in train.items() if v is not None}
        try:
            settings = attrs.evolve(self.train, **changed)
        except OptionError as exc:
            raise ConfigError(f"train.{exc.option}: {exc.message}") from None
        return attrs.evolve(self, train=settings)

    def with_disabled(self, names: tuple[str, ...] = (), *,
                      no_autoload: bool = False) -> ExperimentConfig:
        """This config with more plugins or instances switched off (``-p no:NAME``), and
        without third-party plugins when *no_autoload* (``--no-autoload``)."""
        pipeline = self.pipeline
        if names:
            pipeline = attrs.evolve(pipeline, disable=(*pipeline.disable, *names))
        if no_autoload:
            pipeline = attrs.evolve(pipeline, autoload=False)
        return attrs.evolve(self, pipeline=pipeline)

    def to_dict(self) -> dict[str, Any]:
        """Plain data that identifies the run: equal dicts train the same way."""
        plain = {
            "model": {"name": self.model.name, **_plain(self.model.options)},
            "data": converter.unstructure(self.data),
            "train": _plain_train(self.train),
            **unstructure_config(self.pipeline),
        }
        if self.teacher is not None:
            plain["teacher"] = converter.unstructure(self.teacher)
        return json.loads(json.dumps(plain))  # tuples become lists, as in a saved copy


def _plain_train(train: TrainSettings) -> dict[str, Any]:
    plain = converter.unstructure(train)
    if plain["pipeline_lr"] is None:
        # Left out when unset, so that runs saved before the key existed still match.
        del plain["pipeline_lr"]
    return plain


def _plain(options: Any) -> dict[str, Any]:
    if options is None:
        return {}
    if isinstance(options, Mapping):
        return dict(options)
    return converter.unstructure(options)


def _table(raw: Mapping[str, Any], key: str, errors: list[str]) -> dict[str, Any]:
    table = raw.get(key, {})
    if not isinstance(table, Mapping):
        errors.append(f"{key}: expected a table, got {table!r}")
        return {}
    return dict(table)


def _structure(table: Mapping[str, Any], cls: type, path: str, errors: list[str]) -> Any:
    try:
        return converter.structure(dict(table), cls)
    except Exception as exc:
        errors += error_messages(exc, path)
        return None


def structure_experiment(
    raw: Mapping[str, Any], *, origin: Path | None = None, model: str | None = None,
    model_options: Any = None,
) -> ExperimentConfig:
    """Build an :class:`ExperimentConfig` from plain data; every problem has its path.

    *model* (``--model``) replaces ``model.name``. *model_options* structures the
    ``[model]`` options of a name (``name, options -> Options``, raising ConfigError);
    by default the options are kept as a plain mapping.
    """
    if not isinstance(raw, Mapping):
        raise ConfigError(f"a run config is a table, got {type(raw).__name__}")
    errors = [
        f"{key}: unknown key{suggest(key, (*TABLES, *RUN_KEYS))}; known keys: "
        f"{', '.join((*TABLES, *RUN_KEYS))}"
        for key in raw
        if key not in TABLES and key not in RUN_KEYS
    ]
    model_table = _table(raw, "model", errors)
    name = model_table.pop("name", "gpt") if model is None else model
    model_table.pop("name", None)
    if not isinstance(name, str) or not name:
        errors.append(f"model.name: expected a model name, got {name!r}")
        name = "gpt"
    options: Any = model_table
    if model_options is not None:
        try:
            options = model_options(name, model_table)
        except ConfigError as exc:
            errors += str(exc).splitlines()
    data = _structure(_table(raw, "data", errors), DataSettings, "data", errors)
    train = _structure(_table(raw, "train", errors), TrainSettings, "train", errors)
    teacher = (_structure(_table(raw, "teacher", errors), TeacherSettings, "teacher", errors)
               if "teacher" in raw else None)
    try:
        pipeline = structure_config({k: v for k, v in raw.items() if k in RUN_KEYS})
    except ConfigError as exc:
        errors += str(exc).splitlines()
    if errors:
        raise ConfigError("\n".join(errors))
    return ExperimentConfig(ModelSettings(name, options), data, train, pipeline, origin,
                            teacher)


def load_experiment(
    source: str | Path | Mapping[str, Any], *, model: str | None = None,
    model_options: Any = None,
) -> ExperimentConfig:
    """Load a run config from a file (TOML, YAML, JSON) or a mapping; errors name the file."""
    if isinstance(source, Mapping):
        return structure_experiment(source, model=model, model_options=model_options)
    path = Path(source)
    if not path.exists():
        raise ConfigError(f"{path}: no such config file")
    data = read_config_file(path)
    try:
        return structure_experiment(data, origin=path, model=model, model_options=model_options)
    except ConfigError as exc:
        raise ConfigError("\n".join(f"{path}: {line}" for line in str(exc).splitlines())) \
            from None


def structure_model_options(table: Mapping[str, Any], cls: type) -> Any:
    """A model's ``[model]`` options as its attrs class; errors read ``model.<option>``."""
    return structure_options(table, cls, "model")
