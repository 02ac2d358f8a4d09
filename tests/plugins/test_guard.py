import math

import pytest
import structlog
import torch
from helpers import round_trip

import steadytrain
from steadytrain import Pipeline, step_optimizer
from steadytrain.plugins.guard import Guard, nonfinite_grads, spike_check

NAN, INF = float("nan"), float("inf")


def reference_decisions(losses, bad_grads, factor, window, rebaseline_after=3):
    """The rule written out by hand: skip on NaN/inf, or on loss > factor × mean(last N);
    after *rebaseline_after* spikes in a row the last N losses are all the latest one."""
    recorded, decisions, spikes = [], [], 0
    for loss, bad_grad in zip(losses, bad_grads, strict=True):
        finite = math.isfinite(loss)
        spike, value = False, loss
        if len(recorded) >= window:
            limit = factor * sum(recorded[-window:]) / window
            spike = finite and loss > limit
            value = min(loss, limit)
        if finite:
            recorded.append(value)
        spikes = spikes + 1 if spike else 0
        if rebaseline_after and spikes == rebaseline_after:
            recorded += [loss] * window
            spikes = 0
        decisions.append(not finite or bad_grad or spike)
    return decisions


def scalar_model():
    return torch.nn.Linear(1, 1, bias=False)


def drive(pipe, model, values, nan_grad_steps=(), micro=1):
    """Feed the loss *values* (one per micro-batch) and return the skip decisions."""
    decisions = []
    steps = [values[i : i + micro] for i in range(0, len(values), micro)]
    for step, chunk in enumerate(steps):
        for index, value in enumerate(chunk):
            pipe.before_step(micro_batch=index, num_micro_batches=micro)
            loss = model.weight.sum() * 0 + value
            pipe.compute_loss(loss).backward()
        if step in nan_grad_steps:
            model.weight.grad.fill_(NAN)
        decisions.append(pipe.after_backward().skip)
        pipe.consolidate()
        model.zero_grad()
    return decisions


def guard_pipe(model, **options):
    options.setdefault("check_every", 1)
    return Pipeline([Guard(Guard.Config(**options))]).setup(model, total_steps=100)


# -- the plain functions ---------------------------------------------------------------


@pytest.mark.parametrize("bad", [NAN, INF, -INF, None])
@pytest.mark.parametrize(("dtype", "large"), [(torch.float32, 1e15), (torch.bfloat16, 1e15),
                                              (torch.float16, 6e4)])
def test_nonfinite_grads_agrees_with_isfinite(bad, dtype, large):
    torch.manual_seed(0)
    grads = [torch.randn(3, 4, dtype=dtype), torch.full((500,), large, dtype=dtype)]
    if bad is not None:
        grads[1][2] = bad
    expected = not all(bool(torch.isfinite(g).all()) for g in grads)
    assert bool(nonfinite_grads(grads)) is expected


def test_a_finite_gradient_whose_norm_overflows_float32_counts_as_non_finite():
    assert bool(nonfinite_grads([torch.full((4,), 1e20)]))


def test_nonfinite_grads_of_no_gradients_is_false():
    assert not bool(nonfinite_grads([]))


def test_spike_check_matches_the_formula():
    history = torch.tensor([1.0, 2.0, 3.0, 2.0])
    full = torch.tensor(True)
    spike, record = spike_check(torch.tensor(8.5), history, full, 4.0)
    assert bool(spike) and record.item() == 8.0  # 4 × mean 2
    spike, record = spike_check(torch.tensor(7.5), history, full, 4.0)
    assert not bool(spike) and record.item() == 7.5
    spike, record = spike_check(torch.tensor(100.0), history, torch.tensor(False), 4.0)
    assert not bool(spike) and record.item() == 100.0


# -- the plugin's decisions against the hand-written rule -----------------------------


def test_decisions_match_a_hand_written_reference():
    torch.manual_seed(1)
    values = (1 + torch.rand(40)).tolist()
    values[12] = 50.0        # an isolated spike
    values[15] = NAN
    values[18] = INF
    values[25:31] = [9.0] * 6  # a lasting level change: skipped, then accepted
    nan_grads = {5, 21}
    model = scalar_model()
    got = drive(guard_pipe(model, window=10, spike_factor=4.0), model, values, nan_grads)
    bad = [i in nan_grads for i in range(len(values))]
    expected = reference_decisions(values, bad, 4.0, 10)
    assert got == expected
    skipped = {i for i, s in enumerate(got) if s}
    assert {5, 12, 15, 18, 21, 25} <= skipped and 30 not in skipped


