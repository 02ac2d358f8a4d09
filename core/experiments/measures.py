"""Measures of stability: of one run's loss curve, and of a config over a learning-rate sweep.

Per run (from the task loss of every step):

* spikes: steps whose loss exceeds ``3 ×`` the mean of the 10 steps before;
* oscillation ratio: ``max / min`` of the loss over consecutive windows of 10 steps,
  averaged; its noise floor is the same measure for a frozen model on the same batches;
* divergence: a final loss that is not finite or is above the initial loss.

Per config, over a sweep of learning rates ``η`` (Wortsman et al. 2023, "Small-scale
proxies for large-scale Transformer training instabilities", section 2):

* LR sensitivity: the mean over the sweep of ``min(final(η), initial) − min_η final(η)``,
  where a non-finite final loss counts as the initial loss;
* the best final loss, the largest learning rate that converges (final loss finite and
  below the initial loss), and the range of learning rates whose final loss is within
  10 % of the best.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence

SPIKE_FACTOR = 3.0
SPIKE_WINDOW = 10
OSCILLATION_WINDOW = 10
WITHIN = 0.1


def count_spikes(
    losses: Sequence[float], factor: float = SPIKE_FACTOR, window: int = SPIKE_WINDOW
) -> int:
    """Steps whose loss is above *factor* × the mean of the *window* losses before it.

    Only steps with *window* finite losses before them are judged; a non-finite loss is
    not a spike (divergence is counted on its own).
    """
    spikes = 0
    for i in range(window, len(losses)):
        before = losses[i - window : i]
        if all(map(math.isfinite, before)) and math.isfinite(losses[i]):
            spikes += losses[i] > factor * statistics.fmean(before)
    return spikes


def oscillation_ratio(losses: Sequence[float], window: int = OSCILLATION_WINDOW) -> float:
    """Mean over the consecutive, non-overlapping *window*-step windows of ``max / min``.

    Windows with a non-finite or non-positive loss are left out; NaN when none is left.
    """
    ratios = []
    for start in range(0, len(losses) - window + 1, window):
        chunk = losses[start : start + window]
        if all(math.isfinite(x) and x > 0 for x in chunk):
            ratios.append(max(chunk) / min(chunk))
    return statistics.fmean(ratios) if ratios else math.nan


def diverged(final: float, initial: float) -> bool:
    """Whether a run ended non-finite or above its initial loss."""
    return not math.isfinite(final) or final > initial


def capped(final: float, initial: float) -> float:
    """``min(final, initial)``, with a non-finite final loss counted as *initial*."""
    return min(final, initial) if math.isfinite(final) else initial


def lr_sensitivity(finals: Mapping[float, float], initial: float) -> float:
    """Mean over the learning rates of ``min(final, initial) − min over η of final``."""
    losses = [capped(f, initial) for f in finals.values()]
    return statistics.fmean(losses) - min(losses)


def best_loss(finals: Mapping[float, float]) -> float:
    """The lowest finite final loss of the sweep (NaN if none is finite)."""
    finite = [f for f in finals.values() if math.isfinite(f)]
    return min(finite) if finite else math.nan


def best_lr(finals: Mapping[float, float]) -> float:
    """The learning rate of :func:`best_loss`."""
    finite = {lr: f for lr, f in finals.items() if math.isfinite(f)}
    return min(finite, key=finite.__getitem__) if finite else math.nan


def largest_converging_lr(finals: Mapping[float, float], initial: float) -> float:
    """The largest learning rate whose final loss is finite and below *initial* (NaN if none)."""
    good = [lr for lr, f in finals.items() if math.isfinite(f) and f < initial]
    return max(good) if good else math.nan


def lr_range_within(
    finals: Mapping[float, float], fraction: float = WITHIN
) -> tuple[float, float]:
    """The lowest and highest learning rate whose final loss is within *fraction* of the best."""
    best = best_loss(finals)
    good = [lr for lr, f in finals.items() if math.isfinite(f) and f <= best * (1 + fraction)]
    return (min(good), max(good)) if good else (math.nan, math.nan)


def mean_and_spread(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for one value) of the finite *values*."""
    finite = [v for v in values if math.isfinite(v)]
    if not finite:
        return math.nan, math.nan
    return statistics.fmean(finite), statistics.stdev(finite) if len(finite) > 1 else 0.0
