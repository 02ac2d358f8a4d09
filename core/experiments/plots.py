"""The comparison's figure: the learning-rate picture of stability and what lies behind it.

Six panels: final validation loss against learning rate per config (the mean over
seeds, with the range of the seeds shaded: the picture that shows stability); the
largest attention logit and the skipped steps against learning rate; and, at one
learning rate (by default the largest of the sweep, where configs differ most), the
training loss, the gradient norm and the output-logit maximum per step of the first
seed. Needs matplotlib (``pip install 'steadytrain[plots]'``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import ConfigError

if TYPE_CHECKING:
    from .compare import Outcome


def require_matplotlib() -> None:
    """Raise a clear error, before any training, when matplotlib is missing."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise ConfigError(
            "the plots need matplotlib: pip install 'steadytrain[plots]' (or pass --no-plot)"
        ) from None


def _smooth(values: Sequence[float], width: int = 10) -> list[float]:
    out, window = [], []
    for v in values:
        window.append(v)
        if len(window) > width:
            window.pop(0)
        finite = [x for x in window if math.isfinite(x)]
        out.append(sum(finite) / len(finite) if finite else math.nan)
    return out


def plot_comparison(outcomes: Sequence[Outcome], by_label: Mapping[str, Mapping[str, Any]],
                    path: Path, *, curve_lr: float | None = None) -> Path:
    """Draw the comparison of *outcomes* into *path* (PNG) and return it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .compare import curves

    lrs = sorted({o.run.config.train.lr for o in outcomes})
    at = curve_lr if curve_lr is not None else lrs[-1]
    if at not in lrs:
        nearest = min(lrs, key=lambda lr: abs(math.log(lr / at)))
        at = nearest
    fig, axes = plt.subplots(2, 3, figsize=(15, 8))
    (final_ax, attention_ax, skipped_ax), (loss_ax, grad_ax, logit_ax) = axes
    initial = [o.summary["initial_loss"] for o in outcomes if o.summary is not None]
    for index, (label, m) in enumerate(by_label.items()):
        # Ten colours, then the same colours dashed, dotted, …: every config stays distinct.
        color, style = f"C{index % 10}", ("-", "--", ":", "-.")[index // 10 % 4]
        mine = [o for o in outcomes if o.run.label == label]
        means = [m["final_by_lr"][lr][0] for lr in lrs]
        finals = {lr: [o.summary["final_loss"] for o in mine if o.summary is not None
                       and o.run.config.train.lr == lr] for lr in lrs}
        low = [min(finals[lr], default=math.nan) for lr in lrs]
        high = [max(finals[lr], default=math.nan) for lr in lrs]
        final_ax.plot(lrs, means, style, marker="o", color=color, label=label)
        final_ax.fill_between(lrs, low, high, color=color, alpha=0.2)
        for ax, key in ((attention_ax, "max_attention_logit"), (skipped_ax, "skipped_steps")):
            ax.plot(lrs, [_mean_at(mine, lr, key) for lr in lrs], style, marker="o",
                    color=color, label=label)
        first = sorted((o for o in mine if o.run.config.train.lr == at and o.summary),
                       key=lambda o: o.run.config.train.seed)
        if first:
            series = curves(first[0])
            loss_ax.plot(series["loss"], color=color, alpha=0.25, lw=0.6)
            loss_ax.plot(_smooth(series["loss"]), style, color=color, label=label)
            grad_ax.plot(series["grad_norm"], style, color=color, lw=0.7, label=label)
            logit_ax.plot(_smooth(series["logit_max"]), style, color=color, label=label)
    start = f" (initial {sum(initial) / len(initial):.3g})" if initial else ""
    final_ax.set(xscale="log", xlabel="learning rate", ylabel="final validation loss",
                 title=f"final loss against learning rate{start}")
    attention_ax.set(xscale="log", xlabel="learning rate",
                     title="largest attention logit (mean over seeds)")
    skipped_ax.set(xscale="log", xlabel="learning rate", title="skipped steps (mean over seeds)")
    loss_ax.set(xlabel="step", ylabel="task loss", title=f"training loss at lr {at:g}")
    grad_ax.set(xlabel="step", title=f"gradient norm (raw) at lr {at:g}")
    for ax in (attention_ax, grad_ax):
        if _positive(ax):
            ax.set_yscale("log")
    logit_ax.set(xlabel="step", title=f"largest output logit at lr {at:g}")
    for ax in axes.flat:
        ax.grid(alpha=0.3)
        if ax.has_data():
            ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _positive(ax: Any) -> bool:
    """Whether the axes hold a finite positive value (so that a log scale can show it)."""
    return any(math.isfinite(y) and y > 0 for line in ax.get_lines() for y in line.get_ydata())


def _mean_at(outcomes: Sequence[Outcome], lr: float, key: str) -> float:
    values = [float(o.summary[key]) for o in outcomes if o.summary is not None
              and o.run.config.train.lr == lr and o.summary.get(key) is not None]
    finite = [v for v in values if math.isfinite(v)]
    return sum(finite) / len(finite) if finite else math.nan
