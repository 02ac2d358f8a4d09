"""Run configs: a list of plugin instances, loaded from a dict, TOML or YAML.

A config names plugin instances in the order their hooks run::

    finite_check = "auto"          # optional
    disable = ["grad_norm"]        # optional: names or ids switched off
    allow = ["acme-regularizers"]  # optional: the only third-party plugins read

    [[plugins]]
    plugin = "ema"                 # the plugin's name
    id = "ema_fast"                # optional; needed when a plugin appears twice
    enabled = true                 # optional
    weight = 1.0                   # optional: a number or a schedule table
    include = ["encoder.*"]        # optional glob patterns
    exclude = ["*.bias"]
    decay = 0.999                  # the plugin's own options

Every error names its path (``plugins[2].decay: must be in (0, 1), got 1.5``) and, for
unknown keys and plugin names, suggests close matches. All errors of a config are
reported at once.
"""

from __future__ import annotations

import json
import os
import re
import tomllib
import types
import typing
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import attrs
import cattrs
from cattrs.errors import (
    ClassValidationError,
    ForbiddenExtraKeysError,
    IterableValidationError,
    IterableValidationNote,
)

from .errors import ConfigError, OptionError, RegistryError, suggest
from .filters import ON_UNMATCHED
from .loss import FINITE_CHECKS
from .plugin import Plugin
from .registry import Registry
from .schedules import SCHEDULES, Constant, Schedule
from .validators import non_negative, one_of, optional, positive

#: Comma-separated plugin names or instance ids to leave out, like ``-p no:NAME``.
DISABLE_ENV = "STEADYTRAIN_DISABLE"


@attrs.frozen
class InstanceConfig:
    """One entry of the plugin list: which plugin, with which settings."""

    plugin: str
    options: Any
    id: str = attrs.field(default=attrs.Factory(lambda self: self.plugin, takes_self=True))
    enabled: bool = True
    weight: Schedule = Constant(1.0)
    include: tuple[str, ...] = ("*",)
    exclude: tuple[str, ...] = ()
    on_unmatched: str = attrs.field(default="error", validator=one_of(*ON_UNMATCHED))
    #: The plugin class and its distribution's version, found when the entry was loaded.
    factory: type[Plugin] | None = attrs.field(default=None, eq=False, repr=False)
    version: str | None = attrs.field(default=None, eq=False, repr=False)

    def build(self) -> Plugin:
        """Make the plugin instance this entry describes."""
        factory = self.factory
        if factory is None:
            raise ConfigError(
                f"{self.id}: this InstanceConfig does not know its plugin class; load the "
                "config with steadytrain.load_config or structure_config"
            )
        return factory(
            self.options,
            id=self.id,
            weight=self.weight,
            include=self.include,
            exclude=self.exclude,
            on_unmatched=self.on_unmatched,
        )


@attrs.frozen
class GroupSpec:
    """One group: which parameters, and how its lr and weight decay differ from the base."""

    include: tuple[str, ...] = ("*",)
    exclude: tuple[str, ...] = ()
    lr_scale: float = attrs.field(default=1.0, validator=positive)
    weight_decay: float | None = attrs.field(
        default=None, validator=optional(non_negative)
    )
    name: str | None = None


@attrs.frozen
class RunConfig:
    """A whole config: the plugin instances and the switches that apply to all of them."""

    plugins: tuple[InstanceConfig, ...] = ()
    #: Optimizer parameter groups for :func:`steadytrain.param_groups.param_groups`.
    param_groups: tuple[GroupSpec, ...] = ()
    disable: tuple[str, ...] = ()
    autoload: bool = True
    #: Third-party plugins or distributions to read, no others (overrides ``autoload``).
    allow: tuple[str, ...] = ()
    finite_check: str = attrs.field(default="auto", validator=one_of(*FINITE_CHECKS))
    #: The registry the plugin names were resolved against (discovered once per load).
    registry: Registry | None = attrs.field(default=None, eq=False, repr=False)


