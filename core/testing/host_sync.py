"""Catching host-device synchronizations inside the pipeline's calls.

On CUDA the kit runs each watched pipeline call under ``torch.cuda.set_sync_debug_mode``
(``"error"``): any synchronizing CUDA call raises. On the CPU nothing synchronizes, so the
kit watches for the calls that would on an accelerator, with a
:class:`torch.overrides.TorchFunctionMode`: reading a tensor's value on the host
(``item``, ``tolist``, ``bool()``, ``float()``, ``int()``, formatting, ``numpy``) and the
operations whose output shape depends on the values (``nonzero``, ``masked_select``,
``unique``, indexing with a boolean mask). The CPU watch sees Python-level calls only: a
sync hidden inside a compiled extension goes unseen there, and shows on CUDA.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

#: Calls that read values on the host or make shapes depend on values.
SYNCING_CALLS = frozenset({
    "item", "tolist", "numpy", "__bool__", "__float__", "__int__", "__index__",
    "__complex__", "__format__", "nonzero", "argwhere", "masked_select", "unique",
    "unique_consecutive", "equal", "allclose", "bincount",
})


#: What to do instead, in every failure's message.
ADVICE = ("keep the value on the device (torch.where, masked arithmetic) or record it with "
          "ctx.log")


def _has_bool_mask(index: Any) -> bool:
    items = index if isinstance(index, tuple) else (index,)
    return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in items)


class HostSyncError(AssertionError):
    """A watched call synchronized (or, on the CPU, would synchronize) the host."""


class _CpuWatch(TorchFunctionMode):
    def __init__(self, where: str) -> None:
        super().__init__()
        self.where = where

    def __torch_function__(self, func: Any, types: Any, args: tuple = (),
                           kwargs: dict | None = None) -> Any:
        name = getattr(func, "__name__", "")
        if name in SYNCING_CALLS or (
            name in ("__getitem__", "__setitem__") and len(args) > 1 and _has_bool_mask(args[1])
        ):
            what = "indexing with a boolean mask" if name.endswith("item__") else f"{name}()"
            raise HostSyncError(
                f"{self.where}: {what} on a tensor reads its value on the host, which syncs "
                f"an accelerator; {ADVICE}"
            )
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def no_host_sync(device: torch.device, where: str) -> Iterator[None]:
    """Raise :class:`HostSyncError` naming *where* if the block syncs the host."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.set_sync_debug_mode("error")
        try:
            yield
        except Exception as exc:
            # A sync inside a hook reaches here as the HookError naming the plugin instance.
            cause = exc if isinstance(exc, RuntimeError) else exc.__cause__
            if not (isinstance(cause, RuntimeError) and "synchroniz" in str(cause)):
                raise
            raise HostSyncError(f"{where}: {exc}; {ADVICE}") from exc
        finally:
            torch.cuda.set_sync_debug_mode("default")
    else:
        with _CpuWatch(where):
            yield
