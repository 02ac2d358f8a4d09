"""The measures of stability against hand-computed values."""

import math

import pytest

from steadytrain.experiments import measures

NAN = float("nan")


def test_lr_sensitivity_caps_at_the_initial_loss_and_counts_non_finite_as_initial():
    finals = {1e-3: 3.0, 1e-2: 2.5, 1e-1: 4.0, 1.0: NAN, 3.0: 9.0}
    initial = 5.0
    # min(final, initial): 3.0, 2.5, 4.0, 5.0, 5.0 -> mean 3.9; best 2.5
    assert measures.lr_sensitivity(finals, initial) == pytest.approx(3.9 - 2.5)
    assert measures.lr_sensitivity({1e-3: 2.0, 1e-2: 2.0}, 5.0) == 0.0


def test_best_loss_best_lr_and_largest_converging_lr():
    finals = {1e-3: 3.0, 1e-2: 2.5, 1e-1: 4.9, 1.0: NAN, 3.0: 5.5}
    assert measures.best_loss(finals) == 2.5
    assert measures.best_lr(finals) == 1e-2
    assert measures.largest_converging_lr(finals, 5.0) == 1e-1
    assert math.isnan(measures.largest_converging_lr({1.0: NAN, 3.0: 6.0}, 5.0))
    assert math.isnan(measures.best_loss({1.0: NAN}))


def test_lr_range_within_ten_percent_of_the_best():
    finals = {1e-3: 2.74, 1e-2: 2.5, 3e-2: 2.75, 1e-1: 2.76, 1.0: NAN}
    # 1.1 × 2.5 = 2.75: 2.74 and 2.75 are in, 2.76 is out
    assert measures.lr_range_within(finals) == (1e-3, 3e-2)
    assert measures.lr_range_within(finals, 0.0) == (1e-2, 1e-2)


def test_spikes_are_losses_above_three_times_the_mean_of_the_ten_before():
    calm = [1.0] * 10
    assert measures.count_spikes([*calm, 3.0]) == 0  # 3 is not above 3 × 1
    assert measures.count_spikes([*calm, 3.01]) == 1
    # the spike enters the mean of the next windows: 1.0 after it is no spike
    assert measures.count_spikes([*calm, 3.5, 1.0, 4.0]) == 2
    assert measures.count_spikes([10.0] * 5 + [100.0]) == 0  # too few losses before
    assert measures.count_spikes([*calm, NAN, 50.0]) == 0  # a NaN is divergence, not a spike


def test_oscillation_ratio_averages_max_over_min_of_consecutive_windows():
    losses = [2.0, 1.0, 1.5, 1.2, 4.0, 3.0, 2.0, 2.0, 2.5]
    # windows of 4: [2, 1, 1.5, 1.2] -> 2; [4, 3, 2, 2] -> 2; the last 1 loss is left over
    assert measures.oscillation_ratio(losses, window=4) == pytest.approx(2.0)
    # the window with a NaN is left out: only [1, 1.5, 3] counts
    assert measures.oscillation_ratio([1.0, 2.0, NAN, 1.0, 1.5, 3.0], window=3) == 3.0
    assert math.isnan(measures.oscillation_ratio([1.0, 2.0], window=3))


def test_divergence_and_capped_losses():
    assert measures.diverged(NAN, 5.0) and measures.diverged(5.5, 5.0)
    assert not measures.diverged(4.9, 5.0)
    assert measures.capped(NAN, 5.0) == 5.0 and measures.capped(7.0, 5.0) == 5.0
    assert measures.capped(float("inf"), 5.0) == 5.0 and measures.capped(2.0, 5.0) == 2.0


def test_mean_and_spread_leave_non_finite_values_out():
    mean, spread = measures.mean_and_spread([1.0, 2.0, NAN, 3.0])
    assert mean == 2.0 and spread == pytest.approx(1.0)
    assert measures.mean_and_spread([4.0]) == (4.0, 0.0)
    assert all(math.isnan(x) for x in measures.mean_and_spread([NAN]))