def test_spike_rule_waits_for_a_full_history():
    model = scalar_model()
    got = drive(guard_pipe(model, window=5), model, [1.0, 100.0, 1.0, 1.0, 1.0, 1.0, 100.0])
    assert got == [False] * 6 + [True]


@pytest.mark.parametrize(
    ("off", "expected"),
    [
        # the loss is 1, 1, 100 (a spike), NaN (with finite gradients); step 1 has NaN gradients
        ({"check_loss": False}, [False, True, True, False]),
        ({"check_grads": False}, [False, False, True, True]),
        ({"spike_factor": 0}, [False, True, False, True]),
    ],
)
def test_each_check_can_be_turned_off_alone(off, expected):
    model = scalar_model()
    pipe = guard_pipe(model, window=1, **off)
    assert drive(pipe, model, [1.0, 1.0, 100.0, NAN], nan_grad_steps={1}) == expected


def test_every_check_off_is_refused_saying_what_to_turn_on():
    options = {"check_loss": False, "check_grads": False, "spike_factor": 0}
    with pytest.raises(steadytrain.ConfigError) as info:
        steadytrain.load_config({"plugins": [{"plugin": "guard", **options}]})
    message = str(info.value)
    assert message.startswith("plugins[0].check_loss: check_loss and check_grads are false")
    assert "set check_loss or check_grads to true, or spike_factor > 1" in message
    with pytest.raises(steadytrain.OptionError, match="every check is off"):
        Guard.Config(**options)


def test_a_gradient_check_without_a_model_is_refused():
    pipe = Pipeline([Guard(Guard.Config(check_loss=False, spike_factor=0), id="g")])
    with pytest.raises(steadytrain.ConfigError, match=r"g\.check_grads: only the gradient "
                       "check is on, and without a model there are no gradients"):
        pipe.setup()


# -- a lasting level shift of the loss -------------------------------------------------


def level_shift(before=12, after=30, low=1.0, high=100.0):
    torch.manual_seed(9)
    return (low + 0.1 * torch.rand(before)).tolist() + [high] * after


def test_a_lasting_level_shift_rebaselines_instead_of_stopping_the_run():
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(0))
    values = level_shift()
    model = scalar_model()
    with structlog.testing.capture_logs() as events:
        got = drive(guard_pipe(model), model, values)
    assert got == reference_decisions(values, [False] * len(values), 4.0, 10)
    assert got == [False] * 12 + [True] * 3 + [False] * 27
    rebaselined = [e for e in events if e["event"] == "guard.rebaselined"]
    assert rebaselined == [{"event": "guard.rebaselined", "log_level": "warning",
                            "id": "guard", "step": 14, "new": 1, "total": 1,
                            "rebaseline_after": 3}]


@pytest.mark.parametrize("after", [1, 2, 5])
def test_rebaseline_after_sets_the_spikes_it_takes(after):
    values = level_shift()
    model = scalar_model()
    got = drive(guard_pipe(model, rebaseline_after=after), model, values)
    assert got == reference_decisions(values, [False] * len(values), 4.0, 10, after)
    assert got == [False] * 12 + [True] * after + [False] * (30 - after)


def test_an_isolated_spike_does_not_rebaseline():
    values = [*level_shift(after=0), 100.0, 1.0, 1.0, 100.0, 100.0, 1.0]
    model = scalar_model()
    pipe = guard_pipe(model)
    got = drive(pipe, model, values)
    assert got == [False] * 12 + [True, False, False, True, True, False]
    assert int(pipe.plugins["guard"].rebaselines) == 0


def test_without_rebaselining_a_lasting_level_shift_stops_the_run():
    model = scalar_model()
    pipe = guard_pipe(model, rebaseline_after=0)
    with pytest.raises(steadytrain.TrainingError, match=r"guard: 10 optimizer steps in a row "
                       r"were skipped by step 21 \(max_consecutive_skips = 10\); causes so "
                       "far: nonfinite_loss 0, nonfinite_grads 0, spike 10"):
        drive(pipe, model, level_shift())


def test_rebaselining_needs_a_limit_above_it():
    with pytest.raises(steadytrain.ConfigError, match=r"plugins\[0\].rebaseline_after: must "
                       r"be below max_consecutive_skips \(3\), got 3: the run would stop "
                       "before re-baselining"):
        steadytrain.load_config({"plugins": [{"plugin": "guard", "max_consecutive_skips": 3}]})
    # without the spike rule there is nothing to re-baseline
    steadytrain.load_config({"plugins": [{"plugin": "guard", "max_consecutive_skips": 3,
                                          "spike_factor": 0}]})


