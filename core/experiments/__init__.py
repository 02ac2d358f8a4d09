"""The built-in experiments: models, data, learning-rate sweeps and plots behind ``steadytrain run``, ``compare`` and ``demo``."""
