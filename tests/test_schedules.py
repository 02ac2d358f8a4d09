import math

import pytest

from steadytrain import OptionError, schedules


def test_constant():
    assert schedules.Constant(0.3)(10_000, 0.5) == 0.3


def test_linear_warmup_ramps_then_holds():
    s = schedules.LinearWarmup(value=2.0, warmup_steps=4, start=1.0)
    assert [s(step, None) for step in (0, 2, 4, 100)] == [1.0, 1.5, 2.0, 2.0]


def test_cosine_warmup_is_a_half_cosine():
    s = schedules.CosineWarmup(value=1.0, warmup_steps=10)
    for step in range(12):
        expected = 0.5 * (1 - math.cos(math.pi * min(step, 10) / 10))
        assert s(step, None) == pytest.approx(expected)


def test_cosine_curriculum_runs_from_zero_to_value():
    s = schedules.CosineCurriculum(value=3.0)
    assert s(0, 0.0) == pytest.approx(0.0)
    assert s(0, 0.5) == pytest.approx(1.5)
    assert s(0, 1.0) == pytest.approx(3.0)
    values = [s(0, p / 20) for p in range(21)]
    assert values == sorted(values)


def test_cosine_curriculum_with_its_own_horizon_needs_no_progress():
    s = schedules.CosineCurriculum(horizon_steps=8)
    assert not s.needs_progress and schedules.CosineCurriculum().needs_progress
    assert s(4, None) == pytest.approx(0.5) and s(80, None) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="total_steps"):
        schedules.CosineCurriculum()(3, None)


def test_piecewise_switches_at_boundaries():
    s = schedules.Piecewise(boundaries=(10, 20), values=(0.0, 0.5, 1.0))
    assert [s(step, None) for step in (0, 9, 10, 19, 20, 500)] == [0, 0, 0.5, 0.5, 1.0, 1.0]


@pytest.mark.parametrize(
    ("make", "option"),
    [
        (lambda: schedules.LinearWarmup(1.0, 0), "warmup_steps"),
        (lambda: schedules.CosineWarmup(float("inf"), 5), "value"),
        (lambda: schedules.Piecewise((3, 1), (0, 1, 2)), "boundaries"),
        (lambda: schedules.Piecewise((3,), (0,)), "values"),
        (lambda: schedules.CosineCurriculum(horizon_steps=-1), "horizon_steps"),
    ],
)
def test_invalid_schedules_name_the_option(make, option):
    with pytest.raises(OptionError) as info:
        make()
    assert info.value.option == option
