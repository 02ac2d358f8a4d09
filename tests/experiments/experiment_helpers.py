"""Tiny run configs and a way to call the steadytrain command in a real subprocess."""

import io
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import torch

from steadytrain.experiments.progress import Progress

TINY_MODEL = {"name": "gpt", "layers": 1, "width": 16, "heads": 2}
TINY_DATA = {"source": "pydoc", "seq_len": 16, "batch_size": 4, "eval_batches": 2}


def tiny(steps=20, plugins=(), model=None, data=None, **train):
    """A run config of a few seconds: a 1-layer, 16-wide GPT on short windows."""
    return {
        "model": {**TINY_MODEL, **(model or {})},
        "data": {**TINY_DATA, **(data or {})},
        "train": {"steps": steps, "lr": 0.01, "log_every": 5, "checkpoint_every": 10, **train},
        "plugins": list(plugins),
    }


def write(path: Path, config: dict) -> Path:
    path.write_text(json.dumps(config), encoding="utf-8")
    return path


def steadytrain(*args, cwd: Path, timeout: float = 240, **kwargs) -> subprocess.CompletedProcess:
    """``python -m steadytrain ARGS`` in *cwd*, output captured as text."""
    return subprocess.run([sys.executable, "-m", "steadytrain", *map(str, args)], cwd=cwd,
                          capture_output=True, text=True, timeout=timeout, env=env(), **kwargs)


def start(*args, cwd: Path) -> subprocess.Popen:
    """``python -m steadytrain ARGS`` started in the background."""
    return subprocess.Popen([sys.executable, "-m", "steadytrain", *map(str, args)], cwd=cwd,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env())


def env() -> dict:
    return {**os.environ, "PYTHONUNBUFFERED": "1"}


def final_weights(run: Path) -> dict:
    """The model weights of a run's checkpoint."""
    return torch.load(run / "checkpoint.pt", weights_only=True)["model"]


def metrics_lines(run: Path) -> list:
    path = run / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line]


class CtrlCAt(Progress):
    """A progress display for ``train(..., progress=)`` that presses Ctrl-C (a real SIGINT
    to this process) once *step* is done: the run stops there, resumable."""

    def __init__(self, step: int, total: int) -> None:
        super().__init__("run", total, stream=io.StringIO())
        self.step = step

    def update(self, done: int, text: str = "", *, force: bool = False) -> None:
        super().update(done, text, force=force)
        if done == self.step:
            signal.raise_signal(signal.SIGINT)
