"""The ``steadytrain`` command: list plugins, show their options, validate configs.

    steadytrain plugins [--json]      every discovered plugin, broken ones included
    steadytrain config NAME           a plugin's options with their defaults, as TOML
    steadytrain check FILE [--model module:callable]
                                      validate a config file without training
    steadytrain new-plugin NAME [--dir D]
                                      write a new plugin distribution to start from

``-p no:NAME`` (repeatable) and the environment variable ``STEADYTRAIN_DISABLE`` leave a
plugin or instance out, and ``--no-autoload`` reads only the built-in plugins, like
pytest's ``-p no:NAME`` and ``PYTEST_DISABLE_PLUGIN_AUTOLOAD``; ``--trace`` logs every
hook call. Logs (structlog events) go to standard error; standard output carries only the
command's result.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import os
import sys
from collections.abc import Sequence
from typing import Any

import structlog
import torch

from . import scaffold, trace
from ._version import __version__
from .config import DISABLE_ENV, RunConfig, load_config, option_table, read_config_file
from .errors import ConfigError, SteadytrainError, suggest
from .experiments.commands import add_commands
from .hook_table import implemented_hooks
from .pipeline import Pipeline
from .registry import Registry


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        if not value:
            return "{}"
        return "{ " + ", ".join(f"{k} = {_toml_value(v)}" for k, v in value.items()) + " }"
    return repr(value)


def _registry(args: argparse.Namespace) -> Registry:
    return Registry.discover(autoload=False if args.no_autoload else None)


def _disabled(args: argparse.Namespace) -> list[str]:
    names = []
    for flag in args.plugin_flags:
        if not flag.startswith("no:"):
            raise ConfigError(f"-p {flag}: only -p no:NAME is understood")
        names.append(flag[3:])
    return names


def cmd_plugins(args: argparse.Namespace) -> int:
    registry = _registry(args)
    env = [n.strip() for n in os.environ.get(DISABLE_ENV, "").split(",") if n.strip()]
    disabled = set(_disabled(args)) | set(env)
    for name in sorted(disabled):
        if name not in registry:
            raise ConfigError(
                f"-p no:{name} / {DISABLE_ENV}: {name!r} is not a plugin"
                f"{suggest(name, registry.names())}"
            )
    rows = []
    for entry in registry.entries():
        if entry.name in disabled:
            continue
        row = {
            "name": entry.name,
            "distribution": entry.distribution,
            "version": entry.version,
            "entry_point": entry.entry_point,
            "hooks": [],
            "summary": "",
            "error": entry.error,
        }
        if entry.error is None:
            factory = entry.load()
            row["hooks"] = list(implemented_hooks(factory))
            row["summary"] = factory.summary()
        rows.append(row)
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    for row in rows:
        origin = f"{row['distribution'] or 'in-process'} {row['version'] or ''}".strip()
        print(f"{row['name']}  ({origin})")
        if row["error"]:
            print(f"    BROKEN: {row['error']}")
            print(f"    entry point: {row['entry_point']}")
            continue
        print(f"    {row['summary']}")
        print(f"    hooks: {', '.join(row['hooks']) or '(none)'}")
    broken = sum(1 for r in rows if r["error"])
    print(f"\n{len(rows)} plugin(s), {broken} broken")
    return 0


def cmd_config(args: argparse.Namespace) -> int:
    factory = _registry(args).get(args.name)
    print(f"# {factory.summary()}")
    print("[[plugins]]")
    print(f"plugin = {json.dumps(args.name)}")
    print(f"# id = {json.dumps(args.name)}        # set when the plugin appears twice")
    print("# enabled = true")
    print("# weight = 1.0          # a number or { kind = \"linear_warmup\", ... }")
    print('# include = ["*"]')
    print("# exclude = []")
    print('# on_unmatched = "error"')
    for name, kind, default in option_table(factory):
        if default is None:  # TOML has no null: an unset option stays commented out
            print(f"# {name} =    # {kind}, unset by default")
        else:
            print(f"{name} = {_toml_value(default)}    # {kind}")
    return 0


def build_model(spec: str) -> torch.nn.Module:
    """Call ``module:callable`` with no arguments and return the model it builds."""
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise ConfigError(f"--model {spec!r}: expected module:callable, e.g. mypkg.models:small")
    try:
        factory = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise ConfigError(f"--model {spec!r}: cannot import it: {exc}") from None
    model = factory()
    if not isinstance(model, torch.nn.Module):
        raise ConfigError(f"--model {spec!r}: returned a {type(model).__name__}, not a "
                          "torch.nn.Module")
    return model


def _load_checked(path: str, registry: Registry) -> RunConfig:
    """The pipeline config of *path*; a run config of ``steadytrain run`` (with ``model``,
    ``data`` or ``train`` tables) is validated whole."""
    from .experiments.settings import TABLES, load_experiment

    raw = read_config_file(path)
    if isinstance(raw, dict) and any(table in raw for table in TABLES):
        return load_experiment(path).pipeline
    return load_config(path, registry=registry)


def cmd_check(args: argparse.Namespace) -> int:
    registry = _registry(args)
    config = _load_checked(args.file, registry)
    pipeline = Pipeline.from_config(config, registry=registry, disable=_disabled(args))
    if args.model:
        model = build_model(args.model)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
        with pipeline:
            pipeline.setup(model, optimizer, total_steps=1)
        print(f"{args.file}: OK with {args.model}, {len(pipeline.plugins)} enabled plugin "
              "instance(s); every include/exclude pattern resolved against the model")
    else:
        print(f"{args.file}: OK, {len(pipeline.plugins)} enabled plugin instance(s)")
    for key, plugin in pipeline.plugins.items():
        print(f"  {key}: {getattr(plugin, 'name', type(plugin).__name__)}")
    if not args.model:
        print("Filters were not resolved: that needs the model's names. Pass "
              "--model module:callable to build the model and resolve them.")
    return 0


def _log_to_stderr() -> None:
    structlog.configure(logger_factory=structlog.PrintLoggerFactory(sys.stderr),
                        wrapper_class=structlog.make_filtering_bound_logger(logging.INFO))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="steadytrain", description="Plugins that keep neural-network training stable."
    )
    parser.add_argument("--version", action="version", version=f"steadytrain {__version__}")
    parser.add_argument("-p", dest="plugin_flags", action="append", default=[],
                        metavar="no:NAME", help="leave out a plugin or instance (repeatable)")
    parser.add_argument("--no-autoload", action="store_true",
                        help="read only the built-in plugins, not third-party entry points")
    parser.add_argument("--trace", action="store_true",
                        help=f"log every hook call (sets {trace.TRACE_ENV}=1)")
    sub = parser.add_subparsers(dest="command", required=True)
    plugins = sub.add_parser("plugins", help="list the discovered plugins")
    plugins.add_argument("--json", action="store_true", help="print JSON")
    plugins.set_defaults(func=cmd_plugins)
    config = sub.add_parser("config", help="print a plugin's options with their defaults")
    config.add_argument("name")
    config.set_defaults(func=cmd_config)
    check = sub.add_parser("check", help="validate a config file without training")
    check.add_argument("file")
    check.add_argument("--model", metavar="module:callable",
                       help="build the model with this callable and resolve the filters")
    check.set_defaults(func=cmd_check)
    add_commands(sub)
    scaffold.add_command(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _log_to_stderr()
    if args.trace:
        os.environ[trace.TRACE_ENV] = "1"
    try:
        return args.func(args)
    except SteadytrainError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
