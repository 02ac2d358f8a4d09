"""A metric sink for TensorBoard, through ``torch.utils.tensorboard`` (optional)."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..errors import ConfigError

METADATA_TAG = "steadytrain/run_metadata"


class TensorBoardSink:
    """Scalars under the metric names, and the run's metadata as the text
    ``steadytrain/run_metadata``, in an event file under *log_dir*.

    Needs the ``tensorboard`` package, imported when the sink is made.
    """

    def __init__(self, log_dir: str | Path) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise ConfigError(
                "TensorBoardSink needs the tensorboard package: pip install tensorboard "
                "(or write metrics with JsonLinesSink or CsvSink)"
            ) from None
        self.log_dir = Path(log_dir)
        self._writer = SummaryWriter(log_dir=str(self.log_dir))

    def write_metadata(self, metadata: Mapping[str, Any]) -> None:
        # Indented lines render as a code block in TensorBoard's text tab.
        text = json.dumps(metadata, indent=2, default=str).replace("\n", "\n    ")
        self._writer.add_text(METADATA_TAG, "    " + text)
        self._writer.flush()

    def write(self, step: int, metrics: Mapping[str, float]) -> None:
        for name, value in metrics.items():
            self._writer.add_scalar(name, value, global_step=step)
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()