def test_loss_of_accumulated_micro_batches_is_their_mean():
    # History mean 1, factor 4.5: the mean of (1, 7) is 4 (kept), of (1, 9) is 5 (skipped);
    # judging the last micro-batch alone would skip both.
    for last, expected in ((7.0, False), (9.0, True)):
        model = scalar_model()
        pipe = guard_pipe(model, window=2, spike_factor=4.5)
        got = drive(pipe, model, [1.0, 1.0, 1.0, 1.0, 1.0, last], micro=2)
        assert got == [False, False, expected]


def test_guard_sees_gradients_before_a_plugin_that_repairs_them():
    class Repair(steadytrain.Plugin):
        name = "repair"

        @steadytrain.hookimpl
        def after_backward(self, ctx):
            for p in ctx.model.parameters():
                p.grad.nan_to_num_(0.0)

    model = scalar_model()
    pipe = Pipeline([Repair(), Guard(Guard.Config(check_every=1))]).setup(model)
    assert drive(pipe, model, [1.0, 1.0], nan_grad_steps={1}) == [False, True]


def test_training_matches_a_reference_loop_that_skips_by_hand():
    torch.manual_seed(2)
    data = [(torch.randn(16, 4), torch.randn(16, 1)) for _ in range(30)]
    scale = [1.0] * 30
    scale[14], scale[20] = 40.0, NAN
    torch.manual_seed(3)
    model = torch.nn.Linear(4, 1)
    reference = torch.nn.Linear(4, 1)
    reference.load_state_dict(model.state_dict())
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    ref_opt = torch.optim.SGD(reference.parameters(), lr=0.05, momentum=0.9)
    pipe = Pipeline([Guard(Guard.Config(window=10, check_every=5))]).setup(model, opt)
    losses, bad_grads, skipped = [], [], []
    for step, ((x, y), s) in enumerate(zip(data, scale, strict=True)):
        pipe.before_step()
        pipe.compute_loss(torch.nn.functional.mse_loss(model(x), y) * s).backward()
        if step == 7:
            model.weight.grad[0, 0] = INF
        if not pipe.after_backward().skip:
            opt.step()
        pipe.consolidate()
        opt.zero_grad()

        loss = torch.nn.functional.mse_loss(reference(x), y) * s
        loss.backward()
        if step == 7:
            reference.weight.grad[0, 0] = INF
        losses.append(loss.item())
        bad_grads.append(not all(bool(torch.isfinite(p.grad).all())
                                 for p in reference.parameters()))
        skip = reference_decisions(losses, bad_grads, 4.0, 10)[-1]
        if not skip:
            ref_opt.step()
        ref_opt.zero_grad()
        skipped.append(skip)
    assert [i for i, s in enumerate(skipped) if s] == [7, 14, 20]
    for ours, theirs in zip(model.parameters(), reference.parameters(), strict=True):
        assert torch.equal(ours, theirs)


# -- step_optimizer against an optimizer that was not stepped -------------------------------


@pytest.mark.parametrize(
    ("cls", "options"),
    [
        (torch.optim.Adam, {}),
        (torch.optim.AdamW, {"amsgrad": True, "weight_decay": 0.01}),
        (torch.optim.SGD, {"momentum": 0.9}),
        (torch.optim.SGD, {}),
        (torch.optim.Adagrad, {}),
    ],
)
@pytest.mark.parametrize("pattern", [[0, 1, 1, 0, 1, 0, 0], [1, 0, 1, 0]])
def test_step_optimizer_equals_not_stepping(cls, options, pattern):
    torch.manual_seed(4)
    model, reference = torch.nn.Linear(4, 3), torch.nn.Linear(4, 3)
    reference.load_state_dict(model.state_dict())
    opt = cls(model.parameters(), lr=0.1, fused=True, **options)
    ref_opt = cls(reference.parameters(), lr=0.1, fused=True, **options)
    for skip in pattern:
        x = torch.randn(8, 4)
        for m in (model, reference):
            m.zero_grad()
            m(x).pow(2).sum().backward()
        if skip:
            model.weight.grad[0, 0] = NAN
        step_optimizer(opt, torch.tensor(bool(skip)))
        if not skip:
            ref_opt.step()
    for ours, theirs in zip(model.parameters(), reference.parameters(), strict=True):
        assert torch.equal(ours, theirs)
    steps = [s["step"] for s in opt.state.values() if "step" in s]
    assert all(int(s) == pattern.count(0) for s in steps)


