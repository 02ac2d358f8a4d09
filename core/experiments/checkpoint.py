"""Files of a run directory that must survive a kill at any moment: written whole, then renamed.

A file is written to a temporary name in the same directory, flushed to the disk, and
renamed over the old one with ``os.replace``, which is atomic on POSIX and Windows: a
process killed at any moment leaves either the old file or the new one, never a torn
one. A leftover temporary file is harmless and replaced by the next write.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from ..errors import CheckpointError

FORMAT = 1
CHECKPOINT = "checkpoint.pt"


def _replace(path: Path, write: Any) -> None:
    temporary = path.with_name(f".{path.name}.tmp")
    with open(temporary, "wb") as handle:
        write(handle)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)


def save_atomic(state: Mapping[str, Any], path: Path) -> None:
    """``torch.save`` *state* to *path* so that a kill leaves the old or the new file."""
    _replace(path, lambda handle: torch.save(dict(state), handle))


def write_json_atomic(data: Any, path: Path) -> None:
    """Write *data* as indented JSON, atomically."""
    text = json.dumps(data, indent=2, allow_nan=True) + "\n"
    _replace(path, lambda handle: handle.write(text.encode("utf-8")))


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Load a run checkpoint (``weights_only=True``); errors name the file."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no checkpoint to resume from") from None
    except Exception as exc:
        raise CheckpointError(f"{path}: not a readable checkpoint: {exc}") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a steadytrain run checkpoint (format {FORMAT})")
    return state
