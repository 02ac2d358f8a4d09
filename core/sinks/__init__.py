"""Where metrics go: JSON lines, CSV and TensorBoard sinks, and the run's metadata.

A sink has three methods: ``write_metadata(metadata)``, ``write(step, metrics)`` and
``close()``. :class:`MetricLogger` reads ``pipe.metrics()`` (the one host sync) every
``every`` optimizer steps and hands the numbers to its sinks, after giving each the
run's metadata (:func:`run_metadata`)::

    from steadytrain.sinks import CsvSink, JsonLinesSink, MetricLogger

    logger = MetricLogger(pipe, [JsonLinesSink("run/metrics.jsonl")], every=50)
    for x, y in loader:
        ...                      # the documented step, ending with pipe.consolidate()
        logger.after_step()
    logger.close()               # the last, partial interval, then closes the sinks

Between log intervals nothing is read from the device: the metrics stay device tensors
until ``pipe.metrics()``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

from ..config import RunConfig
from ..errors import ConfigError
from ..pipeline import Pipeline
from .files import CsvSink, JsonLinesSink
from .metadata import run_metadata
from .tensorboard import TensorBoardSink


class MetricSink(Protocol):
    """Where a run's metrics go."""

    def write_metadata(self, metadata: Mapping[str, Any]) -> None: ...

    def write(self, step: int, metrics: Mapping[str, float]) -> None: ...

    def close(self) -> None: ...


class MetricLogger:
    """Hands the pipeline's metrics to *sinks* every *every* optimizer steps.

    The step recorded with each interval is the number of optimizer steps completed
    (``pipe.run.step``). *config* is passed on to :func:`run_metadata`.
    """

    def __init__(
        self,
        pipe: Pipeline,
        sinks: Sequence[MetricSink],
        *,
        every: int,
        config: RunConfig | Mapping[str, Any] | str | Path | None = None,
    ) -> None:
        if not (isinstance(every, int) and not isinstance(every, bool) and every >= 1):
            raise ConfigError(
                f"MetricLogger(every=...): the log interval must be an integer >= 1 "
                f"(optimizer steps), got {every!r}"
            )
        self.pipe, self.sinks, self.every = pipe, list(sinks), every
        self._logged_step: int | None = None
        metadata = run_metadata(pipe, config=config)
        for sink in self.sinks:
            sink.write_metadata(metadata)

    def after_step(self) -> dict[str, float] | None:
        """Call after ``pipe.consolidate()``: at a log interval, write and return the metrics."""
        step = self.pipe.run.step
        if step % self.every or step == self._logged_step:
            return None
        return self.flush()

    def flush(self) -> dict[str, float] | None:
        """Write the metrics recorded since the last interval now (``None`` if there are none)."""
        if not self.pipe.run.metrics.names():
            return None
        metrics = self.pipe.metrics()
        self._logged_step = step = self.pipe.run.step
        for sink in self.sinks:
            sink.write(step, metrics)
        return metrics

    def close(self) -> None:
        """Write what the last, partial interval recorded, then close every sink."""
        try:
            self.flush()
        finally:
            for sink in self.sinks:
                sink.close()


__all__ = [
    "CsvSink",
    "JsonLinesSink",
    "MetricLogger",
    "MetricSink",
    "TensorBoardSink",
    "run_metadata",
]