def _settings(cls: type) -> dict[str, Any]:
    """The fields of *cls* that a config table sets directly, with their resolved types."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in attrs.fields(cls)
            if f.name not in ("plugin", "options", "plugins", "factory", "version", "registry")}


def _structure_settings(raw: Mapping[str, Any], cls: type, path: str) -> tuple[dict, list[str]]:
    """Structure and validate the fields of *cls* present in *raw*; return them and errors."""
    fields = {f.name: f for f in attrs.fields(cls)}
    settings: dict[str, Any] = {}
    errors: list[str] = []
    for key, kind in _settings(cls).items():
        if key not in raw:
            continue
        try:
            value = converter.structure(raw[key], kind)
        except Exception as exc:
            errors += error_messages(exc, f"{path}{key}")
            continue
        try:
            if fields[key].validator is not None:
                fields[key].validator(None, fields[key], value)
        except OptionError as exc:
            errors.append(f"{path}{key}: {exc.message}")
            continue
        settings[key] = value
    return settings, errors


def _expect(kind: str, ok: bool, value: Any) -> None:
    if not ok:
        raise TypeError(f"expected {kind}, got {value!r}")


def _structure_str_tuple(value: Any, _type: Any) -> tuple[str, ...]:
    if isinstance(value, str):
        raise TypeError(f"expected a list of strings, got the string {value!r}; write "
                        f"[{json.dumps(value)}]")
    _expect("a list of strings", isinstance(value, (list, tuple))
            and all(isinstance(v, str) for v in value), value)
    return tuple(value)


def _structure_bool(value: Any, _type: Any) -> bool:
    _expect("true or false", isinstance(value, bool), value)
    return value


def _structure_int(value: Any, _type: Any) -> int:
    _expect("an integer", isinstance(value, int) and not isinstance(value, bool), value)
    return value


def _structure_float(value: Any, _type: Any) -> float:
    _expect("a number", isinstance(value, (int, float)) and not isinstance(value, bool), value)
    return float(value)


def _structure_str(value: Any, _type: Any) -> str:
    _expect("a string", isinstance(value, str), value)
    return value


def _structure_schedule(value: Any, _type: Any) -> Schedule:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return Constant(float(value))
    _expect("a number or a schedule table with a 'kind'", isinstance(value, Mapping), value)
    table = dict(value)
    kind = table.pop("kind", None)
    if kind not in SCHEDULES:
        raise OptionError(
            "kind",
            f"unknown schedule {kind!r}{suggest(str(kind), SCHEDULES)}; "
            f"the schedules are {', '.join(SCHEDULES)}",
        )
    return converter.structure(table, SCHEDULES[kind])


def _unstructure_schedule(schedule: Schedule) -> Any:
    """A schedule as the config value that structures back into it: a constant's number, or
    the table with its ``kind``."""
    if isinstance(schedule, Constant):
        return schedule.value
    fields = {f.name: converter.unstructure(getattr(schedule, f.name))
              for f in attrs.fields(type(schedule))}
    return {"kind": schedule.kind, **fields}


def _make_converter() -> cattrs.Converter:
    conv = cattrs.Converter(forbid_extra_keys=True, detailed_validation=True)
    conv.register_structure_hook(bool, _structure_bool)
    conv.register_structure_hook(int, _structure_int)
    conv.register_structure_hook(float, _structure_float)
    conv.register_structure_hook(str, _structure_str)
    conv.register_structure_hook_func(lambda t: t == tuple[str, ...], _structure_str_tuple)
    conv.register_structure_hook_func(lambda t: t == Schedule, _structure_schedule)
    # Schedules are unstructured by their class (wherever they sit: a plugin's options
    # too), and into what _structure_schedule reads: their kind is a ClassVar.
    conv.register_unstructure_hook_func(lambda t: t in SCHEDULES.values(),
                                        _unstructure_schedule)
    conv.register_unstructure_hook(tuple, list)
    return conv


converter = _make_converter()
INSTANCE_KEYS = ("plugin", *_settings(InstanceConfig))
RUN_KEYS = ("plugins", *_settings(RunConfig))


def _field_names(cls: type) -> list[str]:
    return [f.name for f in attrs.fields(cls)] if attrs.has(cls) else []


def error_messages(exc: BaseException, path: str) -> list[str]:
    """Flatten a structuring error into ``path: problem`` lines."""
    if isinstance(exc, (ClassValidationError, IterableValidationError)):
        noted, plain = exc.group_exceptions()
        lines: list[str] = []
        for sub, note in noted:
            where = (f"[{note.index}]" if isinstance(note, IterableValidationNote)
                     else f".{note.name}")
            lines += error_messages(sub, path + where)
        for sub in plain:
            lines += error_messages(sub, path)
        return lines
    if isinstance(exc, ForbiddenExtraKeysError):
        known = _field_names(exc.cl)
        return [
            f"{path}: unknown key {key!r}{suggest(key, known)}; "
            f"known keys: {', '.join(known) or '(none)'}"
            for key in sorted(exc.extra_fields)
        ]
    if isinstance(exc, OptionError):
        return [f"{path}.{exc.option}: {exc.message}"]
    if len(exc.args) >= 2 and isinstance(exc.args[1], attrs.Attribute):
        return [f"{path}.{exc.args[1].name}: {exc.args[0]}"]
    if isinstance(exc, KeyError):
        return [f"{path}: missing required option"]
    return [f"{path}: {exc}"]


def structure_options(options: Mapping[str, Any], config_cls: type, path: str) -> Any:
    """Turn a plugin's option table into its ``Config`` instance, or raise ConfigError."""
    try:
        return converter.structure(dict(options), config_cls)
    except (ClassValidationError, ForbiddenExtraKeysError, ValueError, TypeError) as exc:
        raise ConfigError("\n".join(error_messages(exc, path))) from None


