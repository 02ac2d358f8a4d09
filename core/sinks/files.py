"""Metric sinks that write files: JSON lines and CSV."""

from __future__ import annotations

import csv
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any


def _open(path: str | Path, append: bool) -> Any:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return path.open("a" if append else "w", encoding="utf-8", newline="")


class JsonLinesSink:
    """One JSON object per line: ``{"metadata": {...}}`` for a run's metadata, then
    ``{"step": 100, "metrics": {"loss/task": 0.52, ...}}`` per log interval.

    Non-finite values are written as ``NaN`` and ``Infinity``, which Python's
    :mod:`json` reads back. With ``append=True`` a resumed run adds to the file (its
    metadata line too).
    """

    def __init__(self, path: str | Path, *, append: bool = False) -> None:
        self.path = Path(path)
        self._file = _open(self.path, append)

    def _line(self, record: Mapping[str, Any]) -> None:
        self._file.write(json.dumps(record, default=str) + "\n")
        self._file.flush()

    def write_metadata(self, metadata: Mapping[str, Any]) -> None:
        self._line({"metadata": metadata})

    def write(self, step: int, metrics: Mapping[str, float]) -> None:
        self._line({"step": step, "metrics": dict(metrics)})

    def close(self) -> None:
        self._file.close()


class CsvSink:
    """Rows ``step,metric,value`` (one per metric and log interval, so that metrics that
    appear later in a run need no new column); the metadata goes to
    ``<name>.metadata.json`` beside the file."""

    HEADER = ("step", "metric", "value")

    def __init__(self, path: str | Path, *, append: bool = False) -> None:
        self.path = Path(path)
        fresh = not (append and self.path.exists() and self.path.stat().st_size)
        self._file = _open(self.path, append)
        self._writer = csv.writer(self._file)
        if fresh:
            self._writer.writerow(self.HEADER)

    @property
    def metadata_path(self) -> Path:
        return self.path.with_suffix(".metadata.json")

    def write_metadata(self, metadata: Mapping[str, Any]) -> None:
        self.metadata_path.write_text(json.dumps(metadata, indent=2, default=str) + "\n",
                                      encoding="utf-8")

    def write(self, step: int, metrics: Mapping[str, float]) -> None:
        self._writer.writerows((step, name, value) for name, value in metrics.items())
        self._file.flush()

    def close(self) -> None:
        self._file.close()
