"""Tracing: log every hook call with its instance, hook, step and duration.

Set the environment variable ``STEADYTRAIN_TRACE=1`` (or pass ``steadytrain --trace``)
before a pipeline is built, and each hook call emits the structlog event ``hook.call``::

    hook.call id=clip plugin=grad_clip hook=after_backward step=12 micro_batch=3 ms=0.084

``micro_batch`` is ``None`` for lifecycle hooks; a call that raised carries
``error=<exception type>``. Durations are host time: on an accelerator they measure
kernel launches, not kernels (tracing adds no synchronization). The switch is read when a
pipeline is built; without it the hook table calls the implementations directly, so
tracing costs nothing when it is off.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import Any

from .logs import get_logger

TRACE_ENV = "STEADYTRAIN_TRACE"

log = get_logger()


def enabled() -> bool:
    """Whether ``STEADYTRAIN_TRACE`` asks for tracing (set, and neither empty nor ``0``)."""
    return os.environ.get(TRACE_ENV, "").strip() not in ("", "0")


def traced(
    key: str, plugin: str, hook: str, function: Callable[..., Any], takes_arg: bool
) -> Callable[[Any], Any]:
    """*function* (a hook implementation of instance *key*) wrapped to log each call.

    The wrapper always takes the hook's argument (a ``Run`` or a ``StepContext``, which
    both carry ``step``) and passes it on only when the implementation takes it.
    """

    def call(arg: Any) -> Any:
        start = time.perf_counter()
        error = None
        try:
            return function(arg) if takes_arg else function()
        except BaseException as exc:
            error = type(exc).__name__
            raise
        finally:
            ms = round((time.perf_counter() - start) * 1e3, 4)
            log.info("hook.call", id=key, plugin=plugin, hook=hook, step=arg.step,
                     micro_batch=getattr(arg, "micro_batch", None), ms=ms,
                     **({"error": error} if error else {}))

    return call