def test_step_optimizer_takes_the_outcome_and_plain_optimizers():
    torch.manual_seed(5)
    model = scalar_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)  # not fused: the flag is read
    pipe = guard_pipe(model)
    before = model.weight.detach().clone()
    for value in (1.0, NAN):
        pipe.before_step()
        pipe.compute_loss(model.weight.sum() * value).backward()
        step_optimizer(opt, pipe.after_backward())
        pipe.consolidate()
        opt.zero_grad()
    assert torch.equal(model.weight, before - 0.1)


@pytest.mark.parametrize("skip", [True, False])
def test_step_optimizer_with_a_python_bool(skip):
    model = scalar_model()
    before = model.weight.detach().clone()
    model.weight.grad = torch.ones_like(model.weight)
    step_optimizer(torch.optim.SGD(model.parameters(), lr=1.0), skip)
    assert torch.equal(model.weight, before if skip else before - 1)


def test_step_optimizer_refuses_an_optimizer_driven_by_a_grad_scaler():
    model = scalar_model()
    opt = torch.optim.Adam(model.parameters(), fused=True)
    opt.found_inf = torch.zeros(())
    with pytest.raises(steadytrain.UsageError, match="GradScaler"):
        step_optimizer(opt, torch.tensor(False))


# -- consecutive skips, snapshots, events -------------------------------------------------


def test_consecutive_skips_stop_the_run_at_the_next_check():
    model = scalar_model()
    pipe = guard_pipe(model, max_consecutive_skips=3, check_every=4, rebaseline_after=2)
    with pytest.raises(steadytrain.TrainingError,
                       match=r"3 optimizer steps in a row were skipped by step 3 "
                       r"\(max_consecutive_skips = 3\); causes so far: nonfinite_loss 3"):
        drive(pipe, model, [1.0, NAN, NAN, NAN, 1.0, 1.0, 1.0, 1.0])
    assert pipe.run.step == 3  # the step that read the counters did not close


def test_separate_skips_do_not_add_up():
    model = scalar_model()
    pipe = guard_pipe(model, max_consecutive_skips=2, check_every=3, spike_factor=0)
    assert drive(pipe, model, [NAN, 1.0, NAN, 1.0, NAN, 1.0]).count(True) == 3


def test_restore_brings_back_the_last_snapshot():
    torch.manual_seed(6)
    model = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.BatchNorm1d(3))
    opt = torch.optim.Adam(model.parameters(), lr=0.1)
    config = Guard.Config(snapshot_every=4, restore_after=2, max_consecutive_skips=5,
                          check_every=1, spike_factor=0)
    pipe = Pipeline([Guard(config)]).setup(model, opt)
    saved = None
    for step in range(7):
        pipe.before_step()
        x = torch.randn(8, 3)
        loss = model(x).pow(2).mean() * (NAN if step >= 5 else 1.0)
        pipe.compute_loss(loss).backward()
        if not pipe.after_backward().skip:
            opt.step()
        if step == 4:
            # corrupt the state after the snapshot of step 3, as a bad region would
            with torch.no_grad():
                model[0].weight.add_(5.0)
        pipe.consolidate()
        opt.zero_grad()
        if step == 3:
            saved = ({k: v.clone() for k, v in model.state_dict().items()},
                     {id(p): {k: v.clone() for k, v in s.items()} for p, s in opt.state.items()})
    model_state, optim_state = saved
    for key, value in model.state_dict().items():
        assert torch.equal(value, model_state[key]), key
    for param, state in opt.state.items():
        for key, value in state.items():
            assert torch.equal(value, optim_state[id(param)][key])


def test_restore_without_a_snapshot_yet_is_logged(caplog):
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(0))
    model = scalar_model()
    pipe = guard_pipe(model, snapshot_every=50, restore_after=1, spike_factor=0)
    with structlog.testing.capture_logs() as events:
        drive(pipe, model, [NAN, 1.0])
    names = [e["event"] for e in events]
    assert "guard.no_snapshot" in names and "guard.skipped" in names


# -- checkpoints ------------------------------------------------------------------------


def _train(pipe, model, opt, data):
    trajectory = []
    for x, y, s in data:
        pipe.before_step()
        pipe.compute_loss(torch.nn.functional.mse_loss(model(x), y) * s).backward()
        step_optimizer(opt, pipe.after_backward())
        pipe.consolidate()
        opt.zero_grad()
        trajectory.append(model.weight.detach().clone())
    return trajectory


