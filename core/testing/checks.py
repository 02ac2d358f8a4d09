"""The conformance checks: what every plugin, built-in or third-party, must do.

Each check takes the plugin class, its :class:`~steadytrain.testing.Fixture` and the
device to train on, and raises on the first problem it finds. :data:`CHECKS` maps the
check names (the ids the pytest plugin gives its tests) to them, in the order they run.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import attrs
import torch

from ..config import structure_config, unstructure_config
from ..errors import ConfigError, SteadytrainError
from ..hook_table import check_hooks, implemented_hooks
from ..pipeline import Pipeline
from ..registry import Registry, validate_plugin_class
from .fixture import Fixture
from .host_sync import HostSyncError, no_host_sync
from .session import Session, batches

#: A pattern that matches no variable of any fixture.
UNMATCHED = "no_such_variable_zz9"
#: The instance id of single-instance runs.
ID = "under_test"


class ConformanceError(SteadytrainError, AssertionError):
    """A plugin fails a conformance check; the message names the plugin and the check."""


def _registry(plugin: type) -> Registry:
    registry = Registry()
    registry.register(plugin)
    return registry


def _entry(plugin: type, fixture: Fixture, id: str = ID, **overrides: Any) -> dict[str, Any]:
    return {"plugin": plugin.name, "id": id, **fixture.options, **overrides}


def _config(*entries: Mapping[str, Any], **settings: Any) -> dict[str, Any]:
    return {"plugins": list(entries), **settings}


def _start(plugin: type, fixture: Fixture, device: torch.device, *entries: Mapping[str, Any],
           **settings: Any) -> Session:
    return Session.start(_config(*(entries or (_entry(plugin, fixture),)), **settings),
                         _registry(plugin), fixture, device)


def _fail(message: str) -> None:
    raise ConformanceError(message)


# -- comparisons ---------------------------------------------------------------------------


def _differences(a: Any, b: Any, path: str) -> Iterator[str]:
    """Where *a* and *b* differ, bit for bit (NaN equals NaN in the same place)."""
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        if (a.dtype, a.shape) != (b.dtype, b.shape):
            yield f"{path}: {a.dtype}{tuple(a.shape)} != {b.dtype}{tuple(b.shape)}"
        elif a.is_floating_point() or a.is_complex():
            nan = a.isnan()
            if not (torch.equal(nan, b.isnan()) and torch.equal(a[~nan], b[~nan])):
                yield f"{path}: tensors differ (largest difference {(a - b).abs().max()})"
        elif not torch.equal(a, b):
            yield f"{path}: tensors differ"
    elif isinstance(a, Mapping) and isinstance(b, Mapping):
        if list(a) != list(b):
            yield f"{path}: keys {list(a)} != {list(b)}"
        else:
            for key in a:
                yield from _differences(a[key], b[key], f"{path}[{key!r}]")
    elif isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)) and len(a) == len(b):
        for index, (x, y) in enumerate(zip(a, b, strict=True)):
            yield from _differences(x, y, f"{path}[{index}]")
    elif not (a == b or (isinstance(a, float) and isinstance(b, float)
                         and math.isnan(a) and math.isnan(b))):
        yield f"{path}: {a!r} != {b!r}"


def _require_equal(a: Any, b: Any, what: str, advice: str) -> None:
    diffs = list(_differences(a, b, what))
    if diffs:
        shown = "; ".join(diffs[:5]) + ("; …" if len(diffs) > 5 else "")
        _fail(f"{shown}. {advice}")


def _tensors(value: Any) -> Iterator[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, Mapping):
        for item in value.values():
            yield from _tensors(item)
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from _tensors(item)


def _metric_names(metrics: Mapping[str, float], id: str) -> set[str]:
    """The names of instance *id*'s metrics, with the id replaced by ``{id}``."""
    names = set()
    for name in metrics:
        head, _, rest = name.partition("/")
        if head == id:
            names.add("{id}/" + rest)
        elif head in ("reg", "reg_weighted") and rest.startswith(f"{id}/"):
            names.add(f"{head}/{{id}}/" + rest[len(id) + 1:])
    return names


# -- the checks ----------------------------------------------------------------------------


def builds_from_defaults(plugin: type, fixture: Fixture, device: torch.device) -> None:
    """The class is a valid plugin and builds, directly and from a config, with no options."""
    validate_plugin_class(plugin, plugin.name)
    try:
        default = plugin.Config()
    except Exception as exc:
        _fail(f"{plugin.__qualname__}.Config() raised {type(exc).__name__}: {exc}; give every "
              "option a default (from the literature) so that the plugin builds by name alone")
    if plugin().config != default:
        _fail(f"{plugin.__qualname__}() does not use Config() when no config is given")
    pipe = Pipeline.from_config(_config({"plugin": plugin.name}), registry=_registry(plugin))
    if pipe.plugins[plugin.name].config != default:
        _fail(f"a config entry without options does not build {plugin.__qualname__}.Config()")


