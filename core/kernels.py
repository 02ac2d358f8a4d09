"""Whether a plugin's own Triton kernels may run on a device.

Some built-in plugins have a Triton kernel for work that torch's own kernels do in
several passes or many launches; each falls back to torch's kernels where
:func:`triton_runs_on` is false. Set the environment variable ``STEADYTRAIN_TRITON=0`` to
keep every plugin on torch's kernels (to compare, or to rule the kernels out).
"""

from __future__ import annotations

import functools
import importlib.util
import os

import torch

#: Triton's supported NVIDIA GPUs: compute capability 8.0 (Ampere) and newer.
MIN_CAPABILITY = (8, 0)


@functools.cache
def _importable() -> bool:
    return importlib.util.find_spec("triton") is not None


@functools.cache
def _capable(index: int) -> bool:
    return torch.cuda.get_device_capability(index) >= MIN_CAPABILITY


def triton_runs_on(device: torch.device) -> bool:
    """Whether Triton kernels may run on *device*: a CUDA device of compute capability
    8.0 or newer, Triton importable, and ``STEADYTRAIN_TRITON`` not set to ``0``."""
    if device.type != "cuda" or os.environ.get("STEADYTRAIN_TRITON", "1") == "0":
        return False
    index = device.index if device.index is not None else torch.cuda.current_device()
    return _importable() and _capable(index)