def _structure_instance(raw: Any, path: str, registry: Registry) -> InstanceConfig:
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{path}: expected a table with a 'plugin' key, got {raw!r}")
    if "plugin" not in raw:
        raise ConfigError(f"{path}.plugin: missing; every entry names its plugin")
    name = raw["plugin"]
    try:
        factory = registry.get(name) if isinstance(name, str) else None
    except RegistryError as exc:
        raise ConfigError(f"{path}.plugin: {exc}") from None
    if factory is None:
        raise ConfigError(f"{path}.plugin: expected a plugin name, got {name!r}")
    options = {k: v for k, v in raw.items() if k not in INSTANCE_KEYS}
    settings, errors = _structure_settings(raw, InstanceConfig, f"{path}.")
    weight = settings.get("weight")
    if weight is not None and weight.lowest < 0 and not factory.allows_negative_weight:
        errors.append(
            f"{path}.weight: must be >= 0, got a weight that reaches {weight.lowest}; a "
            f"negative weight rewards what {name} penalizes"
        )
    try:
        settings["options"] = structure_options(options, factory.Config, path)
    except ConfigError as exc:
        errors += str(exc).splitlines()
    if errors:
        raise ConfigError("\n".join(errors))
    return InstanceConfig(plugin=name, factory=factory, version=registry.entry(name).version,
                          **settings)


def structure_config(raw: Mapping[str, Any], *, registry: Registry | None = None) -> RunConfig:
    """Build a :class:`RunConfig` from plain data; every problem is reported with its path."""
    if not isinstance(raw, Mapping):
        raise ConfigError(f"a config is a table with a 'plugins' list, got {type(raw).__name__}")
    errors = [
        f"{key}: unknown key{suggest(key, RUN_KEYS)}; known keys: {', '.join(RUN_KEYS)}"
        for key in raw
        if key not in RUN_KEYS
    ]
    settings, setting_errors = _structure_settings(raw, RunConfig, "")
    errors += setting_errors
    if registry is None:
        try:
            registry = Registry.discover(autoload=None if settings.get("autoload", True) else False,
                                         allow=settings.get("allow", ()))
        except RegistryError as exc:
            raise ConfigError(str(exc)) from None
    entries = raw.get("plugins", [])
    if not isinstance(entries, Sequence) or isinstance(entries, str):
        errors.append(f"plugins: expected a list of tables, got {entries!r}")
        entries = []
    instances = []
    seen: dict[str, int] = {}
    for index, entry in enumerate(entries):
        path = f"plugins[{index}]"
        try:
            instance = _structure_instance(entry, path, registry)
        except ConfigError as exc:
            errors += str(exc).splitlines()
            continue
        if instance.id in seen:
            errors.append(
                f"{path}.id: instance id {instance.id!r} is already used by "
                f"plugins[{seen[instance.id]}]; give each instance of a plugin its own id"
            )
        seen[instance.id] = index
        instances.append(instance)
    if errors:
        raise ConfigError("\n".join(errors))
    return RunConfig(plugins=tuple(instances), registry=registry, **settings)


