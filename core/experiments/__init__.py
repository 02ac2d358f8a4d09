"""The built-in experiments behind ``steadytrain run``, ``compare`` and ``demo``.

Built-in models (:data:`MODELS`: a byte-level GPT, a memory-augmented LM, a grid
emulator), byte-level text data, the training loop with checkpoints and resume, the
measures of stability over a learning-rate sweep, and the comparison's table and plots.
"""

from .compare import compare, lr_sweep
from .loop import RunError, train
from .models import MODELS
from .settings import (
    DataSettings,
    ExperimentConfig,
    ModelSettings,
    TrainSettings,
    load_experiment,
)

__all__ = [
    "MODELS",
    "DataSettings",
    "ExperimentConfig",
    "ModelSettings",
    "RunError",
    "TrainSettings",
    "compare",
    "load_experiment",
    "lr_sweep",
    "train",
]