def test_resume_is_bit_exact():
    torch.manual_seed(7)
    data = [(torch.randn(8, 4), torch.randn(8, 1), 30.0 if i in (9, 15) else 1.0)
            for i in range(20)]

    def fresh():
        torch.manual_seed(8)
        model = torch.nn.Linear(4, 1)
        opt = torch.optim.Adam(model.parameters(), lr=0.05, fused=True)
        pipe = Pipeline([Guard(Guard.Config(window=4, check_every=3))]).setup(model, opt)
        return model, opt, pipe

    model, opt, pipe = fresh()
    straight = _train(pipe, model, opt, data)

    model, opt, pipe = fresh()
    first = _train(pipe, model, opt, data[:12])
    buffer = round_trip({"pipe": pipe.state_dict(), "model": model.state_dict(),
                "opt": opt.state_dict()})
    saved = buffer
    model, opt, pipe = fresh()
    model.load_state_dict(saved["model"])
    opt.load_state_dict(saved["opt"])
    pipe.load_state_dict(saved["pipe"])
    resumed = first + _train(pipe, model, opt, data[12:])
    assert pipe.run.skipped_steps == 2
    assert all(torch.equal(a, b) for a, b in zip(straight, resumed, strict=True))


def test_checkpoint_with_another_window_is_an_error():
    model = scalar_model()
    state = guard_pipe(model, window=4).state_dict()
    other = Pipeline([Guard(Guard.Config(window=5))])
    other.load_state_dict(state)
    with pytest.raises(steadytrain.CheckpointError, match=r"guard.window: .* 4 losses"):
        other.setup(model)


def test_checkpoint_with_missing_keys_is_an_error():
    guard = Guard()
    guard.setup(steadytrain.Run(model=scalar_model()))
    with pytest.raises(steadytrain.CheckpointError, match=r"guard.*keys \[.history.\], expected"):
        guard.load_state_dict({"history": torch.zeros(10)})


# -- configuration and bad input -----------------------------------------------------


def test_registered_and_configurable_from_toml(tmp_path):
    assert "guard" in steadytrain.Registry.discover().names()
    path = tmp_path / "run.toml"
    path.write_text('[[plugins]]\nplugin = "guard"\nspike_factor = 3\nwindow = 20\n'
                    'include = ["weight"]\n')
    pipe = Pipeline.from_config(path)
    guard = pipe.plugins["guard"]
    assert guard.config == Guard.Config(spike_factor=3.0, window=20)
    pipe.setup(scalar_model())
    assert len(guard.params) == 1


@pytest.mark.parametrize(
    ("option", "value", "message"),
    [
        ("spike_factor", 1.0, "must be 0 (off) or a number > 1"),
        ("spike_factor", -3, "must be 0 (off) or a number > 1"),
        ("spike_factor", "x", "expected a number"),
        ("window", 0, "must be an integer >= 1"),
        ("max_consecutive_skips", -1, "must be an integer >= 1"),
        ("check_every", 0, "must be an integer >= 1"),
        ("snapshot_every", -2, "must be an integer >= 0"),
        ("restore_after", -1, "must be an integer >= 0"),
        ("rebaseline_after", -1, "must be an integer >= 0"),
        ("rebaseline_after", 1.5, "expected an integer"),
        ("snapshot_device", "gpu", "must be one of 'same', 'cpu'"),
    ],
)
def test_bad_options_name_the_instance_and_option(option, value, message):
    raw = {"plugins": [{"plugin": "guard", "id": "g1", option: value}]}
    with pytest.raises(steadytrain.ConfigError) as info:
        steadytrain.load_config(raw)
    assert f"plugins[0].{option}: " in str(info.value)
    assert message in str(info.value)


def test_restore_needs_snapshots_and_a_higher_limit():
    with pytest.raises(steadytrain.ConfigError, match=r"plugins\[0\].restore_after: needs "
                       "snapshot_every"):
        steadytrain.load_config({"plugins": [{"plugin": "guard", "restore_after": 2}]})
    with pytest.raises(steadytrain.ConfigError, match=r"restore_after: must be below "
                       r"max_consecutive_skips \(3\)"):
        steadytrain.load_config({"plugins": [{"plugin": "guard", "restore_after": 3,
                                              "snapshot_every": 5,
                                              "max_consecutive_skips": 3}]})


