"""Metrics that stay on the device until someone asks for numbers."""

from __future__ import annotations

import torch
import torch.distributed as dist

#: Recorded values kept per metric before they are summed on the device.
FOLD_EVERY = 256


class MetricStore:
    """Means of scalar metrics over a logging window, computed on the tensors' devices.

    :meth:`record` only keeps a detached reference (no kernel launch, no host sync); every
    :data:`FOLD_EVERY` values of a metric are summed on its device. :meth:`compute` turns
    every mean into a Python float with one transfer per device and, under
    ``torch.distributed``, averages across ranks (every rank must record the same names).
    """

    def __init__(self) -> None:
        self._pending: dict[str, list[torch.Tensor]] = {}
        self._sums: dict[str, torch.Tensor] = {}
        self._counts: dict[str, int] = {}
        self.first_step: int | None = None
        self.last_step: int | None = None

    def record(self, name: str, value: torch.Tensor | float, *, step: int | None = None) -> None:
        """Add *value* (a scalar tensor or number) to the window of *name*."""
        if isinstance(value, torch.Tensor):
            if value.numel() != 1:
                raise ValueError(
                    f"metric {name!r} must be a scalar, got a tensor of shape {tuple(value.shape)}"
                )
            value = value.detach()
            if value.dim():
                value = value.reshape(())
        else:
            value = torch.tensor(float(value))
        pending = self._pending.get(name)
        if pending is None:
            pending = self._pending[name] = []
            self._counts[name] = 0
        pending.append(value)
        self._counts[name] += 1
        if len(pending) >= FOLD_EVERY:
            self._fold(name)
        if step is not None:
            if self.first_step is None:
                self.first_step = step
            self.last_step = step

    def _fold(self, name: str) -> None:
        pending = self._pending[name]
        if not pending:
            return
        stacked = torch.stack(pending)
        total = stacked.to(torch.float64 if stacked.device.type == "cpu" else torch.float32).sum()
        previous = self._sums.get(name)
        self._sums[name] = total if previous is None else previous + total
        pending.clear()

    def __contains__(self, name: str) -> bool:
        return name in self._counts

    def names(self) -> list[str]:
        return sorted(self._counts)

    def compute(self) -> dict[str, float]:
        """The mean of every metric since the last :meth:`reset`, as Python floats."""
        names = self.names()
        for name in names:
            self._fold(name)
        by_device: dict[torch.device, list[str]] = {}
        for name in names:
            by_device.setdefault(self._sums[name].device, []).append(name)
        result: dict[str, float] = {}
        for device, group in by_device.items():
            sums = torch.stack([self._sums[n] for n in group])
            counts = torch.tensor([float(self._counts[n]) for n in group], dtype=sums.dtype,
                                  device=device)
            if dist.is_available() and dist.is_initialized():
                dist.all_reduce(sums)
                dist.all_reduce(counts)
            result.update(zip(group, (sums / counts).tolist(), strict=True))
        return result

    def reset(self) -> None:
        self._pending.clear()
        self._sums.clear()
        self._counts.clear()
        self.first_step = self.last_step = None
