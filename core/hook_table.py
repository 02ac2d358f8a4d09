"""The hook table: plugin instances by id, checked against the contract, in call order.

pluggy finds the hook implementations and checks their signatures; this module adds the
checks that pluggy cannot make and without which a technique would silently do nothing:
a method named like a hook but not marked with ``@hookimpl`` (it would never run), an
argument with a default (pluggy would never pass it), a hook wrapper, a class or a name
passed where an instance belongs.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pluggy

from . import hookspecs, trace
from .errors import ConfigError, HookError, RegistryError, SteadytrainError, UsageError
from .hookspecs import HOOK_NAMES, STEP_HOOKS

#: One entry of a hook's dispatch: instance id, the bound implementation, whether it takes
#: its argument (an implementation may leave ``ctx``/``run`` out of its signature).
Dispatch = tuple[str, Callable[..., Any], bool]


def hook_manager() -> pluggy.PluginManager:
    """A fresh plugin manager that knows the hook specifications."""
    manager = pluggy.PluginManager(hookspecs.PROJECT_NAME)
    manager.add_hookspecs(hookspecs)
    return manager


_PARSER = hook_manager()


def implemented_hooks(plugin: object) -> tuple[str, ...]:
    """The hook names *plugin* (a class or an object) implements, in contract order."""
    return tuple(n for n in HOOK_NAMES if _PARSER.parse_hookimpl_opts(plugin, n) is not None)


def name_of(plugin: object) -> str:
    """A plugin's registered name, or its class name for a bare object."""
    return getattr(plugin, "name", "") or type(plugin).__name__


def check_hooks(plugin: object) -> None:
    """Raise :class:`RegistryError` unless every hook of *plugin* (a class or object) will run.

    The message says what is wrong; the caller prefixes it with the plugin's origin.
    """
    marked = set(implemented_hooks(plugin))
    for name in HOOK_NAMES:
        if name not in marked and callable(getattr(plugin, name, None)):
            raise RegistryError(
                f"method {name} is named like a hook but is not marked with "
                "@steadytrain.hookimpl, so it would never run; mark it, or rename it"
            )
    manager = hook_manager()
    try:
        manager.register(plugin, name="checked")
        manager.check_pending()
    except pluggy.PluginValidationError as exc:
        raise RegistryError(f"invalid hook implementation: {exc}") from None
    for name in marked:
        (impl,) = getattr(manager.hook, name).get_hookimpls()
        if impl.hookwrapper or impl.wrapper:
            raise RegistryError(f"hook {name}: hook wrappers are not supported")
        if impl.kwargnames:
            raise RegistryError(
                f"hook {name}: argument(s) {', '.join(impl.kwargnames)} have a default, so "
                f"pluggy never passes them; write def {name}(self, {impl.kwargnames[0]}) "
                "without a default"
            )


def _check_instance(plugin: object) -> None:
    if isinstance(plugin, str):
        raise UsageError(
            f"got the plugin name {plugin!r} where a plugin instance belongs; build "
            f"pipelines from names with Pipeline.from_config({{'plugins': [{{'plugin': "
            f"{plugin!r}}}]}})"
        )
    if isinstance(plugin, type):
        raise UsageError(
            f"got the class {plugin.__qualname__} where a plugin instance belongs; pass "
            f"{plugin.__qualname__}() (or {plugin.__qualname__}(config, id=...))"
        )


def _then_gradients_changed(function: Callable[..., Any], takes_arg: bool
                            ) -> Callable[[Any], Any]:
    """*function*, followed by ``ctx.gradients_changed()``: a plugin that rescales gradients
    makes the shared gradient norms stale, even when it fails half-way."""
    def call(ctx: Any) -> Any:
        try:
            return function(ctx) if takes_arg else function()
        finally:
            ctx.gradients_changed()

    return call


class HookTable:
    """Plugin instances in config order and, for every hook, the implementations to call.

    pluggy calls the last registered implementation first, so instances are registered in
    reverse: hooks then run in config order, and ``tryfirst``/``trylast`` still move an
    implementation to the front or the back.
    """

    def __init__(self) -> None:
        self.instances: dict[str, object] = {}
        self._dispatch: dict[str, tuple[Dispatch, ...]] = {h: () for h in HOOK_NAMES}
        #: Whether each call is logged (:mod:`steadytrain.trace`); the switch is read here,
        #: once, so that the call loop stays the same when tracing is off.
        self.tracing = trace.enabled()

    def add(self, plugin: object, id: str | None = None) -> str:
        """Add *plugin* last under *id* (default: its own ``id`` or name); return the id.

        A refused plugin leaves the table as it was.
        """
        _check_instance(plugin)
        key = id or getattr(plugin, "id", None) or name_of(plugin)
        if key in self.instances:
            raise ConfigError(
                f"instance id {key!r} is used twice; give each instance of a plugin its own id"
            )
        try:
            check_hooks(plugin)
        except RegistryError as exc:
            raise RegistryError(f"plugin instance {key!r} ({name_of(plugin)}): {exc}") from None
        self.instances[key] = plugin
        self._rebuild()
        return key

    def _rebuild(self) -> None:
        manager = hook_manager()
        for key, plugin in reversed(self.instances.items()):
            manager.register(plugin, name=key)
        self._dispatch = {
            hook: tuple(
                self._entry(hook, impl.plugin_name, impl.function, bool(impl.argnames))
                for impl in reversed(getattr(manager.hook, hook).get_hookimpls())
            )
            for hook in HOOK_NAMES
        }

    def _entry(self, hook: str, key: str, function: Callable[..., Any], takes_arg: bool
               ) -> Dispatch:
        plugin = self.instances[key]
        if self.tracing:
            function = trace.traced(key, name_of(plugin), hook, function, takes_arg)
            takes_arg = True
        if hook == "after_backward" and getattr(plugin, "rescales_gradients", False):
            function, takes_arg = _then_gradients_changed(function, takes_arg), True
        return key, function, takes_arg

    def implementers(self, hook: str) -> tuple[str, ...]:
        """Ids of the instances that implement *hook*, in call order."""
        return tuple(key for key, _, _ in self._dispatch[hook])

    def call(self, hook: str, arg: Any, step: int) -> list[tuple[str, Any]]:
        """Call *hook* on every implementation; return ``(id, result)`` for non-None results.

        An exception is re-raised naming the instance, the hook and the step: a steadytrain
        error keeps its type and gains a note, anything else becomes a :class:`HookError`.
        """
        dispatch = self._dispatch[hook]
        if not dispatch:
            return []
        results: list[tuple[str, Any]] = []
        is_step = hook in STEP_HOOKS
        for key, function, takes_arg in dispatch:
            if is_step:
                arg.id = key
            try:
                result = function(arg) if takes_arg else function()
            except SteadytrainError as exc:
                exc.add_note(f"in plugin instance {key!r}, hook {hook}, step {step}")
                raise
            except Exception as exc:
                raise HookError(
                    f"plugin instance {key!r} ({name_of(self.instances[key])}) raised "
                    f"{type(exc).__name__} in {hook} at step {step}: {exc}",
                    id=key, hook=hook, step=step,
                ) from exc
            if result is not None:
                results.append((key, result))
        return results
