"""A small grid emulator whose outputs pass through a physics corrector, on data made here.

The data come from a periodic ``grid × grid`` simulation: a sea-ice fraction in [0, 1]
advected by a fixed cellular flow, grown or melted by a fixed forcing map and clipped to
its bounds, and two non-negative tracers advected in flux form (so that their global
totals are conserved exactly). A three-layer CNN predicts the next state; its output
passes through a corrector that clamps the ice to [0, 1] and the tracers to >= 0 and
rescales each tracer to the global total of the input state. Training rolls out
``rollout`` steps per optimizer step and the loss is the mean squared error of the
corrected fields in units of each variable's standard deviation, as an emulator's is.

Every forward pass reports what the corrector changed (``post − pre`` per variable) as
``ctx.outputs["corrections"]``, where the ``corrector_penalty`` plugin reads it; the
data's per-variable standard deviations are bound to that plugin as its normalizer.
Evaluation reports, besides the loss, the mean normalized correction ``|post − pre| / std``
and the RMSE after ``horizon`` autoregressive steps.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import attrs
import torch
import torch.nn.functional as F

from .. import validators
from ..context import report
from ..pipeline import Pipeline
from .data import step_generator

NAMES = ("sea_ice_fraction", "tracer_0", "tracer_1")
TRACERS = NAMES[1:]


@attrs.frozen
class EmulatorOptions:
    """The ``[model]`` options of ``emulator`` (the CNN and the simulation it learns)."""

    width: int = attrs.field(default=32, validator=validators.positive_int)
    grid: int = attrs.field(default=32, validator=validators.positive_int)
    trajectories: int = attrs.field(default=32, validator=validators.positive_int)
    length: int = attrs.field(default=24, validator=validators.positive_int)
    rollout: int = attrs.field(default=2, validator=validators.positive_int)
    horizon: int = attrs.field(default=8, validator=validators.positive_int)

    def __attrs_post_init__(self) -> None:
        if self.length <= max(self.rollout, self.horizon):
            raise validators.OptionError(
                "length", f"must exceed rollout and horizon ({self.rollout}, "
                f"{self.horizon}), got {self.length}"
            )


# -- the simulation -------------------------------------------------------------------------


def _roll(x: torch.Tensor, shift: int, dim: int) -> torch.Tensor:
    return torch.roll(x, shift, dims=dim)


def _laplacian(x: torch.Tensor) -> torch.Tensor:
    return _roll(x, 1, -1) + _roll(x, -1, -1) + _roll(x, 1, -2) + _roll(x, -1, -2) - 4 * x


def _upwind_flux_step(q: torch.Tensor, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """One conservative, positivity-preserving upwind step; u, v are Courant numbers."""
    uf = 0.5 * (u + _roll(u, -1, -1))  # face velocities between cell i and i+1
    vf = 0.5 * (v + _roll(v, -1, -2))
    fx = torch.where(uf > 0, uf * q, uf * _roll(q, -1, -1))
    fy = torch.where(vf > 0, vf * q, vf * _roll(q, -1, -2))
    return q - (fx - _roll(fx, 1, -1)) - (fy - _roll(fy, 1, -2))


class Simulation:
    """Fixed flow and forcing on an n×n periodic grid; :meth:`step` is one emulator step."""

    def __init__(self, n: int, substeps: int = 4) -> None:
        y, x = torch.meshgrid(torch.arange(n) * 2 * math.pi / n,
                              torch.arange(n) * 2 * math.pi / n, indexing="ij")
        # Cellular flow from the streamfunction sin(x)·sin(y), scaled to Courant <= 0.4.
        self.u = 0.4 * torch.sin(x) * torch.cos(y)
        self.v = -0.4 * torch.cos(x) * torch.sin(y)
        # Growth in a cold band, melt elsewhere: much of the ice sits at 0 or 1.
        self.growth = 0.08 * (torch.cos(y) + 0.3 * torch.sin(2 * x))
        self.substeps = substeps
        self.statics = torch.stack([self.u, self.v, self.growth]) / 0.4

    def step(self, state: torch.Tensor) -> torch.Tensor:
        ice, tracers = state[:, :1], state[:, 1:]
        for _ in range(self.substeps):
            ice = (_upwind_flux_step(ice, self.u, self.v) + 0.05 * _laplacian(ice)
                   + self.growth).clamp(0.0, 1.0)
            tracers = _upwind_flux_step(tracers, self.u, self.v) + 0.02 * _laplacian(tracers)
        return torch.cat([ice, tracers], dim=1)

    def initial(self, count: int, n: int, gen: torch.Generator) -> torch.Tensor:
        """Random blobs: ice patches in [0, 1], tracer plumes >= 0 on a zero background."""
        y, x = torch.meshgrid(torch.arange(n).float(), torch.arange(n).float(), indexing="ij")
        fields = torch.zeros(count, len(NAMES), n, n)
        for c in range(len(NAMES)):
            for _ in range(4):
                cx, cy = torch.rand(2, count, 1, 1, generator=gen) * n
                width = 2 + 4 * torch.rand(count, 1, 1, generator=gen)
                dx = torch.remainder(x - cx + n / 2, n) - n / 2
                dy = torch.remainder(y - cy + n / 2, n) - n / 2
                fields[:, c] += torch.exp(-(dx**2 + dy**2) / (2 * width**2))
        fields[:, 0] = (1.5 * fields[:, 0]).clamp(0.0, 1.0)
        return fields


def trajectories(sim: Simulation, count: int, length: int, n: int, seed: int) -> torch.Tensor:
    """``(count, length, channels, n, n)`` states, after a spin-up that shapes the ice."""
    gen = torch.Generator().manual_seed(seed)
    state = sim.initial(count, n, gen)
    for _ in range(5):
        state = sim.step(state)
    states = [state]
    for _ in range(length - 1):
        states.append(sim.step(states[-1]))
    return torch.stack(states, dim=1)


class Stats:
    """Per-variable mean and std of the training states: the loss normalizer.

    ``std`` is the mapping that the ``corrector_penalty`` plugin's ``bind(normalizer=...)``
    reads.
    """

    def __init__(self, data: torch.Tensor) -> None:
        flat = data.transpose(0, 2).reshape(len(NAMES), -1)
        self.std = dict(zip(NAMES, flat.std(1).tolist(), strict=True))
        self.mean_t = flat.mean(1)[None, :, None, None]
        self.std_t = flat.std(1)[None, :, None, None]

    def to(self, device: torch.device) -> Stats:
        self.mean_t, self.std_t = self.mean_t.to(device), self.std_t.to(device)
        return self


# -- the emulator ---------------------------------------------------------------------------


def corrector(fields: Mapping[str, torch.Tensor], totals: torch.Tensor) -> dict[str, torch.Tensor]:
    """Clamp the ice to [0, 1], the tracers to >= 0, and rescale each tracer to its budget."""
    out = {"sea_ice_fraction": fields["sea_ice_fraction"].clamp(0.0, 1.0)}
    for i, name in enumerate(TRACERS):
        positive = fields[name].clamp(min=0.0)
        scale = totals[:, i] / positive.sum((-2, -1)).clamp(min=1e-6)
        out[name] = positive * scale[:, None, None]
    return out


class Emulator(torch.nn.Module):
    """A CNN that predicts the next state's normalized increment, then the corrector."""

    def __init__(self, stats: Stats, statics: torch.Tensor, width: int = 32) -> None:
        super().__init__()
        channels = len(NAMES)
        self.stats = stats
        self.register_buffer("statics", statics[None])
        conv = {"kernel_size": 3, "padding": 1, "padding_mode": "circular"}
        self.net = torch.nn.Sequential(
            torch.nn.Conv2d(channels + statics.shape[0], width, **conv), torch.nn.GELU(),
            torch.nn.Conv2d(width, width, **conv), torch.nn.GELU(),
            torch.nn.Conv2d(width, channels, **conv),
        )

    def raw(self, state: torch.Tensor) -> dict[str, torch.Tensor]:
        """The pre-corrector prediction of the next state, in physical units."""
        s = self.stats
        x = (state - s.mean_t) / s.std_t
        inputs = torch.cat([x, self.statics.expand(len(x), -1, -1, -1)], dim=1)
        return dict(zip(NAMES, (state + self.net(inputs) * s.std_t).unbind(1), strict=True))

    def forward(self, state: torch.Tensor) -> torch.Tensor:
        """One step through the corrector; reports what the corrector changed."""
        pre = self.raw(state)
        post = corrector(pre, state[:, 1:].sum((-2, -1)))
        report("corrections", {name: post[name] - pre[name] for name in NAMES})
        return torch.stack([post[n] for n in NAMES], dim=1)


