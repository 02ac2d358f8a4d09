"""steadytrain's loggers: structured events that never write to the host's standard output.

Every event (``pipeline.assembled``, ``step.skipped``, a plugin's own) is logged through
:func:`get_logger`. Where it goes is the host's decision:

* a host that has configured structlog (``structlog.configure``) gets the events through
  that configuration, like its own;
* otherwise they are records of the standard library's logging tree, under the logger
  ``steadytrain`` (or the name given, e.g. ``steadytrain.experiments``), one record per
  event: the message is ``event key=value ...`` and ``record.steadytrain`` holds the
  event's fields as a dict. With logging unconfigured, Python's last-resort handler
  prints warnings and errors to standard error; ``logging.basicConfig(level=logging.INFO)``
  shows the rest, ``logging.getLogger("steadytrain").setLevel(logging.ERROR)`` silences
  the warnings.

structlog's own default, used by a library that logs through ``structlog.get_logger``
without a host configuration, prints every event to standard output, which is the
host's: that default is what this module avoids.
"""

from __future__ import annotations

import logging
from collections.abc import MutableMapping
from typing import Any

import structlog

#: The record attribute that holds an event's fields on the standard-library route.
RECORD_FIELD = "steadytrain"


def _as_record(_logger: Any, _method: str, event: MutableMapping[str, Any]) -> Any:
    """The last processor of the standard-library route: the message and the fields."""
    fields = " ".join(f"{key}={value!r}" for key, value in event.items() if key != "event")
    message = f"{event.get('event')} {fields}".rstrip()
    return (message,), {"extra": {RECORD_FIELD: dict(event)}}


class LibraryLogger:
    """A structlog logger that follows the host's structlog configuration if there is one,
    and the standard library's logging tree if there is not (decided at every call, so
    that configuring logging after import counts)."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._configured = structlog.get_logger(name)
        self._stdlib = structlog.wrap_logger(
            logging.getLogger(name),
            processors=[structlog.stdlib.filter_by_level, _as_record],
            wrapper_class=structlog.stdlib.BoundLogger,
        )

    def __getattr__(self, method: str) -> Any:
        target = self._configured if structlog.is_configured() else self._stdlib
        return getattr(target, method)

    def __repr__(self) -> str:
        return f"<steadytrain logger {self.name!r}>"


def get_logger(name: str = "steadytrain") -> LibraryLogger:
    """The logger a plugin or host module of steadytrain logs its events with.

    Use it as a structlog logger: ``log.warning("acme.clipped", id=self.id, step=ctx.step)``.
    """
    return LibraryLogger(name)
