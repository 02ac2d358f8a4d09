import math
import random
import statistics

import pytest
import structlog
import torch
from helpers import round_trip

import steadytrain
from steadytrain import Pipeline
from steadytrain.nn import DualMemory
from steadytrain.plugins.stability_monitor import (
    GENERIC_ADVICE,
    MEMORY_ADVICE,
    StabilityMonitor,
    detrended_oscillation,
    loss_variance,
    mean_gate_entropy,
    oscillation_ratio,
)

NAN = float("nan")
WARNINGS = ("stability.oscillation", "stability.grad_norm")


@pytest.fixture
def events():
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(0))
    with structlog.testing.capture_logs() as captured:
        yield captured


def warnings_of(events, name):
    return [e for e in events if e["event"] == name]


def monitor_pipe(model, **options):
    return Pipeline([StabilityMonitor(StabilityMonitor.Config(**options))]).setup(model)


def run_steps(pipe, model, losses, outputs=None, grad_scale=1.0):
    """Steps whose task loss has the given values and a gradient norm of *grad_scale*."""
    scales = grad_scale if isinstance(grad_scale, list) else [grad_scale] * len(losses)
    for value, scale in zip(losses, scales, strict=True):
        pipe.before_step()
        loss = model.weight.sum() * scale + value - model.weight.sum().detach() * scale
        pipe.compute_loss(loss, outputs=outputs).backward()
        pipe.after_backward()
        pipe.consolidate()
        model.zero_grad()


def scalar_model():
    return torch.nn.Linear(1, 1, bias=False)


def noisy(values, spread=0.03, seed=0):
    """*values* times independent noise of about ±spread, like batch-to-batch noise."""
    gen = random.Random(seed)
    return [v * (1 + gen.uniform(-spread, spread)) for v in values]


# -- the plain functions against hand-written formulas ---------------------------------------


def test_ratio_and_variance_match_hand_formulas():
    values = [2.0, 3.5, 1.25, 4.0, 2.5]
    losses = torch.tensor(values, dtype=torch.float64)
    assert oscillation_ratio(losses).item() == max(values) / min(values)
    assert loss_variance(losses).item() == pytest.approx(statistics.variance(values), rel=1e-12)


def test_non_finite_entries_are_left_out():
    values = [2.0, NAN, 3.0, float("inf"), 6.0]
    losses = torch.tensor(values, dtype=torch.float64)
    assert oscillation_ratio(losses).item() == 3.0
    assert loss_variance(losses).item() == pytest.approx(statistics.variance([2.0, 3.0, 6.0]))


def hand_detrended(steps, values):
    """The least-squares line by its closed form; the residuals put back on the mean."""
    n = len(values)
    t_mean, y_mean = sum(steps) / n, sum(values) / n
    slope = sum((t - t_mean) * (y - y_mean) for t, y in zip(steps, values, strict=True)) / sum(
        (t - t_mean) ** 2 for t in steps)
    level = [y - slope * (t - t_mean) for t, y in zip(steps, values, strict=True)]
    return max(level) / min(level)


def test_detrended_oscillation_matches_the_closed_form():
    values = [5.0, 4.2, 4.4, 3.1, 3.3, 2.2, 2.6, 1.9]
    assert detrended_oscillation(values) == pytest.approx(
        hand_detrended(range(8), values), rel=1e-12)
    # a non-finite loss leaves a gap in the steps, not a shift
    assert detrended_oscillation([2.0, NAN, 3.0, 2.5]) == pytest.approx(
        hand_detrended([0, 2, 3], [2.0, 3.0, 2.5]), rel=1e-12)
    assert math.isnan(detrended_oscillation([1.0, NAN, 2.0]))


def test_a_straight_fall_has_no_detrended_oscillation():
    falling = [6.0 - 0.5 * t for t in range(10)]
    assert max(falling) / min(falling) == 4.0
    assert detrended_oscillation(falling) == pytest.approx(1.0)