def read_config_file(path: str | Path) -> dict[str, Any]:
    """Parse a TOML, YAML or JSON file into plain data; errors name the file."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the config file: {exc.strerror}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(
            f"{path}: not a UTF-8 text file (byte {exc.object[exc.start]:#04x} at offset "
            f"{exc.start}); save the config as UTF-8"
        ) from None
    suffix = path.suffix.lower()
    try:
        if suffix == ".toml":
            return tomllib.loads(text)
        if suffix == ".json":
            return json.loads(text)
        if suffix in (".yaml", ".yml"):
            try:
                import yaml
            except ImportError:
                raise ConfigError(
                    f"{path}: reading YAML needs PyYAML: pip install 'steadytrain[yaml]'"
                ) from None
            data = yaml.load(text, Loader=_unique_key_loader(yaml))
            return {} if data is None else data
    except (tomllib.TOMLDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(f"{path}: not valid {suffix[1:].upper()}: {exc}") from None
    except Exception as exc:
        if type(exc).__module__.startswith("yaml"):
            raise ConfigError(f"{path}: not valid YAML: {exc}") from None
        raise
    raise ConfigError(f"{path}: unknown config format {suffix!r}; use .toml, .yaml or .json")


def _unique_key_loader(yaml: Any) -> type:
    """A safe YAML loader that refuses a key given twice in one mapping (the last would win)."""

    class UniqueKeyLoader(yaml.SafeLoader):
        def construct_mapping(self, node: Any, deep: bool = False) -> dict:
            seen: dict[Any, Any] = {}
            for key_node, _ in node.value:
                key = self.construct_object(key_node, deep=deep)
                if key in seen:
                    raise yaml.constructor.ConstructorError(
                        "while constructing a mapping", node.start_mark,
                        f"found the key {key!r} twice (first {seen[key]}); remove one",
                        key_node.start_mark,
                    )
                seen[key] = key_node.start_mark
            return super().construct_mapping(node, deep=deep)

    return UniqueKeyLoader


def disabled_names(
    config: RunConfig, registry: Registry, extra: Iterable[str] = ()
) -> set[str]:
    """Names and ids to leave out: the config's ``disable``, *extra* (``-p no:NAME``) and the
    environment variable ``STEADYTRAIN_DISABLE``; an unknown name is an error."""
    env = [n.strip() for n in os.environ.get(DISABLE_ENV, "").split(",") if n.strip()]
    known = {inst.plugin for inst in config.plugins} | {inst.id for inst in config.plugins}
    known |= set(registry.names())
    sources = [("disable", (*config.disable, *extra)), (DISABLE_ENV, env)]
    for where, names in sources:
        for name in names:
            if name not in known:
                raise ConfigError(
                    f"{where}: {name!r} is neither a plugin nor an instance id"
                    f"{suggest(name, known)}; `steadytrain plugins` lists the plugins"
                )
    return {name for _, names in sources for name in names}


def load_config(
    source: Mapping[str, Any] | str | Path | RunConfig, *, registry: Registry | None = None
) -> RunConfig:
    """Load a config from a mapping, a file path (TOML, YAML, JSON) or pass one through."""
    if isinstance(source, RunConfig):
        return source
    if isinstance(source, Mapping):
        return structure_config(source, registry=registry)
    data = read_config_file(source)
    try:
        return structure_config(data, registry=registry)
    except ConfigError as exc:
        raise ConfigError("\n".join(f"{source}: {line}" for line in str(exc).splitlines())) \
            from None


def unstructure_config(config: RunConfig) -> dict[str, Any]:
    """The plain-data form of *config*; :func:`structure_config` turns it back."""
    entries = []
    for inst in config.plugins:
        entry: dict[str, Any] = {"plugin": inst.plugin}
        if inst.id != inst.plugin:
            entry["id"] = inst.id
        entry.update(
            enabled=inst.enabled,
            weight=_unstructure_schedule(inst.weight),
            include=list(inst.include),
            exclude=list(inst.exclude),
            on_unmatched=inst.on_unmatched,
        )
        entry.update(converter.unstructure(inst.options))
        entries.append(entry)
    return {
        "plugins": entries,
        "param_groups": [converter.unstructure(group) for group in config.param_groups],
        "disable": list(config.disable),
        "autoload": config.autoload,
        "allow": list(config.allow),
        "finite_check": config.finite_check,
    }


def describe_type(kind: Any) -> str:
    """A short readable name of a field's type (``float``, ``tuple[str, ...]``)."""
    if isinstance(kind, str):
        return kind
    if isinstance(kind, type) and not isinstance(kind, types.GenericAlias):
        return kind.__name__
    return re.sub(r"\b(?:[A-Za-z_]\w*\.)+(\w+)", r"\1", str(kind))


def option_table(factory: type[Plugin]) -> list[tuple[str, str, Any]]:
    """``(name, type, default)`` for every option of a plugin's ``Config``."""
    hints = typing.get_type_hints(factory.Config) if attrs.has(factory.Config) else {}
    rows = []
    for field in attrs.fields(factory.Config):
        default = field.default
        if isinstance(default, attrs.Factory):  # type: ignore[arg-type]
            default = default.factory()
        rows.append((field.name, describe_type(hints.get(field.name, field.type)),
                     converter.unstructure(default)))
    return rows