class EmulationTask:
    """Training windows of the simulation, the rollout loss, and the emulator's evaluation."""

    task_weight: float = 1.0

    def __init__(self, options: EmulatorOptions, *, batch_size: int, seed: int,
                 device: torch.device) -> None:
        self.options, self.batch_size, self.seed, self.device = options, batch_size, seed, device
        self.sim = Simulation(options.grid)
        n = options.grid
        self.data = trajectories(self.sim, options.trajectories, options.length, n, seed=1)
        self.val = trajectories(self.sim, max(2, options.trajectories // 4), options.length, n,
                                seed=2).to(device)
        self.stats = Stats(self.data).to(device)
        self.data_sha256 = f"simulation grid={n} trajectories={options.trajectories}"

    def build_model(self) -> Emulator:
        return Emulator(self.stats, self.sim.statics, self.options.width)

    def prepare(self, pipe: Pipeline) -> None:
        """Bind the data's standard deviations to every ``corrector_penalty`` instance."""
        for plugin in pipe.plugins.values():
            if getattr(plugin, "name", "") == "corrector_penalty":
                plugin.bind(normalizer=self.stats)  # type: ignore[attr-defined]

    def batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``rollout + 1`` consecutive states of random trajectories: (first, the rest)."""
        gen = step_generator(self.seed, step)
        count, length = self.data.shape[:2]
        rollout = self.options.rollout
        traj = torch.randint(count, (self.batch_size,), generator=gen)
        start = torch.randint(length - rollout, (self.batch_size,), generator=gen)
        window = torch.stack([self.data[traj, start + k] for k in range(rollout + 1)], dim=1)
        window = window.to(self.device)
        return window[:, 0], window[:, 1:]

    def loss(self, model: torch.nn.Module, inputs: torch.Tensor,
             targets: torch.Tensor) -> tuple[torch.Tensor, dict[str, Any]]:
        state, total = inputs, inputs.new_zeros(())
        for k in range(targets.shape[1]):
            state = model(state)
            total = total + F.mse_loss(state / self.stats.std_t,
                                       targets[:, k] / self.stats.std_t)
        return total, {}

    @torch.no_grad()
    def evaluate(self, model: torch.nn.Module) -> dict[str, float]:
        """Rollout loss, mean normalized correction and ``horizon``-step RMSE on held-out data."""
        val, std, rollout = self.val, self.stats.std_t, self.options.rollout
        losses = []
        for start in range(val.shape[1] - rollout):
            state = val[:, start]
            total = 0.0
            for k in range(1, rollout + 1):
                state = model(state)
                total += F.mse_loss(state / std, val[:, start + k] / std).item()
            losses.append(total)
        states = val[:, :-1].flatten(0, 1)
        pre = model.raw(states)  # type: ignore[operator]
        raw = torch.stack([pre[n] for n in NAMES], dim=1)
        correction = ((model(states) - raw).abs() / std).mean().item()
        state = val[:, 0]
        for _ in range(self.options.horizon):
            state = model(state)
        rmse = ((state - val[:, self.options.horizon]) / std).pow(2).mean().sqrt().item()
        return {"loss": sum(losses) / len(losses), "correction": correction,
                f"rmse_{self.options.horizon}_steps": rmse}