def test_gate_entropy_matches_the_definition():
    torch.manual_seed(0)
    gates = torch.softmax(torch.randn(5, 7, 3), -1)
    by_hand = -(gates * gates.log()).sum(-1).mean()
    assert torch.allclose(mean_gate_entropy(gates), by_hand)
    one_hot = torch.eye(3)
    assert mean_gate_entropy(one_hot).item() == 0.0
    uniform = torch.full((4, 3), 1 / 3)
    assert mean_gate_entropy(uniform).item() == pytest.approx(math.log(3), rel=1e-6)
    both = mean_gate_entropy([one_hot, uniform])
    assert both.item() == pytest.approx(math.log(3) / 2, rel=1e-6)
    assert mean_gate_entropy(uniform.half()).dtype == torch.float32


# -- the metrics ---------------------------------------------------------------------------


def test_metrics_follow_the_window():
    model = scalar_model()
    pipe = monitor_pipe(model, window=3, check_every=1000)
    values = [4.0, 2.0, 1.0, 3.0, 6.0]
    run_steps(pipe, model, values)
    metrics = pipe.metrics()
    windows = [values[max(0, i - 2) : i + 1] for i in range(1, len(values))]
    ratios = [max(w) / min(w) for w in windows]
    variances = [statistics.variance(w) for w in windows]
    assert metrics["stability_monitor/loss_oscillation"] == pytest.approx(statistics.mean(ratios))
    assert metrics["stability_monitor/loss_variance"] == pytest.approx(
        statistics.mean(variances))


def test_grad_norm_matches_torch_and_sees_unclipped_gradients():
    class Clip(steadytrain.Plugin):
        name = "clip"

        @steadytrain.hookimpl
        def after_backward(self, ctx):
            torch.nn.utils.clip_grad_norm_(ctx.model.parameters(), 0.1)

    torch.manual_seed(1)
    model = torch.nn.Linear(3, 2)
    pipe = Pipeline([Clip(), StabilityMonitor()]).setup(model)
    pipe.before_step()
    pipe.compute_loss(model(torch.randn(4, 3)).pow(2).sum() * 10).backward()
    expected = torch.nn.utils.get_total_norm([p.grad.clone() for p in model.parameters()])
    pipe.after_backward()
    pipe.consolidate()
    assert expected > 0.1
    assert pipe.metrics()["stability_monitor/grad_norm"] == pytest.approx(expected.item())


def test_outputs_are_logged_when_present():
    torch.manual_seed(2)
    model = scalar_model()
    pipe = monitor_pipe(model, check_every=1000)
    gates = torch.softmax(torch.randn(6, 3), -1)
    mask = (torch.rand(6, 10) < 0.15).float()
    memory = {"stm": torch.tensor([0.2, 0.4]), "ltm": torch.tensor(0.7)}
    run_steps(pipe, model, [1.0], outputs={"gates": gates, "sparsity_mask": mask,
                                           "memory_utilization": memory})
    run_steps(pipe, model, [1.0])  # no outputs this step: nothing logged for them
    metrics = pipe.metrics()
    by_hand = -(gates * gates.log()).sum(-1).mean().item()
    assert metrics["stability_monitor/gate_entropy"] == pytest.approx(by_hand, rel=1e-6)
    assert metrics["stability_monitor/sparsity"] == pytest.approx(mask.mean().item())
    assert metrics["stability_monitor/memory_utilization/stm"] == pytest.approx(0.3)
    assert metrics["stability_monitor/memory_utilization/ltm"] == pytest.approx(0.7)


def test_check_reads_the_window_in_order_and_resets_the_gradient_norms():
    model = scalar_model()
    monitor = StabilityMonitor(StabilityMonitor.Config(window=3, check_every=1000))
    pipe = Pipeline([monitor]).setup(model)
    run_steps(pipe, model, [2.0, 8.0, 4.0, 4.0, 3.0], grad_scale=[3.0, 1.0, 2.0, 1.0, 1.0])
    read = monitor.check(4)
    assert read["loss_oscillation"] == 4.0 / 3.0
    assert read["detrended_oscillation"] == pytest.approx(hand_detrended(range(3), [4.0, 4.0,
                                                                                   3.0]))
    assert read["peak_grad_norm"] == pytest.approx(3.0)
    assert read["mean_grad_norm"] == pytest.approx(8.0 / 5)
    assert math.isnan(read["oscillation_floor"])
    again = monitor.check(4)
    assert again["peak_grad_norm"] == 0.0 and math.isnan(again["mean_grad_norm"])