def test_snapshots_without_a_model_are_an_error():
    pipe = Pipeline([Guard(Guard.Config(snapshot_every=5), id="g2")])
    with pytest.raises(steadytrain.ConfigError, match=r"g2.snapshot_every: snapshots need"):
        pipe.setup()


def test_a_step_without_a_task_loss_is_an_error_naming_the_guard():
    model = scalar_model()
    pipe = guard_pipe(model)
    pipe.before_step()
    model.weight.sum().backward()  # the host backpropagated its own loss, not compute_loss's
    with pytest.raises(steadytrain.ConfigError, match=r"guard: no task loss this step; pass "
                       r"it to pipe\.compute_loss\(loss\)"):
        pipe.after_backward()


def test_the_guard_reads_the_step_loss_the_core_records():
    model = scalar_model()
    pipe = guard_pipe(model)
    pipe.before_step(micro_batch=0, num_micro_batches=2)
    pipe.compute_loss(model.weight.sum() * 0 + 1.0).backward()
    ctx = pipe.before_step(micro_batch=1, num_micro_batches=2)
    pipe.compute_loss(model.weight.sum() * 0 + 3.0).backward()
    assert ctx.step_loss.item() == 2.0
    assert pipe.plugins["guard"].step_loss(ctx).item() == 2.0


def test_check_flags_must_be_booleans():
    with pytest.raises(steadytrain.OptionError, match="check_grads: must be true or false"):
        Guard.Config(check_grads="no")


def test_gradient_only_guard_needs_no_loss():
    model = scalar_model()
    pipe = guard_pipe(model, check_loss=False, spike_factor=0)
    pipe.before_step()
    model.weight.grad = torch.full_like(model.weight, NAN)
    pipe.compute_loss(model.weight.sum())
    assert pipe.after_backward().skip


# -- on CUDA: the counters reach the host without a sync ---------------------------------

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


class CudaRun:
    """A guarded CUDA model stepped with step_optimizer; ``step(busy=True)`` keeps the
    device busy before ``consolidate`` so that a copy started there cannot arrive in it."""

    def __init__(self, **options):
        torch.manual_seed(10)
        self.model = torch.nn.Linear(4, 1).cuda()
        self.opt = torch.optim.AdamW(self.model.parameters(), fused=True)
        self.pipe = Pipeline([Guard(Guard.Config(**options))]).setup(self.model, self.opt)
        self.x = torch.randn(8, 4, device="cuda")

    def step(self, scale=1.0, *, busy=False):
        pipe = self.pipe
        pipe.before_step()
        pipe.compute_loss(self.model(self.x).pow(2).mean() * scale).backward()
        step_optimizer(self.opt, pipe.after_backward())
        if busy:
            torch.cuda._sleep(200_000_000)
        pipe.consolidate()
        self.opt.zero_grad()


def synchronize():
    torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")


def guard_events(events):
    return [(e["event"], e["step"]) for e in events if e["event"].startswith("guard.")]


@cuda
def test_on_cuda_the_counters_are_read_at_a_later_step_without_a_sync():
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(0))
    run = CudaRun(check_every=2, max_consecutive_skips=2, spike_factor=0)
    run.step()  # the fused optimizer's first step reads the flag once
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        with structlog.testing.capture_logs() as events:
            run.step(NAN, busy=True)  # step 1 checks: its counters are still on the way
            assert guard_events(events) == []
            synchronize()
            run.step(NAN)  # they have arrived and are read here, at step 2
            assert guard_events(events) == [("guard.skipped", 1)]
            run.step(NAN, busy=True)  # step 3 checks a run of 3 skips
            synchronize()
            with pytest.raises(steadytrain.TrainingError, match="3 optimizer steps in a row "
                               "were skipped by step 3"):
                run.step()
    finally:
        torch.cuda.set_sync_debug_mode("default")


@cuda
def test_on_cuda_a_read_in_flight_is_checkpointed_and_completed_after_the_resume():
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(0))
    run = CudaRun(check_every=2)
    run.step()
    run.step(NAN, busy=True)
    saved = round_trip(run.pipe.state_dict())
    assert saved["instances"]["guard"]["state"]["pending_read"]["step"] == 1
    resumed = CudaRun(check_every=2)
    resumed.pipe.load_state_dict(saved)
    with structlog.testing.capture_logs() as events:
        torch.cuda.synchronize()
        resumed.step()
    assert guard_events(events) == [("guard.skipped", 1)]
