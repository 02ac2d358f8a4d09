"""Finding plugins: the ``steadytrain.plugins`` entry-point group, plus in-process registration.

Built-in plugins are entry points of the ``steadytrain`` distribution, found exactly like
third-party ones. An entry point's name is the plugin's name and it points to a
:class:`~steadytrain.Plugin` subclass (a factory; the pipeline makes the instances).

Loading is lazy and fenced: a plugin that fails to import, is not a Plugin subclass, has
a hook with a wrong signature or needs a newer core is recorded with its distribution,
version and entry point. Listing still works; only a run whose config uses it fails.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterable
from importlib import metadata

import attrs
from packaging.utils import canonicalize_name
from packaging.version import InvalidVersion, Version

from ._version import __version__
from .errors import RegistryError, suggest
from .hook_table import check_hooks
from .logs import get_logger
from .plugin import Plugin

GROUP = "steadytrain.plugins"
AUTOLOAD_ENV = "STEADYTRAIN_DISABLE_PLUGIN_AUTOLOAD"
#: Comma-separated third-party plugins (entry-point names) or distributions to read.
ALLOW_ENV = "STEADYTRAIN_ALLOW_PLUGINS"
OWN_DISTRIBUTION = "steadytrain"

log = get_logger()


#: Keys of a config entry that the core reads; a plugin option of the same name would be
#: shadowed by them and never set.
FRAMEWORK_KEYS = ("plugin", "id", "enabled", "weight", "include", "exclude", "on_unmatched")


def validate_plugin_class(factory: object, name: str) -> type[Plugin]:
    """Check that *factory* is a usable plugin class; raise :class:`RegistryError` if not."""
    if not (isinstance(factory, type) and issubclass(factory, Plugin)):
        raise RegistryError(
            f"must point to a steadytrain.Plugin subclass, got {factory!r}"
        )
    if factory.name != name:
        raise RegistryError(
            f"the entry point is called {name!r} but {factory.__qualname__}.name is "
            f"{factory.name!r}; configs use the entry point's name, so the two must be equal"
        )
    if not attrs.has(factory.Config):
        raise RegistryError(f"{factory.__qualname__}.Config must be an attrs class")
    if shadowed := [f.name for f in attrs.fields(factory.Config) if f.name in FRAMEWORK_KEYS]:
        raise RegistryError(
            f"{factory.__qualname__}.Config has option(s) {', '.join(shadowed)}, which are "
            f"keys the core reads for every instance ({', '.join(FRAMEWORK_KEYS)}); such an "
            "option could never be set: rename it"
        )
    if factory.requires_core:
        try:
            needed = Version(factory.requires_core)
        except InvalidVersion:
            raise RegistryError(
                f"{factory.__qualname__}.requires_core = {factory.requires_core!r} is not a "
                "version (write e.g. '0.2')"
            ) from None
        if needed > Version(__version__):
            raise RegistryError(
                f"needs steadytrain >= {factory.requires_core}, this is {__version__}: "
                "upgrade steadytrain"
            )
    check_hooks(factory)
    return factory


@attrs.frozen
class Found:
    """An entry point of a group, and the distribution that declares it."""

    name: str
    value: str
    distribution: str
    version: str
    entry_point: metadata.EntryPoint


def find_entry_points(
    group: str, wanted: Callable[[str, str], bool], *, path: list[str] | None = None,
) -> tuple[dict[str, list[Found]], set[str]]:
    """The entry points of *group* that ``wanted(distribution, name)`` accepts, by name.

    Each name maps to every distribution that declares it (more than one is a conflict:
    :func:`claimed_by_several`). Also returns every distribution name (as written and
    canonical) and entry-point name of the group seen, for messages. Only the first copy
    of a distribution on the path (*path*, default ``sys.path``) is read: Python imports
    that one, and a stale copy further down is shadowed, its entry points too.
    """
    found: dict[str, list[Found]] = {}
    known: set[str] = set()
    seen: set[str] = set()
    for dist in metadata.distributions(**({"path": path} if path is not None else {})):
        dist_name = dist.metadata["Name"] or "?"
        key = dist_name.lower().replace("-", "_")
        if key in seen:
            continue
        seen.add(key)
        entry_points = dist.entry_points.select(group=group)
        known.update([dist_name, canonicalize_name(dist_name), *entry_points.names])
        for ep in entry_points:
            if wanted(dist_name, ep.name):
                found.setdefault(ep.name, []).append(
                    Found(ep.name, ep.value, dist_name, dist.version, ep))
    return found, known


def claimed_by_several(claims: list[Found]) -> str | None:
    """The error of a name that several distributions declare; ``None`` for one."""
    if len(claims) < 2:
        return None
    return "the name is claimed by several distributions: " + " and ".join(
        f"{c.distribution} {c.version} ({c.value})" for c in claims)


@attrs.define(eq=False)
class PluginEntry:
    """One plugin name: where it comes from and, once loaded, its class or its error."""

    name: str
    distribution: str | None = None
    version: str | None = None
    entry_point: str | None = None
    _factory: type[Plugin] | None = None
    _entry: metadata.EntryPoint | None = None
    error: str | None = None

    @property
    def origin(self) -> str:
        if self.entry_point is None:
            return "registered in-process"
        return (f"entry point {self.name} = {self.entry_point!r} of distribution "
                f"{self.distribution} {self.version}")

    def load(self) -> type[Plugin]:
        """Import the plugin class; raise :class:`RegistryError` naming its origin if broken."""
        if self._factory is None and self.error is None:
            try:
                self._factory = validate_plugin_class(self._entry.load(), self.name)
            except RegistryError as exc:
                self.error = str(exc)
            except Exception as exc:  # a third-party import may raise anything
                self.error = f"import failed: {type(exc).__name__}: {exc}"
            if self.error is not None:
                log.warning("plugin.broken", plugin=self.name, distribution=self.distribution,
                            version=self.version, entry_point=self.entry_point, error=self.error)
        if self.error is not None:
            raise RegistryError(f"plugin {self.name!r} ({self.origin}) is broken: {self.error}")
        return self._factory


class Registry:
    """Plugin names to their entries; :meth:`discover` fills it from entry points."""

    def __init__(self) -> None:
        self._entries: dict[str, PluginEntry] = {}

    @classmethod
    def discover(
        cls,
        *,
        autoload: bool | None = None,
        allow: Iterable[str] = (),
        path: list[str] | None = None,
    ) -> Registry:
        """Read the ``steadytrain.plugins`` entry points of the installed distributions.

        With ``autoload=False`` (or the environment variable
        ``STEADYTRAIN_DISABLE_PLUGIN_AUTOLOAD`` set to a non-empty value) only the
        built-in plugins are read; register others with :meth:`register`. An allowlist
        (*allow*, plus the comma-separated environment variable
        ``STEADYTRAIN_ALLOW_PLUGINS``) of plugin names or distribution names overrides
        *autoload*: the third-party plugins it names are read, no others. A name in it
        that is neither is an error. *path* replaces ``sys.path`` as the places to look.
        """
        env = [n.strip() for n in os.environ.get(ALLOW_ENV, "").split(",") if n.strip()]
        allowed = {*allow, *env}
        if allowed:
            autoload = False
        elif autoload is None:
            autoload = not os.environ.get(AUTOLOAD_ENV)
        permitted = allowed | {canonicalize_name(n) for n in allowed}

        def wanted(distribution: str, name: str) -> bool:
            return (autoload or distribution == OWN_DISTRIBUTION or name in permitted
                    or canonicalize_name(distribution) in permitted)

        found, known = find_entry_points(GROUP, wanted, path=path)
        registry = cls()
        for name, claims in found.items():
            first = claims[0]
            registry._entries[name] = PluginEntry(
                name, first.distribution, first.version, first.value, entry=first.entry_point,
                error=claimed_by_several(claims))
        for name in sorted(allowed):
            if name not in known and canonicalize_name(name) not in known:
                raise RegistryError(
                    f"allow / {ALLOW_ENV}: {name!r} is neither an installed distribution nor a "
                    f"plugin{suggest(name, known)}; `steadytrain plugins` lists the plugins"
                )
        return registry

    def register(self, factory: type[Plugin], name: str | None = None) -> None:
        """Register a plugin class in-process (notebooks, tests), under *name* or its own."""
        name = name or getattr(factory, "name", "")
        if not name:
            raise RegistryError(f"{factory!r} has no name: pass name=...")
        try:
            validate_plugin_class(factory, name)
        except RegistryError as exc:
            raise RegistryError(f"cannot register {name!r}: {exc}") from None
        if name in self._entries:
            raise RegistryError(
                f"cannot register {name!r}: the name is taken by {self._entries[name].origin}"
            )
        self._entries[name] = PluginEntry(name, factory=factory)

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def names(self) -> list[str]:
        return sorted(self._entries)

    def entry(self, name: str) -> PluginEntry:
        try:
            return self._entries[name]
        except KeyError:
            raise RegistryError(
                f"unknown plugin {name!r}{suggest(name, self._entries)}; "
                f"`steadytrain plugins` lists the installed ones"
            ) from None

    def get(self, name: str) -> type[Plugin]:
        """The plugin class called *name*; a clear error if unknown or broken."""
        return self.entry(name).load()

    def entries(self) -> list[PluginEntry]:
        """Every entry, loaded (so broken ones carry their error), sorted by name."""
        for entry in self._entries.values():
            with contextlib.suppress(RegistryError):
                entry.load()
        return [self._entries[n] for n in self.names()]
