"""The built-in experiments behind ``steadytrain run``, ``compare`` and ``demo``."""