def config_round_trips(plugin: type, fixture: Fixture, device: torch.device) -> None:
    """The fixture's config entry structures, unstructures to JSON-able data with every
    option (defaults included), and structures back to an equal config."""
    registry = _registry(plugin)
    config = structure_config(_config(_entry(plugin, fixture, weight=0.5)), registry=registry)
    plain = unstructure_config(config)
    try:
        plain = json.loads(json.dumps(plain))
    except (TypeError, ValueError) as exc:
        _fail(f"the unstructured config is not plain data ({exc}); options must be numbers, "
              "strings, booleans, lists, tables or nested attrs classes of them")
    missing = [f.name for f in attrs.fields(plugin.Config) if f.name not in plain["plugins"][0]]
    if missing:
        _fail(f"unstructure_config leaves out the options {missing}")
    again = structure_config(plain, registry=registry)
    if again != config:
        _fail(f"the config does not survive unstructure_config and structure_config: "
              f"{config.plugins[0].options!r} came back as {again.plugins[0].options!r}")


def hooks_match_spec(plugin: type, fixture: Fixture, device: torch.device) -> None:
    """Every hook implementation is marked, known, takes only the spec's arguments, has no
    defaults and is no wrapper, on the class and on an instance."""
    check_hooks(plugin)
    check_hooks(plugin())
    if not implemented_hooks(plugin):
        _fail("the plugin implements no hook, so it can do nothing")


def trains_in_plain_loop(plugin: type, fixture: Fixture, device: torch.device) -> None:
    """A few steps of the plain loop with an epoch and an evaluation; all values finite."""
    session = _start(plugin, fixture, device)
    data = batches(fixture, fixture.steps + 1)
    with session.epoch():
        session.train(data[:-1])
    session.evaluate(data[-1][0])
    metrics = session.pipe.metrics()
    session.close()
    if session.pipe.run.step != fixture.steps:
        _fail(f"after {fixture.steps} steps the pipeline counts {session.pipe.run.step}")
    bad = sorted(n for n, v in metrics.items() if not math.isfinite(v))
    if bad:
        _fail(f"non-finite metrics after {fixture.steps} steps of a tiny model: {bad}")
    broken = [n for n, p in session.model.named_parameters() if not p.isfinite().all()]
    if broken:
        _fail(f"non-finite parameters after {fixture.steps} steps: {broken}")


def resumes_bit_exactly(plugin: type, fixture: Fixture, device: torch.device) -> None:
    """A run saved half-way (``torch.load(weights_only=True)``) and resumed in a fresh
    pipeline ends bit for bit where the uninterrupted run ends."""
    data = batches(fixture, fixture.steps + 1)
    half, evaluation = fixture.steps // 2, data[-1][0]
    straight = _start(plugin, fixture, device)
    straight.pipe.epoch_start()
    straight.train(data[:half])
    straight.evaluate(evaluation)
    straight.pipe.metrics()  # the window that the resumed run does not see
    straight.train(data[half:-1])
    straight.pipe.epoch_end()

    first = _start(plugin, fixture, device)
    first.pipe.epoch_start()
    first.train(data[:half])
    first.evaluate(evaluation)
    state = first.checkpoint()
    first.close()
    resumed = _start(plugin, fixture, device)
    resumed.resume(state)
    resumed.train(data[half:-1])
    resumed.pipe.epoch_end()

    advice = ("Return everything the plugin's behaviour depends on from state_dict() and "
              "restore it in load_state_dict()")
    _require_equal(resumed.pipe.state_dict(), straight.pipe.state_dict(), "state_dict()", advice)
    _require_equal(resumed.model.state_dict(), straight.model.state_dict(), "model", advice)
    _require_equal(resumed.optimizer.state_dict(), straight.optimizer.state_dict(), "optimizer",
                   advice)
    _require_equal(resumed.pipe.metrics(), straight.pipe.metrics(), "metrics", advice)
    straight.close()
    resumed.close()


