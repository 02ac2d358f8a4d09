"""A small grid emulator trained with and without the corrector penalty, on data made here.

    python examples/emulator/train.py                    # the sweep: off, 0.2, 1.0, 5.0
    python examples/emulator/train.py --weights 0 1      # fewer runs
    python examples/emulator/train.py --plot docs/img/corrector_sweep.png

The data come from a periodic 32×32 simulation: a sea-ice fraction in [0, 1] advected by
a fixed cellular flow, grown or melted by a fixed forcing map and clipped to its bounds,
and two non-negative tracers advected in flux form (so their global totals are conserved
exactly). A three-layer CNN predicts the next state; its output passes through a
corrector that clamps the ice to [0, 1] and the tracers to ≥ 0 and rescales each tracer to
the global total of the input state. Training rolls out two steps per optimizer step and
the loss is taken on the corrected fields, as an emulator does.

The corrector penalty comes from ``config.toml``; each run of the sweep overrides its
weight (``off`` leaves the instance out) and binds the dataset's per-variable std. The
script prints, per weight, the mean normalized correction ``|post − pre| / std`` on the
validation set (how much the corrector had to change) and the validation RMSE of the
corrected output after 1 and 8 autoregressive steps, in std units.
"""

from __future__ import annotations

import argparse
import math
import time
import tomllib
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F

import steadytrain
from steadytrain.plugins.corrector.corrector_penalty import apply_corrector

HERE = Path(__file__).resolve().parent
NAMES = ("sea_ice_fraction", "tracer_0", "tracer_1")
TRACERS = NAMES[1:]


# -- the simulation -------------------------------------------------------------------------


def _roll(x: torch.Tensor, shift: int, dim: int) -> torch.Tensor:
    return torch.roll(x, shift, dims=dim)


def _laplacian(x: torch.Tensor) -> torch.Tensor:
    return (_roll(x, 1, -1) + _roll(x, -1, -1) + _roll(x, 1, -2) + _roll(x, -1, -2) - 4 * x)


