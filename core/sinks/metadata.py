"""Run metadata: what a result needs to be reproduced, recorded next to its metrics.

:func:`run_metadata` lists the plugin instances of a pipeline with the class, the
distribution and the version each comes from, and the resolved config: every option of
every instance, defaults included, in the plain-data form that
:func:`steadytrain.structure_config` reads back.
"""

from __future__ import annotations

import platform
from collections.abc import Mapping
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

from .._version import __version__
from ..config import InstanceConfig, RunConfig, load_config, unstructure_config
from ..hook_table import name_of
from ..pipeline import Pipeline
from ..plugin import Plugin
from ..registry import GROUP


def _distributions_by_entry_point() -> dict[str, tuple[str, str]]:
    """``"module:Class"`` of every installed plugin entry point → (distribution, version)."""
    found = {}
    for dist in metadata.distributions():
        for ep in dist.entry_points.select(group=GROUP):
            found.setdefault(ep.value.replace(" ", ""), (dist.metadata["Name"], dist.version))
    return found


def _origin(cls: type, by_entry_point: Mapping[str, tuple[str, str]]) -> tuple[Any, Any]:
    """The distribution and version that provide *cls*, or ``(None, None)`` if none does."""
    target = f"{cls.__module__}:{cls.__qualname__}"
    if target in by_entry_point:
        return by_entry_point[target]
    names = metadata.packages_distributions().get(cls.__module__.partition(".")[0], [])
    if len(names) == 1:
        return names[0], metadata.version(names[0])
    return None, None


def _resolved_entry(key: str, plugin: object) -> dict[str, Any]:
    if not isinstance(plugin, Plugin):
        return {"plugin": name_of(plugin), "id": key}
    instance = InstanceConfig(
        plugin=plugin.name, options=plugin.config, id=key, weight=plugin.weight,
        include=plugin.filter.include, exclude=plugin.filter.exclude,
        on_unmatched=plugin.filter.on_unmatched,
    )
    entry = unstructure_config(RunConfig(plugins=(instance,)))["plugins"][0]
    return {"plugin": entry.pop("plugin"), "id": key, **entry}


def run_metadata(
    pipeline: Pipeline, *, config: RunConfig | Mapping[str, Any] | str | Path | None = None
) -> dict[str, Any]:
    """The versions, plugin origins and resolved config of a run of *pipeline*.

    Returns ``{"steadytrain", "python", "torch": versions, "plugins": [{"id", "plugin",
    "class", "distribution", "version"}, ...], "config": {...}}``. ``config`` is the
    whole config the pipeline was built from (a path, a mapping or a
    :class:`~steadytrain.RunConfig`), unstructured with every default; without it, it is
    rebuilt from the pipeline's enabled instances and their options.
    """
    by_entry_point = _distributions_by_entry_point()
    plugins = []
    for key, plugin in pipeline.plugins.items():
        distribution, version = _origin(type(plugin), by_entry_point)
        plugins.append({
            "id": key, "plugin": name_of(plugin),
            "class": f"{type(plugin).__module__}:{type(plugin).__qualname__}",
            "distribution": distribution, "version": version,
        })
    if config is None:
        resolved = {
            "plugins": [_resolved_entry(k, p) for k, p in pipeline.plugins.items()],
            "finite_check": pipeline.finite_check,
        }
    else:
        resolved = unstructure_config(load_config(config))
    return {
        "steadytrain": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "plugins": plugins,
        "config": resolved,
    }
