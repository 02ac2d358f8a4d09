"""steadytrain: plugins that keep neural-network training stable, around any training loop.

Everything a plugin author or a host needs is importable from here; ``__all__`` is the
public API and built-in plugins use nothing else.
"""

from . import grad_norms, hookspecs, kernels, losses, schedules, sources, validators
from ._version import __version__
from .config import (
    GroupSpec,
    InstanceConfig,
    RunConfig,
    load_config,
    structure_config,
    structure_options,
    unstructure_config,
)
from .context import Run, SkipRequest, StepContext, StepOutcome, report
from .errors import (
    CheckpointError,
    ConfigError,
    FilterError,
    HookError,
    OptionError,
    RegistryError,
    SteadytrainError,
    TermError,
    TrainingError,
    UsageError,
    suggest,
)
from .filters import VariableFilter
from .hookspecs import hookimpl
from .logs import get_logger
from .metrics import MetricStore
from .optimizer_step import step_optimizer
from .pipeline import Pipeline
from .plugin import NoOptions, Plugin
from .registry import Registry

__all__ = [
    "CheckpointError",
    "ConfigError",
    "FilterError",
    "GroupSpec",
    "HookError",
    "InstanceConfig",
    "MetricStore",
    "NoOptions",
    "OptionError",
    "Pipeline",
    "Plugin",
    "Registry",
    "RegistryError",
    "Run",
    "RunConfig",
    "SkipRequest",
    "SteadytrainError",
    "StepContext",
    "StepOutcome",
    "TermError",
    "TrainingError",
    "UsageError",
    "VariableFilter",
    "__version__",
    "grad_norms",
    "get_logger",
    "hookimpl",
    "hookspecs",
    "kernels",
    "load_config",
    "losses",
    "report",
    "schedules",
    "sources",
    "step_optimizer",
    "structure_config",
    "structure_options",
    "suggest",
    "unstructure_config",
    "validators",
]
