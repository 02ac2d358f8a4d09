"""``metadata.json``: what a run needs to be reproduced, written next to its metrics.

The file is :func:`steadytrain.sinks.run_metadata` of the run's pipeline (the versions of
steadytrain, Python and torch, and each plugin instance with its class, distribution and
version), with ``config`` widened to the whole run config: model, data, training
settings and pipeline, every default written out, in the form
:func:`~steadytrain.experiments.load_experiment` reads back. ``data_sha256`` identifies
the training text.

A resumed run keeps the file. When it resumes under other versions (an upgraded
steadytrain, torch or plugin distribution), the entry ``{"step": N, ...the versions}``
is appended to ``resumed_with``, so that a result trained under two sets of versions
says so.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..logs import get_logger
from ..pipeline import Pipeline
from ..sinks import run_metadata
from .checkpoint import write_json_atomic
from .settings import ExperimentConfig

METADATA = "metadata.json"
#: The keys of :func:`run_metadata` that describe the software, not the config.
VERSIONS = ("steadytrain", "python", "torch", "plugins")

log = get_logger("steadytrain.experiments")


def metadata_of(config: ExperimentConfig, pipe: Pipeline, data_sha256: str) -> dict[str, Any]:
    """The metadata of a run of *config* with *pipe*, as plain JSON data."""
    recorded = run_metadata(pipe, config=config.pipeline)
    recorded["config"] = config.to_dict()
    recorded["data_sha256"] = data_sha256
    return json.loads(json.dumps(recorded))  # tuples become lists, as in the file


def record_metadata(out: Path, config: ExperimentConfig, pipe: Pipeline, data_sha256: str,
                    *, step: int) -> None:
    """Write ``out/metadata.json`` for a run starting (or resuming) at *step*."""
    current = metadata_of(config, pipe, data_sha256)
    path = out / METADATA
    if step == 0 or not path.exists():
        write_json_atomic(current, path)
        return
    saved = json.loads(path.read_text(encoding="utf-8"))
    last = (saved.get("resumed_with") or [saved])[-1]
    versions = {key: current[key] for key in VERSIONS}
    if all(last.get(key) == value for key, value in versions.items()):
        return
    saved.setdefault("resumed_with", []).append({"step": step, **versions})
    write_json_atomic(saved, path)
    log.warning("run.versions_changed", step=step, out=str(out),
                changed=[key for key in VERSIONS if last.get(key) != versions[key]])