def filters_reject_unmatched_patterns(plugin: type, fixture: Fixture,
                                      device: torch.device) -> None:
    """An include or exclude pattern that matches nothing is an error naming the instance
    (for a plugin without variables, any pattern is)."""
    if not plugin.uses_filter:
        try:
            plugin(include=[UNMATCHED], id=ID)
        except ConfigError as exc:
            if ID not in str(exc):
                _fail(f"the error does not name the instance {ID!r}: {exc}")
            return
        _fail("uses_filter is False, yet include patterns were accepted; they would do nothing")
    for option, default in (("include", ["*"]), ("exclude", [])):
        patterns = [*fixture.options.get(option, default), UNMATCHED]
        try:
            session = _start(plugin, fixture, device, _entry(plugin, fixture, **{option: patterns}))
            session.train(batches(fixture, fixture.steps))
        except ConfigError as exc:
            if ID not in str(exc):
                _fail(f"{option} = {patterns}: the error does not name the instance {ID!r}: {exc}")
            continue
        session.close()
        _fail(f"{option} = {patterns} was accepted though {UNMATCHED!r} matches nothing: a "
              "typo would silently change what the plugin acts on. Resolve the patterns with "
              "self.filter.select(names, kind=...) once the names are known")


def records_metrics_without_host_sync(plugin: type, fixture: Fixture,
                                      device: torch.device) -> None:
    """After the fixture's warm-up steps, no pipeline call syncs the host: metrics stay on
    the device until ``pipe.metrics()`` (see :mod:`steadytrain.testing.host_sync`)."""
    options = {**fixture.options, **(fixture.cpu_options if device.type == "cpu" else {})}
    session = _start(plugin, fixture, device, {"plugin": plugin.name, "id": ID, **options},
                     finite_check="log")
    data = batches(fixture, fixture.steps)
    session.train(data[:fixture.warmup_steps])
    for step, (inputs, targets) in enumerate(data[fixture.warmup_steps:], fixture.warmup_steps):
        session.watch = lambda call, step=step: no_host_sync(device, f"step {step}, {call}()")
        try:
            session.step(inputs, targets)
        except Exception as exc:
            cause = exc if isinstance(exc, HostSyncError) else exc.__cause__
            if isinstance(cause, HostSyncError) or "synchroniz" in str(cause or ""):
                _fail(f"{exc}")
            raise
    session.pipe.metrics()
    session.close()


def survives_two_instances(plugin: type, fixture: Fixture, device: torch.device) -> None:
    """Two instances with different ids train side by side, record the same metrics each
    under its own id, share no state tensors, and checkpoint and load together."""
    ids = ("first", "second")
    data = batches(fixture, fixture.steps)
    single = _start(plugin, fixture, device)
    single.train(data)
    expected = _metric_names(single.pipe.metrics(), ID)
    single.close()
    both = _start(plugin, fixture, device, *(_entry(plugin, fixture, id) for id in ids))
    both.train(data)
    metrics = both.pipe.metrics()
    foreign = sorted(n for n in metrics if not n.startswith("loss/")
                     and not any(_metric_names({n: 0.0}, id) for id in ids))
    if foreign:
        _fail(f"metrics {foreign} belong to no instance, so two instances write into one "
              "metric: record metrics with ctx.log (or run.log), which names them by the id")
    for id in ids:
        names = _metric_names(metrics, id)
        if names != expected:
            _fail(f"instance {id!r} records {sorted(names)}, a single instance records "
                  f"{sorted(expected)}: record metrics with ctx.log, which names them by ctx.id")
    first, second = (both.pipe.plugins[id] for id in ids)
    # Both states stay alive while compared: a freed copy's memory may hold the next one.
    states = first.state_dict(), second.state_dict()
    storages = [{t.untyped_storage().data_ptr() for t in _tensors(s) if t.numel()}
                for s in states]
    if storages[0] & storages[1]:
        _fail("the two instances share state tensors: create state in __init__ or setup, "
              "not as class attributes")
    state = both.checkpoint()
    both.close()
    again = _start(plugin, fixture, device, *(_entry(plugin, fixture, id) for id in ids))
    again.resume(state)
    _require_equal(again.pipe.state_dict(), state["pipeline"], "state_dict()",
                   "Each instance must load the state it saved")
    again.close()


Check = Callable[[type, Fixture, torch.device], None]

CHECKS: dict[str, Check] = {
    "builds_from_defaults": builds_from_defaults,
    "config_round_trips": config_round_trips,
    "hooks_match_spec": hooks_match_spec,
    "trains_in_plain_loop": trains_in_plain_loop,
    "resumes_bit_exactly": resumes_bit_exactly,
    "filters_reject_unmatched_patterns": filters_reject_unmatched_patterns,
    "records_metrics_without_host_sync": records_metrics_without_host_sync,
    "survives_two_instances": survives_two_instances,
}
