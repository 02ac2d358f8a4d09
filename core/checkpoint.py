"""Pipeline checkpoints: what ``Pipeline.state_dict()`` holds, and an all-or-nothing load.

Layout (``format`` 1)::

    {"format": 1, "core_version": "0.1.0",
     "counters": {"step": int, "epoch": int, "skipped_steps": int},
     "instances": {id: {"plugin": name, "state": <the instance's state_dict()>}}}

Every value is one that ``torch.load(weights_only=True)`` accepts; saving refuses
anything else, naming the instance and the key. Loading checks the whole checkpoint
(format, counters, the instance set) first, then loads every instance; if one refuses,
those already loaded get their previous state back and nothing has changed.
"""

from __future__ import annotations

import collections
import copy
from collections.abc import Mapping
from typing import Any

import torch

from ._version import __version__
from .errors import CheckpointError
from .hook_table import name_of

CHECKPOINT_FORMAT = 1
COUNTERS = ("step", "epoch", "skipped_steps")

# What torch's weights-only unpickler rebuilds (exact types: a subclass such as a
# namedtuple or a deque is pickled by class and refused at load time).
_SCALARS = (bool, int, float, complex, str, bytes, bytearray, type(None), torch.Size,
            torch.dtype, torch.device)
_MAPPINGS = (dict, collections.OrderedDict, collections.Counter)
_SEQUENCES = (list, tuple, set)


def check_loadable(value: Any, where: str) -> None:
    """Raise :class:`CheckpointError` naming *where* if ``weights_only`` loading would refuse
    *value* (or anything inside it)."""
    kind = type(value)
    if isinstance(value, torch.Tensor) or kind in _SCALARS:
        return
    if kind in _MAPPINGS:
        for key, item in value.items():
            check_loadable(key, f"{where} (a key)")
            check_loadable(item, f"{where}[{key!r}]")
        return
    if kind in _SEQUENCES:
        for index, item in enumerate(value):
            check_loadable(item, f"{where}[{index}]")
        return
    raise CheckpointError(
        f"{where} is a {kind.__module__}.{kind.__qualname__}, which "
        "torch.load(weights_only=True) refuses, so the checkpoint could not be resumed; "
        "store tensors, numbers, strings, and lists, tuples or dicts of them"
    )


def pipeline_state(counters: Mapping[str, int], instances: Mapping[str, object]) -> dict:
    """The checkpoint of a pipeline with *counters* and plugin *instances*."""
    states = {}
    for key, plugin in instances.items():
        try:
            state = plugin.state_dict() if hasattr(plugin, "state_dict") else {}
        except Exception as exc:
            raise CheckpointError(
                f"plugin instance {key!r}: state_dict() raised {type(exc).__name__}: {exc}; "
                "a plugin may have no state before pipe.setup(model, optimizer)"
            ) from exc
        if not isinstance(state, Mapping):
            raise CheckpointError(
                f"plugin instance {key!r}: state_dict() must return a dict, got "
                f"{type(state).__name__}"
            )
        for name, value in state.items():
            check_loadable(value, f"plugin instance {key!r}: state_dict()[{name!r}]")
        states[key] = {"plugin": name_of(plugin), "state": dict(state)}
    return {
        "format": CHECKPOINT_FORMAT,
        "core_version": __version__,
        "counters": {name: counters[name] for name in COUNTERS},
        "instances": states,
    }


def parse_state(
    state: Any, instances: Mapping[str, object]
) -> tuple[dict[str, int], dict[str, Mapping[str, Any]]]:
    """Check a whole checkpoint against *instances*; return its counters and instance states."""
    if not isinstance(state, Mapping) or state.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(
            "not a steadytrain pipeline checkpoint (no 'format' "
            f"{CHECKPOINT_FORMAT} entry); pass what Pipeline.state_dict() returned"
        )
    for entry in ("counters", "instances"):
        if not isinstance(state.get(entry), Mapping):
            raise CheckpointError(
                f"the checkpoint has no {entry!r} table; pass what Pipeline.state_dict() "
                "returned, unmodified"
            )
    counters = state["counters"]
    bad = [n for n in COUNTERS
           if not (isinstance(counters.get(n), int) and not isinstance(counters.get(n), bool)
                   and counters[n] >= 0)]
    if bad:
        raise CheckpointError(
            f"the checkpoint's counters {', '.join(bad)} are missing or not integers >= 0 "
            f"(got {dict(counters)!r})"
        )
    saved = {}
    for key, entry in state["instances"].items():
        if not (isinstance(entry, Mapping) and "plugin" in entry
                and isinstance(entry.get("state"), Mapping)):
            raise CheckpointError(
                f"the checkpoint's entry for instance {key!r} needs 'plugin' and 'state' "
                f"(got {sorted(entry) if isinstance(entry, Mapping) else type(entry).__name__})"
            )
        saved[key] = entry["plugin"]
    ours = {key: name_of(p) for key, p in instances.items()}
    if saved != ours:
        problems = []
        if missing := sorted(set(ours) - set(saved)):
            problems.append(f"instances not in the checkpoint: {', '.join(missing)}")
        if extra := sorted(set(saved) - set(ours)):
            problems.append(f"instances only in the checkpoint: {', '.join(extra)}")
        problems += [
            f"instance {key!r} is {ours[key]} here but {saved[key]} in the checkpoint"
            for key in sorted(set(saved) & set(ours))
            if saved[key] != ours[key]
        ]
        raise CheckpointError(
            "the checkpoint was saved with another plugin set: " + "; ".join(problems)
            + ". Load it with the config it was saved with."
        )
    return (
        {name: counters[name] for name in COUNTERS},
        {key: entry["state"] for key, entry in state["instances"].items()},
    )


def _put_back(key: str, plugin: Any, before: Any, failure: Exception) -> None:
    """Give a plugin whose load failed half-way its previous state, if it takes it back."""
    try:
        plugin.load_state_dict(before)
    except Exception as exc:
        failure.add_note(
            f"plugin instance {key!r} could not take its previous state back either "
            f"({type(exc).__name__}: {exc}); rebuild it before training on"
        )


def load_instances(instances: Mapping[str, object], states: Mapping[str, Any]) -> None:
    """Load every instance's state, or none: a refusal puts back the states already replaced."""
    done: list[tuple[object, Any]] = []
    try:
        for key, plugin in instances.items():
            if not hasattr(plugin, "load_state_dict"):
                continue
            before = copy.deepcopy(plugin.state_dict()) if hasattr(plugin, "state_dict") else {}
            try:
                plugin.load_state_dict(states[key])
            except Exception as exc:
                _put_back(key, plugin, before, exc)
                if isinstance(exc, CheckpointError):
                    raise
                raise CheckpointError(
                    f"plugin instance {key!r} could not load its state: "
                    f"{type(exc).__name__}: {exc}"
                ) from exc
            done.append((plugin, before))
    except CheckpointError:
        for plugin, before in reversed(done):
            plugin.load_state_dict(before)
        raise
