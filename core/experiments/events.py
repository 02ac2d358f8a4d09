"""Where the structlog events of a run go: a JSON-lines file, and the terminal unless quiet.

The pipeline's events (``step.skipped``, ``stability.oscillation``, ...) and the run's own
(``run.started``, ``checkpoint.saved``, ``run.interrupted``, ...) all go to
``events.jsonl`` in the run directory, one JSON object per line with its level and time.
Events of level info and above are also shown on the terminal, one line each, above the
progress line; ``--quiet`` shows none.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, MutableMapping
from pathlib import Path
from typing import Any, TextIO

import structlog

LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING,
          "error": logging.ERROR, "critical": logging.CRITICAL}


def render(event: MutableMapping[str, Any]) -> str:
    """``warning  stability.oscillation  id=stability_monitor step=99 …`` on one line."""
    fields = " ".join(f"{k}={v}" for k, v in event.items()
                      if k not in ("event", "level", "timestamp"))
    return f"{event.get('level', 'info'):<8} {event['event']}  {fields}".rstrip()


class Sink:
    """The last structlog processor: write the event to the file and show it; drop it.

    The file is opened at the first event, so that it lands in the run directory as it
    is once the run has prepared it.
    """

    def __init__(self, path: Path | None, show: Callable[[str], None] | None) -> None:
        self.path, self.show = path, show
        self.file: TextIO | None = None

    def __call__(self, _logger: Any, _method: str, event: MutableMapping[str, Any]) -> Any:
        if self.path is not None:
            if self.file is None:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                self.file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115
            self.file.write(json.dumps(event, default=str) + "\n")
            self.file.flush()
        if self.show is not None and LEVELS.get(event.get("level", "info"), 20) >= logging.INFO:
            self.show(render(event))
        raise structlog.DropEvent


def configure(path: Path | None, show: Callable[[str], None] | None) -> Callable[[], None]:
    """Send every event to *path* (appended) and those of level info and up to *show*.

    Returns the function that closes the file and restores structlog's defaults.
    """
    sink = Sink(path, show)
    structlog.configure(
        processors=[structlog.processors.add_log_level,
                    structlog.processors.TimeStamper(fmt="iso"), sink],
        wrapper_class=structlog.make_filtering_bound_logger(logging.DEBUG),
        logger_factory=structlog.ReturnLoggerFactory(),
        cache_logger_on_first_use=False,
    )

    def restore() -> None:
        structlog.reset_defaults()
        if sink.file is not None:
            sink.file.close()

    return restore
