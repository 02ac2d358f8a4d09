import math

import attrs
import pytest

from steadytrain import OptionError, schedules
from steadytrain.config import converter


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



@attrs.frozen
class _Options:
    rate: schedules.Schedule = attrs.field(default=1.0,
                                           converter=schedules.numbers_as_constant)


@pytest.mark.parametrize(("schedule", "plain"), [
    (schedules.Constant(0.5), 0.5),
    (schedules.LinearWarmup(value=2.0, warmup_steps=4, start=1.0),
     {"kind": "linear_warmup", "value": 2.0, "warmup_steps": 4, "start": 1.0}),
    (schedules.CosineWarmup(value=1.0, warmup_steps=10, start=3.0),
     {"kind": "cosine_warmup", "value": 1.0, "warmup_steps": 10, "start": 3.0}),
    (schedules.CosineCurriculum(value=3.0, horizon_steps=8),
     {"kind": "cosine_curriculum", "value": 3.0, "horizon_steps": 8}),
    (schedules.Piecewise(boundaries=(10, 20), values=(0.0, 0.5, 1.0)),
     {"kind": "piecewise", "boundaries": [10, 20], "values": [0.0, 0.5, 1.0]}),
], ids=lambda s: getattr(s, "kind", ""))
def test_a_schedule_valued_option_round_trips_through_plain_data(schedule, plain):
    assert converter.unstructure(_Options(schedule)) == {"rate": plain}
    assert converter.structure({"rate": plain}, _Options) == _Options(schedule)


def test_a_number_for_a_schedule_valued_option_is_a_constant_schedule():
    assert _Options(2).rate == schedules.Constant(2.0)
    assert converter.structure({"rate": 2}, _Options) == _Options(2.0)
    assert _Options("fast").rate == "fast"  # left for the option's validator to refuse