def _upwind_flux_step(q: torch.Tensor, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """One conservative, positivity-preserving upwind step; u, v are Courant numbers."""
    # Face velocities between cell i and i+1, in x (last dim) and y.
    uf = 0.5 * (u + _roll(u, -1, -1))
    vf = 0.5 * (v + _roll(v, -1, -2))
    fx = torch.where(uf > 0, uf * q, uf * _roll(q, -1, -1))
    fy = torch.where(vf > 0, vf * q, vf * _roll(q, -1, -2))
    return q - (fx - _roll(fx, 1, -1)) - (fy - _roll(fy, 1, -2))


class Simulation:
    """Fixed flow and forcing on an n×n periodic grid; :meth:`step` advances one emulator step."""

    def __init__(self, n: int, substeps: int = 4) -> None:
        y, x = torch.meshgrid(torch.arange(n) * 2 * math.pi / n,
                              torch.arange(n) * 2 * math.pi / n, indexing="ij")
        # Cellular flow from the streamfunction sin(x)·sin(y), scaled to Courant ≤ 0.4.
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
        """Random blobs: ice patches in [0, 1], tracer plumes ≥ 0 with zero background."""
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
    """(count, length, channels, n, n) states; a spin-up lets the forcing shape the ice."""
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

    It has the ``std`` mapping that ``CorrectorPenalty.bind(normalizer=...)`` reads.
    """

    def __init__(self, data: torch.Tensor) -> None:
        flat = data.transpose(0, 2).reshape(len(NAMES), -1)
        self.mean = dict(zip(NAMES, flat.mean(1).tolist(), strict=True))
        self.std = dict(zip(NAMES, flat.std(1).tolist(), strict=True))
        self.mean_t = flat.mean(1)[None, :, None, None]
        self.std_t = flat.std(1)[None, :, None, None]


# -- the emulator ---------------------------------------------------------------------------


def corrector(fields: dict[str, torch.Tensor], totals: torch.Tensor) -> dict[str, torch.Tensor]:
    """Clamp the ice to [0, 1], the tracers to ≥ 0, and rescale each tracer to its budget."""
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
        c = len(NAMES)
        self.stats = stats
        self.register_buffer("statics", statics[None])
        conv = {"kernel_size": 3, "padding": 1, "padding_mode": "circular"}
        self.net = torch.nn.Sequential(
            torch.nn.Conv2d(c + statics.shape[0], width, **conv), torch.nn.GELU(),
            torch.nn.Conv2d(width, width, **conv), torch.nn.GELU(),
            torch.nn.Conv2d(width, c, **conv),
        )

    def raw(self, state: torch.Tensor) -> dict[str, torch.Tensor]:
        """The pre-corrector prediction of the next state, in physical units."""
        s = self.stats
        x = (state - s.mean_t) / s.std_t
        inputs = torch.cat([x, self.statics.expand(len(x), -1, -1, -1)], dim=1)
        return dict(zip(NAMES, (state + self.net(inputs) * s.std_t).unbind(1), strict=True))

    def forward(self, state: torch.Tensor) -> torch.Tensor:
        """One step; records its corrections when a training step is open."""
        totals = state[:, 1:].sum((-2, -1))
        corrected = apply_corrector(lambda f: corrector(f, totals), self.raw(state))
        return torch.stack([corrected[n] for n in NAMES], dim=1)


# -- training and evaluation ------------------------------------------------------------------


def pipeline_for(weight: float | None, config: Path, stats: Stats) -> steadytrain.Pipeline:
    """The config's pipeline with the penalty's weight set (``None``: penalty left out)."""
    raw = tomllib.loads(config.read_text(encoding="utf-8"))
    for entry in raw["plugins"]:
        if entry["plugin"] == "corrector_penalty" and weight is not None:
            entry["weight"] = weight
    disable = ["corrector_penalty"] if weight is None else []
    pipe = steadytrain.Pipeline.from_config(raw, disable=disable)
    for plugin in pipe.plugins.values():
        if getattr(plugin, "name", "") == "corrector_penalty":
            plugin.bind(normalizer=stats)
    return pipe


def train(
    weight: float | None, data: torch.Tensor, sim: Simulation, stats: Stats, *,
    steps: int, batch: int, rollout: int, config: Path, seed: int,
) -> tuple[Emulator, dict[str, float]]:
    torch.manual_seed(seed)
    model = Emulator(stats, sim.statics)
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
    pipe = pipeline_for(weight, config, stats).setup(model, optimizer, total_steps=steps)
    gen = torch.Generator().manual_seed(seed)
    count, length = data.shape[:2]
    last: dict[str, float] = {}
    for step in range(steps):
        traj = torch.randint(count, (batch,), generator=gen)
        start = torch.randint(length - rollout, (batch,), generator=gen)
        window = torch.stack([data[traj, start + k] for k in range(rollout + 1)], dim=1)
        pipe.before_step()
        state, task = window[:, 0], 0.0
        for k in range(1, rollout + 1):
            state = model(state)
            task = task + F.mse_loss((state - window[:, k]) / stats.std_t,
                                     torch.zeros_like(state))
        loss = pipe.compute_loss(task)
        loss.backward()
        pipe.after_backward()
        optimizer.step()
        pipe.consolidate()
        optimizer.zero_grad()
        scheduler.step()
        if (step + 1) % max(1, steps // 4) == 0:
            last = pipe.metrics()
    pipe.close()
    return model, last


@torch.no_grad()
def evaluate(model: Emulator, data: torch.Tensor, stats: Stats, horizon: int) -> dict[str, float]:
    """Normalized correction magnitude and RMSE of the corrected output on held-out data."""
    states, targets = data[:, :-1].flatten(0, 1), data[:, 1:].flatten(0, 1)
    fields = model.raw(states)
    raw = torch.stack([fields[n] for n in NAMES], dim=1)
    corrected = model(states)
    magnitude = ((corrected - raw).abs() / stats.std_t).mean((0, 2, 3))
    error = ((corrected - targets) / stats.std_t).pow(2).mean((0, 2, 3)).sqrt()
    state = data[:, 0]
    for _ in range(horizon):
        state = model(state)
    rollout = ((state - data[:, horizon]) / stats.std_t).pow(2).mean().sqrt()
    row = {f"correction/{n}": v for n, v in zip(NAMES, magnitude.tolist(), strict=True)}
    row.update({
        "correction": magnitude.mean().item(),
        "cells_corrected": ((corrected - raw).abs() > 1e-6).float().mean().item(),
        "val_rmse": error.mean().item(),
        f"val_rmse_{horizon}step": rollout.item(),
    })
    return row


def label(weight: float) -> str:
    return "off" if weight == 0 else f"{weight:g}"


def plot(rows: Sequence[Mapping[str, float]], path: Path, horizon: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [label(r["weight"]) for r in rows]
    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.6))
    x = range(len(rows))
    for name, marker in zip(NAMES, "os^", strict=True):
        left.plot(x, [r[f"correction/{name}"] for r in rows], marker=marker, label=name)
    left.plot(x, [r["correction"] for r in rows], "k--", marker="D", label="mean")
    left.set_yscale("log")
    left.set_title("correction |post − pre| / std (validation)")
    right.plot(x, [r["val_rmse"] for r in rows], marker="o", label="1 step")
    right.plot(x, [r[f"val_rmse_{horizon}step"] for r in rows], marker="s",
               label=f"{horizon} steps")
    right.set_title("RMSE of the corrected output / std")
    right.set_ylim(bottom=0)
    for ax in (left, right):
        ax.set_xticks(list(x), labels)
        ax.set_xlabel("corrector penalty weight")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


def main(argv: Sequence[str] | None = None) -> list[dict[str, float]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--weights", type=float, nargs="+", default=[0.0, 0.2, 1.0, 5.0],
                        help="penalty weights; 0 leaves the penalty out")
    parser.add_argument("--config", type=Path, default=HERE / "config.toml")
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--plot", type=Path, help="write the sweep's plot here (matplotlib)")
    parser.add_argument("--out", type=Path, help="write the sweep's table (markdown) here")
    parser.add_argument("--tiny", action="store_true", help="a seconds-long smoke run")
    args = parser.parse_args(argv)
    if args.plot is not None:
        try:
            import matplotlib  # noqa: F401 - checked before training, not after it
        except ImportError:
            parser.error("--plot needs matplotlib: pip install 'steadytrain[plots]'")

    n, count, length, steps, horizon = (32, 32, 24, args.steps, 8)
    if args.tiny:
        n, count, length, steps, horizon = (12, 4, 6, 3, 2)
    torch.set_num_threads(min(torch.get_num_threads(), 4))
    sim = Simulation(n)
    data = trajectories(sim, count, length, n, seed=1)
    val = trajectories(sim, max(2, count // 4), length, n, seed=2)
    stats = Stats(data)
    rows = []
    for weight in args.weights:
        began = time.perf_counter()
        model, metrics = train(
            None if weight == 0 else weight, data, sim, stats, steps=steps, batch=16,
            rollout=2, config=args.config, seed=args.seed,
        )
        row = {"weight": weight, **evaluate(model, val, stats, horizon),
               "train_task_loss": metrics.get("loss/task", float("nan")),
               "seconds": time.perf_counter() - began}
        rows.append(row)
        print(f"weight {label(weight):>4}: correction {row['correction']:.4f} "
              f"(ice {row['correction/sea_ice_fraction']:.4f}, tracers "
              f"{row['correction/tracer_0']:.4f}/{row['correction/tracer_1']:.4f}), "
              f"cells corrected {row['cells_corrected']:.3f}, val RMSE 1-step "
              f"{row['val_rmse']:.4f}, {horizon}-step {row[f'val_rmse_{horizon}step']:.4f}, "
              f"{row['seconds']:.0f} s", flush=True)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "corrector_sweep.md").write_text(table(rows, horizon), encoding="utf-8")
    if args.plot is not None:
        plot(rows, args.plot, horizon)
    return rows


def table(rows: Sequence[Mapping[str, float]], horizon: int) -> str:
    lines = [
        "| weight | correction (mean) | sea_ice_fraction | tracer_0 | tracer_1 | cells corrected "
        f"| val RMSE 1 step | val RMSE {horizon} steps |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        lines.append(
            f"| {label(r['weight'])} | {r['correction']:.4f} | "
            f"{r['correction/sea_ice_fraction']:.4f} | {r['correction/tracer_0']:.4f} | "
            f"{r['correction/tracer_1']:.4f} | {r['cells_corrected']:.3f} | "
            f"{r['val_rmse']:.4f} | {r[f'val_rmse_{horizon}step']:.4f} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
