"""Metrics that stay on the device until someone asks for numbers."""

from __future__ import annotations

import torch
import torch.distributed as dist


class MetricStore:
    """Running sums of scalar metrics, one accumulator tensor per name and device.

    :meth:`record` adds in place on the tensor's device and never syncs the host;
    :meth:`compute` turns every mean into a Python float with one transfer per device and,
    under ``torch.distributed``, averages across ranks (every rank must record the same
    names).
    """

    def __init__(self) -> None:
        self._sums: dict[str, torch.Tensor] = {}
        self._counts: dict[str, int] = {}
        self.first_step: int | None = None
        self.last_step: int | None = None

    def record(self, name: str, value: torch.Tensor | float, *, step: int | None = None) -> None:
        """Add *value* (a scalar) to the running sum of *name*."""
        if isinstance(value, torch.Tensor):
            if value.numel() != 1:
                raise ValueError(
                    f"metric {name!r} must be a scalar, got a tensor of shape {tuple(value.shape)}"
                )
            value = value.detach().reshape(())
        else:
            value = torch.tensor(float(value))
        total = self._sums.get(name)
        if total is None:
            self._sums[name] = value.to(torch.float64 if value.device.type == "cpu"
                                        else torch.float32, copy=True)
            self._counts[name] = 1
        else:
            total.add_(value)
            self._counts[name] += 1
        if step is not None:
            if self.first_step is None:
                self.first_step = step
            self.last_step = step

    def __contains__(self, name: str) -> bool:
        return name in self._sums

    def names(self) -> list[str]:
        return sorted(self._sums)

    def compute(self) -> dict[str, float]:
        """The mean of every metric since the last :meth:`reset`, as Python floats."""
        names = self.names()
        if not names:
            return {}
        by_device: dict[torch.device, list[str]] = {}
        for name in names:
            by_device.setdefault(self._sums[name].device, []).append(name)
        result: dict[str, float] = {}
        for device, group in by_device.items():
            sums = torch.stack([self._sums[n].to(torch.float64) for n in group]).to(device)
            counts = torch.tensor([self._counts[n] for n in group], dtype=torch.float64,
                                  device=device)
            if dist.is_available() and dist.is_initialized():
                dist.all_reduce(sums)
                dist.all_reduce(counts)
            result.update(zip(group, (sums / counts).tolist(), strict=True))
        return result

    def reset(self) -> None:
        self._sums.clear()
        self._counts.clear()
        self.first_step = self.last_step = None