# -- the warnings ---------------------------------------------------------------------------


def test_a_loss_that_is_simply_falling_gives_no_warning(events):
    model = scalar_model()
    pipe = monitor_pipe(model, window=10, check_every=10)
    falling = noisy([6.0 * 0.99**t for t in range(300)])
    run_steps(pipe, model, falling)
    assert pipe.metrics()["stability_monitor/loss_oscillation"] > 1.1
    assert not [e for e in events if e["event"] in WARNINGS]


def test_an_oscillation_far_above_the_given_noise_floor_warns(events):
    model = scalar_model()
    pipe = monitor_pipe(model, window=10, check_every=10, noise_floor=1.1, tolerance=3.0)
    run_steps(pipe, model, noisy([2.0] * 10, spread=0.04))  # at most 1.04 / 0.96 < 1.1
    assert not warnings_of(events, "stability.oscillation")
    run_steps(pipe, model, [2.0, 1.0] * 5)  # detrended ratio about 2: 1 > 3 × 0.1
    (warning,) = warnings_of(events, "stability.oscillation")
    assert warning["step"] == 19 and warning["floor"] == 1.1
    assert warning["floor_from"] == "noise_floor"
    assert warning["ratio"] == pytest.approx(detrended_oscillation([2.0, 1.0] * 5), abs=1e-4)
    assert warning["raw_ratio"] == 2.0 and warning["advice"] == GENERIC_ADVICE


def test_without_a_noise_floor_the_run_sets_its_own_after_three_checks(events):
    model = scalar_model()
    pipe = monitor_pipe(model, window=10, check_every=10, tolerance=3.0)
    run_steps(pipe, model, [2.0, 1.0] * 5)  # an oscillation at the first check: no floor yet
    assert not warnings_of(events, "stability.oscillation")
    run_steps(pipe, model, noisy([2.0] * 40, spread=0.03))
    assert not warnings_of(events, "stability.oscillation")
    run_steps(pipe, model, [2.0, 1.2] * 5)
    (warning,) = warnings_of(events, "stability.oscillation")
    assert warning["floor_from"] == "median of 5 earlier checks"
    assert warning["floor"] < 1.07


def test_a_gradient_norm_spike_against_the_typical_norm_warns(events):
    model = scalar_model()
    pipe = monitor_pipe(model, window=10, check_every=10, grad_norm_tolerance=10.0)
    scales = [1.0] * 9 + [50.0]  # a spike in the first interval: no typical norm yet
    run_steps(pipe, model, [1.0] * 10, grad_scale=scales)
    run_steps(pipe, model, [1.0] * 30, grad_scale=[1.0] * 30)
    assert not warnings_of(events, "stability.grad_norm")
    run_steps(pipe, model, [1.0] * 10, grad_scale=[1.0] * 5 + [40.0] + [1.0] * 4)
    (warning,) = warnings_of(events, "stability.grad_norm")
    assert warning["peak"] == pytest.approx(40.0) and warning["step"] == 49
    # the median of the mean norms of the earlier checks: 5.9, 1, 1, 1
    assert warning["typical"] == pytest.approx(1.0)


def test_memory_advice_only_for_models_with_memory(events):
    class WithMemory(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.ones(1, 1))
            self.memory = DualMemory(2, 4, 4)

    for model, advice in ((scalar_model(), GENERIC_ADVICE), (WithMemory(), MEMORY_ADVICE)):
        events.clear()
        pipe = monitor_pipe(model, window=10, check_every=10, noise_floor=1.05)
        run_steps(pipe, model, [2.0, 1.0] * 5)
        (warning,) = warnings_of(events, "stability.oscillation")
        assert warning["advice"] == advice
    events.clear()
    model = scalar_model()
    pipe = monitor_pipe(model, window=10, check_every=10, noise_floor=1.05)
    run_steps(pipe, model, [2.0, 1.0] * 5, outputs={"gates": torch.full((2, 3), 1 / 3)})
    assert warnings_of(events, "stability.oscillation")[0]["advice"] == MEMORY_ADVICE


