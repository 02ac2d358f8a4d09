import math
import statistics

import pytest
import structlog
import torch
from helpers import round_trip

import steadytrain
from steadytrain import Pipeline
from steadytrain.plugins.stability_monitor import (
    StabilityMonitor,
    loss_variance,
    mean_gate_entropy,
    oscillation_ratio,
)

NAN = float("nan")


@pytest.fixture
def events():
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(0))
    with structlog.testing.capture_logs() as captured:
        yield captured


def monitor_pipe(model, **options):
    return Pipeline([StabilityMonitor(StabilityMonitor.Config(**options))]).setup(model)


def run_steps(pipe, model, losses, outputs=None, grad_scale=1.0):
    for value in losses:
        pipe.before_step()
        loss = model.weight.sum() * grad_scale + value - model.weight.sum().detach() * grad_scale
        pipe.compute_loss(loss, outputs=outputs).backward()
        pipe.after_backward()
        pipe.consolidate()
        model.zero_grad()


def scalar_model():
    return torch.nn.Linear(1, 1, bias=False)


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


# -- the plugin ------------------------------------------------------------------------


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


def test_warnings_at_checks_carry_the_advice(events):
    model = scalar_model()
    pipe = monitor_pipe(model, window=4, check_every=4, oscillation_threshold=2.0,
                        grad_norm_threshold=5.0)
    run_steps(pipe, model, [1.0, 1.1, 1.05, 1.0])
    assert not [e for e in events if e["event"] in ("stability.oscillation",
                                                    "stability.grad_norm")]
    run_steps(pipe, model, [1.0, 5.0, 1.0, 1.0], grad_scale=20.0)
    oscillation = [e for e in events if e["event"] == "stability.oscillation"]
    grad = [e for e in events if e["event"] == "stability.grad_norm"]
    assert len(oscillation) == 1 and oscillation[0]["ratio"] == 5.0
    assert "0.5 vs 1.0" in oscillation[0]["advice"] and oscillation[0]["step"] == 7
    assert len(grad) == 1 and grad[0]["peak"] == pytest.approx(20.0)
    absent = [e for e in events if e["event"] == "stability.outputs_absent"]
    assert len(absent) == 1 and absent[0]["keys"] == ["gates", "sparsity_mask",
                                                      "memory_utilization"]


def test_check_reads_the_window_and_resets_the_peak():
    model = scalar_model()
    monitor = StabilityMonitor(StabilityMonitor.Config(window=3, check_every=1000))
    pipe = Pipeline([monitor]).setup(model)
    run_steps(pipe, model, [2.0, 8.0, 4.0, 4.0], grad_scale=3.0)
    assert monitor.check(3) == {"loss_oscillation": 2.0, "peak_grad_norm": 3.0}
    assert monitor.check(3)["peak_grad_norm"] == 0.0


def test_resume_is_bit_exact():
    values = [3.0, 1.0, 2.5, NAN, 2.0, 1.5, 4.0, 1.0, 2.0, 3.0]

    def fresh():
        model = scalar_model()
        with torch.no_grad():
            model.weight.fill_(1.0)
        return model, monitor_pipe(model, window=4, check_every=3)

    model, pipe = fresh()
    run_steps(pipe, model, values)
    straight = pipe.metrics()
    model, pipe = fresh()
    run_steps(pipe, model, values[:6])
    first = pipe.run.metrics  # the metric window is the host's, not the checkpoint's
    buffer = round_trip(pipe.state_dict())
    model, resumed = fresh()
    resumed.load_state_dict(buffer)
    resumed.run.metrics = first
    run_steps(resumed, model, values[6:])
    ours = {k: v for k, v in resumed.metrics().items() if k.startswith("stability_monitor/")}
    assert ours == {k: v for k, v in straight.items() if k.startswith("stability_monitor/")}
    assert len(ours) == 3 and all(math.isfinite(v) for v in ours.values())


def test_registered_and_configurable_from_toml(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text('[[plugins]]\nplugin = "stability_monitor"\nwindow = 50\n'
                    'gates = "memory_gates"\noscillation_threshold = 1.2\n')
    pipe = Pipeline.from_config(path)
    assert pipe.plugins["stability_monitor"].config == StabilityMonitor.Config(
        window=50, gates="memory_gates", oscillation_threshold=1.2)


@pytest.mark.parametrize(
    ("option", "value", "message"),
    [
        ("window", 1, "must be at least 2"),
        ("window", 0, "must be an integer >= 1"),
        ("oscillation_threshold", -1.0, "must be a number >= 0"),
        ("grad_norm_threshold", -0.5, "must be a number >= 0"),
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
        monitor.load_state_dict({"losses": torch.zeros(100)})
