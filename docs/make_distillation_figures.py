"""The distillation page's table and figures, from a `steadytrain compare` of its configs.

    python docs/make_distillation_figures.py OUT [--lr LR] [--img docs/img]

OUT is the comparison directory of the student configs of examples/distillation/. At the
learning rate LR (default: each config's own `train.lr`, the first run's), it prints a
Markdown table, mean ± standard deviation over the seeds of each config: the student's
validation loss, its perplexity ratio to the teacher, the KL divergence from the teacher
and every block's mean squared difference from the teacher (the runs' `summary.json`
`extras`). It draws `distillation_layer_weights.png` (each layer's factor in the
alignment, `hidden_alignment/weight/<layer>` of `metrics.jsonl`, against the step, for
every config that weighs its layers, every seed) and `distillation_layers.png` (the
per-block MSE per config) into --img.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

WEIGHT = "hidden_alignment/weight/"


def runs_at(out: Path, lr: float | None) -> dict[str, list[Path]]:
    """The run directories of each config at *lr* (or at the config's only lr), by label."""
    marker = json.loads((out / "compare.json").read_text(encoding="utf-8"))
    chosen: dict[str, list[Path]] = {}
    for run in marker["runs"]:
        if lr is None or math.isclose(run["lr"], lr, rel_tol=1e-3):
            chosen.setdefault(run["label"], []).append(out / run["out"])
    return chosen


def _summary(run: Path) -> dict[str, Any] | None:
    path = run / "summary.json"
    return json.loads(path.read_text(encoding="utf-8")) if path.exists() else None


def _pm(values: Sequence[float]) -> str:
    if not values:
        return "—"
    mean = statistics.fmean(values)
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{mean:.4g} ± {spread:.2g}" if spread else f"{mean:.4g}"


def table(chosen: dict[str, list[Path]]) -> str:
    """The Markdown table of the module docstring."""
    summaries = {label: [s for s in map(_summary, runs) if s] for label, runs in chosen.items()}
    layers = sorted({k for ss in summaries.values() for s in ss for k in s["extras"]
                     if k.startswith("mse/")}, key=lambda k: int(k.split("/")[1]))
    lines = ["| config | seeds | lr | student loss | perplexity ratio | KL | "
             + " | ".join(f"MSE block {k.split('/')[1]}" for k in layers) + " |",
             "|" + " --- |" * (6 + len(layers))]
    for label, ss in summaries.items():
        def column(key: str, ss: list[dict[str, Any]] = ss) -> str:
            return _pm([s["extras"][key] for s in ss])

        lrs = sorted({s["lr"] for s in ss})
        lines.append(f"| {label} | {len(ss)} | {', '.join(f'{x:g}' for x in lrs)} | "
                     f"{_pm([s['final_loss'] for s in ss])} | {column('perplexity_ratio')} | "
                     f"{column('kl')} | " + " | ".join(column(k) for k in layers) + " |")
    teacher = sorted({s["extras"]["teacher_loss"] for ss in summaries.values() for s in ss})
    lines += ["", f"Teacher's validation loss: {', '.join(f'{t:.4f}' for t in teacher)}."]
    return "\n".join(lines) + "\n"


def weight_series(run: Path) -> dict[str, tuple[list[int], list[float]]]:
    """Each layer's factor against the step, from a run's metrics lines."""
    path = run / "metrics.jsonl"
    lines = [json.loads(x) for x in path.read_text(encoding="utf-8").splitlines() if x] \
        if path.exists() else []
    series: dict[str, tuple[list[int], list[float]]] = {}
    for line in lines:
        for key, value in line["pipeline"].items():
            if key.startswith(WEIGHT):
                steps, values = series.setdefault(key[len(WEIGHT):], ([], []))
                steps.append(line["step"])
                values.append(value)
    return series


def plot_weights(chosen: dict[str, list[Path]], target: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    weighted = {label: [weight_series(r) for r in runs] for label, runs in chosen.items()}
    weighted = {label: s for label, s in weighted.items()
                if any(len({round(v, 6) for _, vs in run.values() for v in vs}) > 1
                       for run in s)}
    if not weighted:
        return
    fig, axes = plt.subplots(1, len(weighted), figsize=(5 * len(weighted), 3.6), squeeze=False)
    for ax, (label, runs) in zip(axes[0], weighted.items(), strict=True):
        for seed, run in enumerate(runs):
            for index, (layer, (steps, values)) in enumerate(sorted(run.items())):
                ax.plot(steps, values, color=f"C{index}", alpha=0.8, lw=1.2,
                        label=f"block {layer}" if seed == 0 else None)
        ax.set_title(f"{label}: each layer's factor")
        ax.set_xlabel("step")
        ax.set_yscale("log")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(target, dpi=110)
    plt.close(fig)


def plot_layers(chosen: dict[str, list[Path]], target: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summaries = {label: [s for s in map(_summary, runs) if s] for label, runs in chosen.items()}
    layers = sorted({int(k.split("/")[1]) for ss in summaries.values() for s in ss
                     for k in s["extras"] if k.startswith("mse/")})
    fig, ax = plt.subplots(figsize=(7, 3.6))
    width = 0.8 / max(1, len(summaries))
    for index, (label, ss) in enumerate(summaries.items()):
        means = [statistics.fmean(s["extras"][f"mse/{i}"] for s in ss) for i in layers]
        ax.bar([i + index * width for i in layers], means, width, label=label)
    ax.set_xticks([i + 0.4 - width / 2 for i in layers], [f"block {i}" for i in layers])
    ax.set_ylabel("validation MSE to the teacher")
    ax.set_yscale("log")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(target, dpi=110)
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="the comparison directory")
    parser.add_argument("--lr", type=float, help="the learning rate to report")
    parser.add_argument("--img", type=Path, default=Path(__file__).with_name("img"))
    args = parser.parse_args(argv)
    chosen = runs_at(args.out, args.lr)
    print(table(chosen), end="")
    args.img.mkdir(parents=True, exist_ok=True)
    plot_weights(chosen, args.img / "distillation_layer_weights.png")
    plot_layers(chosen, args.img / "distillation_layers.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