def test_tolerance_zero_turns_a_warning_off_and_absent_outputs_are_named_once(events):
    model = scalar_model()
    pipe = monitor_pipe(model, window=10, check_every=10, noise_floor=1.01, tolerance=0.0)
    run_steps(pipe, model, [2.0, 1.0] * 10)
    assert not warnings_of(events, "stability.oscillation")
    (absent,) = warnings_of(events, "stability.outputs_absent")
    assert absent["keys"] == ["gates", "sparsity_mask", "memory_utilization"]


# -- state and config ----------------------------------------------------------------------------


def test_resume_is_bit_exact_metrics_and_warnings(events):
    values = [3.0, 1.0, 2.5, NAN, 2.0, 1.5, 4.0, 1.0, 2.0, 3.0] * 3

    def fresh():
        model = scalar_model()
        with torch.no_grad():
            model.weight.fill_(1.0)
        return model, monitor_pipe(model, window=4, check_every=3)

    model, pipe = fresh()
    run_steps(pipe, model, values)
    straight = pipe.metrics()
    straight_monitor = pipe.plugins["stability_monitor"]
    model, pipe = fresh()
    run_steps(pipe, model, values[:14])
    first = pipe.run.metrics  # the metric window is the host's, not the checkpoint's
    buffer = round_trip(pipe.state_dict())
    model, resumed = fresh()
    resumed.load_state_dict(buffer)
    resumed.run.metrics = first
    run_steps(resumed, model, values[14:])
    ours = {k: v for k, v in resumed.metrics().items() if k.startswith("stability_monitor/")}
    assert ours == {k: v for k, v in straight.items() if k.startswith("stability_monitor/")}
    assert len(ours) == 3 and all(math.isfinite(v) for v in ours.values())
    monitor = resumed.plugins["stability_monitor"]
    assert monitor.oscillations == straight_monitor.oscillations
    assert monitor.grad_norms == straight_monitor.grad_norms
    assert len(monitor.oscillations) == 10


def test_registered_and_configurable_from_toml(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text('[[plugins]]\nplugin = "stability_monitor"\nwindow = 50\n'
                    'gates = "memory_gates"\nnoise_floor = 1.2\ntolerance = 2.5\n')
    pipe = Pipeline.from_config(path)
    assert pipe.plugins["stability_monitor"].config == StabilityMonitor.Config(
        window=50, gates="memory_gates", noise_floor=1.2, tolerance=2.5)


@pytest.mark.parametrize(
    ("option", "value", "message"),
    [
        ("window", 2, "must be at least 3"),
        ("window", 0, "must be an integer >= 1"),
        ("tolerance", 0.5, "must be 0 (no warning) or a factor > 1"),
        ("tolerance", -1.0, "must be a number >= 0"),
        ("grad_norm_tolerance", 1.0, "must be 0 (no warning) or a factor > 1"),
        ("noise_floor", 0.9, "must be an oscillation ratio (max / min, so >= 1)"),
        ("noise_floor", "low", "expected a number"),
        ("check_every", 0, "must be an integer >= 1"),
        ("norm_type", 0, "must be a number > 0 (or inf"),
        ("gates", 3, "expected a string"),
    ],
)
def test_bad_options_name_the_instance_and_option(option, value, message):
    raw = {"plugins": [{"plugin": "stability_monitor", option: value}]}
    with pytest.raises(steadytrain.ConfigError) as info:
        steadytrain.load_config(raw)
    assert f"plugins[0].{option}: " in str(info.value) and message in str(info.value)


def test_checkpoint_with_another_window_is_an_error():
    model = scalar_model()
    state = monitor_pipe(model, window=4).state_dict()
    other = Pipeline([StabilityMonitor(StabilityMonitor.Config(window=8), id="mon")])
    other.load_state_dict({**state, "instances": {"mon": state["instances"]["stability_monitor"]}})
    with pytest.raises(steadytrain.CheckpointError, match=r"mon.window: .* 4 losses"):
        other.setup(model)
    monitor = StabilityMonitor()
    monitor.setup(steadytrain.Run(model=model))
    with pytest.raises(steadytrain.CheckpointError, match=r"state has keys \[.losses.\], expected"):
        monitor.load_state_dict({"losses": torch.zeros(10)})
