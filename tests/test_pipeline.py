import math

import pytest
import torch
from helpers import L2Outputs, round_trip

import steadytrain
from steadytrain import Pipeline, hookimpl, schedules


class Recorder(steadytrain.Plugin):
    """Append (key, hook) to a shared list at every hook."""

    name = "recorder"
    calls: list

    @hookimpl
    def before_step(self, ctx):
        self.calls.append((self.id, "before_step"))

    @hookimpl
    def compute_regularizers(self, ctx):
        self.calls.append((self.id, "compute_regularizers"))

    @hookimpl
    def after_backward(self, ctx):
        self.calls.append((self.id, "after_backward"))

    @hookimpl
    def consolidate(self, ctx):
        self.calls.append((self.id, "consolidate"))


class Last(Recorder):
    name = "last"

    @hookimpl(trylast=True)
    def after_backward(self, ctx):
        self.calls.append((self.id, "after_backward"))


class First(Recorder):
    name = "first"

    @hookimpl(tryfirst=True)
    def after_backward(self, ctx):
        self.calls.append((self.id, "after_backward"))


class Counter(steadytrain.Plugin):
    """Stateful regularizer: weight of its term follows a running count."""

    name = "counter"

    @hookimpl
    def setup(self, run):
        self.seen = torch.zeros(())

    @hookimpl
    def compute_regularizers(self, ctx):
        self.seen += 1
        return {"scaled": ctx.outputs["pred"].abs().mean() / self.seen}

    def state_dict(self):
        return {"seen": self.seen.clone()}

    def load_state_dict(self, state):
        self.seen = state["seen"].clone()


def one_step(pipe, model, opt, x, y):
    pipe.before_step(batch=x, targets=y)
    pred = model(x)
    loss = pipe.compute_loss(torch.nn.functional.mse_loss(pred, y), outputs={"pred": pred})
    loss.backward()
    if not pipe.after_backward().skip:
        opt.step()
    pipe.consolidate()
    opt.zero_grad()
    return loss


def data(n=16, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 4, generator=g), torch.randn(n, 2, generator=g)


def test_hooks_run_in_config_order_with_tryfirst_and_trylast(model):
    calls = []
    plugins = [Last(id="a"), Recorder(id="b"), First(id="c"), Recorder(id="d")]
    for p in plugins:
        p.calls = calls
    pipe = Pipeline(plugins).setup(model, torch.optim.SGD(model.parameters(), lr=0.1))
    one_step(pipe, model, torch.optim.SGD(model.parameters(), lr=0.1), *data())
    by_hook = {}
    for key, hook in calls:
        by_hook.setdefault(hook, []).append(key)
    assert by_hook["before_step"] == ["a", "b", "c", "d"]
    assert by_hook["consolidate"] == ["a", "b", "c", "d"]
    assert by_hook["after_backward"] == ["c", "b", "d", "a"]


def test_loss_is_task_loss_plus_weighted_terms_in_one_graph(model):
    x, y = data()
    pipe = Pipeline([L2Outputs(weight=0.3), Counter(weight=2.0)])
    pipe.setup(model, None)
    pipe.before_step()
    pred = model(x)
    task = torch.nn.functional.mse_loss(pred, y)
    loss = pipe.compute_loss(task, outputs={"pred": pred})
    expected = task + 0.3 * pred.pow(2).mean() + 2.0 * pred.abs().mean()
    torch.testing.assert_close(loss, expected, rtol=0, atol=1e-7)
    assert loss.grad_fn is not None
    pipe.after_backward()
    pipe.consolidate()
    metrics = pipe.metrics()
    assert metrics["reg/l2_outputs/l2"] == pytest.approx(pred.pow(2).mean().item())
    assert metrics["reg_weighted/l2_outputs/l2"] == pytest.approx(0.3 * pred.pow(2).mean().item())
    assert metrics["loss/task"] == pytest.approx(task.item())
    assert pipe.metrics() == {}


def test_weight_schedule_follows_step_and_progress(model):
    curriculum = schedules.CosineCurriculum(value=2.0)
    pipe = Pipeline([L2Outputs(weight=curriculum)]).setup(model, None, total_steps=4)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    x, y = data()
    for step in range(4):
        one_step(pipe, model, opt, x, y)
        metrics = pipe.metrics()
        ratio = metrics["reg_weighted/l2_outputs/l2"] / metrics["reg/l2_outputs/l2"]
        expected = 2.0 * 0.5 * (1 + math.cos(math.pi * (1 - step / 4)))
        assert ratio == pytest.approx(expected, abs=1e-6)


def test_progress_schedule_without_total_steps_is_an_error(model):
    pipe = Pipeline([L2Outputs(id="reg", weight=schedules.CosineCurriculum())])
    with pytest.raises(steadytrain.ConfigError, match=r"reg\.weight.*total_steps"):
        pipe.setup(model, None)


def _grads(model):
    return [p.grad.clone() for p in model.parameters()]


def test_gradient_accumulation_matches_the_full_batch(model):
    x, y = data(n=12)
    reference = Pipeline([L2Outputs(weight=0.5)]).setup(model, None)
    reference.before_step()
    pred = model(x)
    reference.compute_loss(torch.nn.functional.mse_loss(pred, y), outputs={"pred": pred}).backward()
    expected = _grads(model)
    model.zero_grad()

    pipe = Pipeline([L2Outputs(weight=0.5)]).setup(model, None)
    for i, (xb, yb) in enumerate(zip(x.chunk(3), y.chunk(3), strict=True)):
        pipe.before_step(micro_batch=i, num_micro_batches=3)
        pred = model(xb)
        loss = pipe.compute_loss(torch.nn.functional.mse_loss(pred, yb), outputs={"pred": pred})
        loss.backward()
    pipe.after_backward()
    pipe.consolidate()
    for got, want in zip(_grads(model), expected, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)


def test_separate_backward_of_task_loss_and_terms_fails_but_the_combined_loss_does_not(model):
    x, y = data()
    pred = model(x)
    task = torch.nn.functional.mse_loss(pred, y)
    task.backward()
    with pytest.raises(RuntimeError, match="backward through the graph a second time"):
        pred.pow(2).mean().backward()
    model.zero_grad()
    pipe = Pipeline([L2Outputs()]).setup(model, None)
    pipe.before_step()
    pred = model(x)
    pipe.compute_loss(torch.nn.functional.mse_loss(pred, y), outputs={"pred": pred}).backward()
    assert all(p.grad is not None for p in model.parameters())


class SkipWhen(steadytrain.Plugin):
    name = "skip_when"

    @hookimpl
    def after_backward(self, ctx):
        ctx.request_skip("loss too large", when=ctx.task_loss.detach() > self.threshold)

    @hookimpl
    def consolidate(self, ctx):
        self.saw_skipped.append(ctx.skipped)


def test_a_plugin_can_ask_the_host_to_skip_the_step(model):
    plugin = SkipWhen()
    plugin.threshold, plugin.saw_skipped = -1.0, []
    pipe = Pipeline([plugin]).setup(model, None)
    pipe.before_step()
    pipe.compute_loss(model(data()[0]).pow(2).mean())
    outcome = pipe.after_backward()
    assert isinstance(outcome.flag, torch.Tensor) and bool(outcome.flag)
    assert outcome.skip and outcome.reasons == ["skip_when: loss too large"]
    pipe.consolidate()
    assert plugin.saw_skipped == [True] and pipe.run.skipped_steps == 1 and pipe.run.step == 1
    plugin.threshold = 1e9
    pipe.before_step()
    pipe.compute_loss(model(data()[0]).pow(2).mean())
    assert not pipe.after_backward().skip
    pipe.consolidate()
    assert plugin.saw_skipped == [True, False]


class Boom(steadytrain.Plugin):
    name = "boom"

    @hookimpl
    def compute_regularizers(self, ctx):
        raise ZeroDivisionError("nothing to divide")


def test_a_hook_that_raises_is_named_with_hook_and_step(model):
    pipe = Pipeline([L2Outputs(), Boom(id="kaboom")]).setup(model, None)
    with pytest.raises(steadytrain.HookError) as info:
        pipe.before_step()
        pipe.compute_loss(torch.zeros(()), outputs={"pred": model(data()[0])})
    message = str(info.value)
    assert "'kaboom' (boom)" in message and "compute_regularizers" in message
    assert "step 0" in message and isinstance(info.value.__cause__, ZeroDivisionError)
    assert pipe.run.step == 0


@pytest.mark.parametrize(
    ("term", "match"),
    [
        (1.0, "must be a tensor, got float"),
        (torch.ones(3), r"must be a scalar, got shape \(3,\)"),
        (torch.tensor(float("nan")), "nan, not finite"),
        (torch.tensor(float("inf")), "inf, not finite"),
    ],
)
def test_bad_terms_are_errors_naming_instance_and_term(model, term, match):
    class Bad(steadytrain.Plugin):
        name = "bad"

        @hookimpl
        def compute_regularizers(self, ctx):
            return {"t": term}

    pipe = Pipeline([Bad(id="culprit")]).setup(model, None)
    pipe.before_step()
    with pytest.raises(steadytrain.TermError, match=match) as info:
        pipe.compute_loss(torch.zeros(()))
    assert "'culprit', term 't', step 0" in str(info.value)


def test_non_mapping_result_is_an_error(model):
    class Listy(steadytrain.Plugin):
        name = "listy"

        @hookimpl
        def compute_regularizers(self, ctx):
            return [torch.zeros(())]

    pipe = Pipeline([Listy()]).setup(model, None)
    pipe.before_step()
    with pytest.raises(steadytrain.TermError, match=r"'listy'.*mapping"):
        pipe.compute_loss(torch.zeros(()))


def test_deferred_finite_check_raises_when_metrics_are_read(model):
    class NanTerm(steadytrain.Plugin):
        name = "nan_term"

        @hookimpl
        def compute_regularizers(self, ctx):
            return {"t": ctx.task_loss * float("nan")}

    pipe = Pipeline([NanTerm()], finite_check="log").setup(model, None)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    for _ in range(2):
        pipe.before_step()
        pipe.compute_loss(model(data()[0]).sum() * 0)
        pipe.after_backward()
        opt.step()
        pipe.consolidate()
    with pytest.raises(steadytrain.TermError, match=r"reg/nan_term/t during steps 0\.\.1"):
        pipe.metrics()


def test_step_methods_out_of_order_are_clear_errors(model):
    pipe = Pipeline([L2Outputs()])
    with pytest.raises(steadytrain.UsageError, match="needs setup"):
        pipe.before_step()
    pipe.setup(model, None)
    with pytest.raises(steadytrain.UsageError, match="before_step"):
        pipe.compute_loss(torch.zeros(()))
    pipe.before_step(micro_batch=0, num_micro_batches=2)
    with pytest.raises(steadytrain.UsageError, match="out of order: expected micro_batch 1 of 2"):
        pipe.before_step(micro_batch=0, num_micro_batches=2)
    with pytest.raises(steadytrain.UsageError, match="once, after the last micro-batch"):
        pipe.after_backward()
    pipe.before_step(micro_batch=1, num_micro_batches=2)
    with pytest.raises(steadytrain.UsageError, match="consolidate\\(\\) before after_backward"):
        pipe.consolidate()
    with pytest.raises(steadytrain.UsageError, match="micro_batch must be in"):
        pipe.before_step(micro_batch=2, num_micro_batches=2)


def test_duplicate_instance_ids_are_an_error():
    with pytest.raises(steadytrain.ConfigError, match="'l2_outputs' is used twice"):
        Pipeline([L2Outputs(), L2Outputs()])


def test_report_puts_module_tensors_into_the_step_outputs(model):
    class Reporting(torch.nn.Module):
        def forward(self, x):
            steadytrain.report("gates", x.softmax(-1))
            return x

    seen = {}

    class Reader(steadytrain.Plugin):
        name = "reader"

        @hookimpl
        def compute_regularizers(self, ctx):
            seen.update(ctx.outputs)

    net = torch.nn.Sequential(Reporting(), Reporting())
    pipe = Pipeline([Reader()]).setup(net, None)
    x = torch.randn(2, 3)
    net(x)  # outside a step: ignored
    pipe.before_step()
    net(x)
    pipe.compute_loss(x.sum(), outputs={"logits": x})
    assert set(seen) == {"gates", "logits"}
    assert len(seen["gates"]) == 2 and torch.equal(seen["gates"][0], x.softmax(-1))


def test_taps_capture_module_outputs_and_unknown_modules_are_errors(model):
    captured = {}

    class Tapper(steadytrain.Plugin):
        name = "tapper"

        @hookimpl
        def setup(self, run):
            self.names = run.tap(self, self.patterns)

        @hookimpl
        def compute_regularizers(self, ctx):
            captured.update({n: ctx.taps[n] for n in self.names})

    tapper = Tapper()
    tapper.patterns = ["#"]
    pipe = Pipeline([tapper]).setup(model, None)
    x = data()[0]
    hidden, doubled = torch.tanh(model[0](x)), model(2 * x)
    pipe.before_step()
    pipe.compute_loss(model(x).sum())
    assert set(captured) == {"0", "1", "2"}
    torch.testing.assert_close(captured["1"], [hidden])
    pipe.after_backward()
    pipe.consolidate()
    assert not pipe.run.taps  # released with the step, so the graph is not kept alive
    model(x)  # outside a step: not captured
    assert not pipe.run.taps
    pipe.before_step()
    pipe.compute_loss(model(x).sum() + model(2 * x).sum())
    assert [len(captured[n]) for n in ("0", "1", "2")] == [2, 2, 2]
    torch.testing.assert_close(captured["2"][1], doubled)
    pipe.after_backward()
    pipe.consolidate()
    pipe.close()
    assert not model[0]._forward_hooks

    typo = Tapper(id="tap")
    typo.patterns = ["encoder.*"]
    with pytest.raises(steadytrain.FilterError, match=r"tap\.taps\.include: pattern 'encoder\.\*'"):
        Pipeline([typo]).setup(model, None)


def test_evaluating_and_epoch_hooks(model):
    events = []

    class Lifecycle(steadytrain.Plugin):
        name = "lifecycle"

        @hookimpl
        def on_eval_start(self, run):
            events.append("eval_start")

        @hookimpl
        def on_eval_end(self, run):
            events.append("eval_end")

        @hookimpl
        def on_epoch_start(self, run):
            events.append(f"epoch_start {run.epoch}")

        @hookimpl
        def on_epoch_end(self, run):
            events.append(f"epoch_end {run.epoch}")

        @hookimpl
        def teardown(self):
            events.append("teardown")

    with Pipeline([Lifecycle()]).setup(model, None) as pipe:
        pipe.epoch_start()
        with pytest.raises(KeyError), pipe.evaluating():
            raise KeyError("evaluation failed")
        pipe.epoch_end()
        pipe.epoch_start()
    assert events == ["epoch_start 0", "eval_start", "eval_end", "epoch_end 0",
                      "epoch_start 1", "teardown"]


def test_checkpoint_resume_is_bit_exact(model):
    x, y = data()
    state0 = {k: v.clone() for k, v in model.state_dict().items()}

    def build():
        return Pipeline([Counter(weight=0.7), L2Outputs(weight=schedules.LinearWarmup(1.0, 3))])

    def optimizer():
        return torch.optim.Adam(model.parameters(), lr=0.01)

    opt = optimizer()
    pipe = build().setup(model, opt, total_steps=6)
    straight = [one_step(pipe, model, opt, x, y).detach() for _ in range(6)]
    final = {k: v.clone() for k, v in model.state_dict().items()}

    model.load_state_dict(state0)
    opt = optimizer()
    pipe = build().setup(model, opt, total_steps=6)
    for _ in range(3):
        one_step(pipe, model, opt, x, y)
    buffer = round_trip({"pipe": pipe.state_dict(), "model": model.state_dict(),
                "opt": opt.state_dict()})
    saved = buffer
    model.load_state_dict(saved["model"])
    opt = optimizer()
    opt.load_state_dict(saved["opt"])
    resumed = build()
    resumed.load_state_dict(saved["pipe"])
    resumed.setup(model, opt, total_steps=6)
    assert resumed.run.step == 3
    after = [one_step(resumed, model, opt, x, y).detach() for _ in range(3)]
    assert all(torch.equal(a, b) for a, b in zip(after, straight[3:], strict=True))
    assert all(torch.equal(final[k], v) for k, v in model.state_dict().items())


def test_checkpoint_from_another_plugin_set_is_an_error(model):
    saved = Pipeline([Counter(), L2Outputs(id="l2")]).setup(model, None).state_dict()
    other = Pipeline([Counter(), L2Outputs(id="l2_other"), Recorder(id="counter2")])
    with pytest.raises(steadytrain.CheckpointError) as info:
        other.load_state_dict(saved)
    message = str(info.value)
    assert "not in the checkpoint: counter2, l2_other" in message
    assert "only in the checkpoint: l2" in message
    with pytest.raises(steadytrain.CheckpointError, match="not a steadytrain pipeline"):
        other.load_state_dict({"model": 1})


def test_stateless_plugin_rejects_foreign_state(model):
    pipe = Pipeline([L2Outputs()]).setup(model, None)
    state = pipe.state_dict()
    state["instances"]["l2_outputs"]["state"] = {"shadow": torch.zeros(1)}
    with pytest.raises(steadytrain.CheckpointError, match="keeps no state"):
        pipe.load_state_dict(state)


def test_register_adds_a_plain_object_with_hooks(model):
    seen = []

    class Notebook:
        @hookimpl
        def consolidate(self, ctx):
            seen.append(ctx.step)

    pipe = Pipeline([L2Outputs()])
    pipe.register(Notebook(), name="nb")
    pipe.setup(model, torch.optim.SGD(model.parameters(), lr=0.1))
    one_step(pipe, model, pipe.run.optimizer, *data())
    assert seen == [0] and list(pipe.plugins) == ["l2_outputs", "nb"]
    with pytest.raises(steadytrain.UsageError, match="before setup"):
        pipe.register(Notebook(), name="late")


def test_wrong_hook_signature_and_unknown_hook_are_errors():
    class WrongArg:
        @hookimpl
        def before_step(self, context):
            pass

    class Misspelled:
        @hookimpl
        def before_stpe(self, ctx):
            pass

    with pytest.raises(steadytrain.RegistryError, match=r"'w'.*invalid hook implementation"):
        Pipeline().register(WrongArg(), name="w")
    with pytest.raises(steadytrain.RegistryError, match="before_stpe"):
        Pipeline().register(Misspelled(), name="m")


def test_plugin_parameters_and_create_graph_capability(model):
    class Learnable(steadytrain.Plugin):
        name = "learnable"
        needs_create_graph = True

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.scale = torch.nn.Parameter(torch.ones(()))

        def parameters(self):
            return [self.scale]

    pipe = Pipeline([Learnable(), L2Outputs()])
    assert pipe.needs_create_graph
    assert [p is pipe.plugins["learnable"].scale for p in pipe.parameters()] == [True]
    assert not Pipeline([L2Outputs()]).needs_create_graph


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_a_step_causes_no_host_sync_on_cuda():
    net = torch.nn.Linear(4, 2).cuda()
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    pipe = Pipeline([L2Outputs(), Counter()]).setup(net, opt)
    x, y = (t.cuda() for t in data())
    one_step(pipe, net, opt, x, y)  # warm-up allocations
    torch.cuda.set_sync_debug_mode("error")
    try:
        pipe.before_step()
        pred = net(x)
        pipe.compute_loss(torch.nn.functional.mse_loss(pred, y), outputs={"pred": pred}).backward()
        pipe.after_backward()
        opt.step()
        pipe.consolidate()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert pipe.metrics()["loss/task"] > 0


def test_the_skip_decision_stays_on_the_device_until_someone_reads_it(model):
    class TensorSkip(steadytrain.Plugin):
        name = "tensor_skip"

        @hookimpl
        def after_backward(self, ctx):
            ctx.request_skip("always", when=torch.ones((), dtype=torch.bool))

    pipe = Pipeline([TensorSkip()]).setup(model, None)
    for _ in range(3):
        pipe.before_step()
        pipe.compute_loss(model(data()[0]).pow(2).mean())
        outcome = pipe.after_backward()
        pipe.consolidate()
        assert not outcome.decided
    assert pipe.run._skipped_pending is not None
    assert pipe.run.skipped_steps == 3 and pipe.run._skipped_pending is None


def test_negative_weights_are_refused_unless_the_plugin_allows_them():
    with pytest.raises(steadytrain.ConfigError, match=r"neg\.weight: must be >= 0.*-0\.5"):
        L2Outputs(id="neg", weight=schedules.LinearWarmup(value=-0.5, warmup_steps=3))

    class Reward(L2Outputs):
        name = "reward"
        allows_negative_weight = True

    assert Reward(weight=-1.0).weight.lowest == -1.0


def test_plugins_see_their_current_weight_and_can_log_from_lifecycle_hooks(model):
    seen = []

    class Watcher(steadytrain.Plugin):
        name = "watcher"

        @hookimpl
        def compute_regularizers(self, ctx):
            seen.append(ctx.weight)

        @hookimpl
        def on_epoch_end(self, run):
            run.log(self, "epochs", run.epoch + 1)

    pipe = Pipeline([Watcher(weight=schedules.Piecewise((1,), (0.25, 0.75)))])
    pipe.setup(model, torch.optim.SGD(model.parameters(), lr=0.0))
    for _ in range(2):
        one_step(pipe, model, pipe.run.optimizer, *data())
    pipe.epoch_end()
    assert seen == [0.25, 0.75] and pipe.metrics()["watcher/epochs"] == 1.0


def test_non_finite_terms_of_a_non_finite_task_loss_are_left_to_the_guard(model):
    pipe = Pipeline([L2Outputs()]).setup(model, None)
    x, y = data()
    x[0, 0] = float("nan")
    pipe.before_step()
    pred = model(x)
    loss = pipe.compute_loss(torch.nn.functional.mse_loss(pred, y), outputs={"pred": pred})
    assert torch.isnan(loss)
    pipe.after_backward()
    pipe.consolidate()
    assert math.isnan(pipe.metrics()["reg/l2_outputs/l2"])


def test_a_missing_output_is_an_error_naming_instance_option_and_present_outputs(model):
    class NeedsGates(steadytrain.Plugin):
        name = "needs_gates"

        @hookimpl
        def compute_regularizers(self, ctx):
            return {"g": ctx.output("gates", option="key").mean()}

    pipe = Pipeline([NeedsGates(id="gate_reg")]).setup(model, None)
    pipe.before_step()
    with pytest.raises(steadytrain.ConfigError, match=r"gate_reg\.key: no output 'gates' in this "
                       r"step; the outputs are: logits, pred\. Report it"):
        pipe.compute_loss(torch.zeros(()), outputs={"pred": torch.ones(()),
                                                    "logits": torch.ones(())})


def test_check_state_names_the_instance_and_the_keys():
    plugin = L2Outputs(id="mine")
    plugin.check_state({"a": 1, "b": 2}, ("b", "a"))
    with pytest.raises(steadytrain.CheckpointError, match=r"'mine' \(l2_outputs\).*\['a'\], "
                       r"expected \['a', 'b'\]"):
        plugin.check_state({"a": 1}, ("a", "b"))


def test_metrics_of_a_step_reach_the_store_after_the_backward(model):
    pipe = Pipeline([L2Outputs()]).setup(model, None)
    pipe.before_step(micro_batch=0, num_micro_batches=2)
    pred = model(data()[0])
    pipe.compute_loss(pred.sum(), outputs={"pred": pred}).backward()
    assert pipe.run.metrics.names() == []
    pipe.before_step(micro_batch=1, num_micro_batches=2)
    assert "loss/task" in pipe.run.metrics
    pred = model(data()[0])
    pipe.compute_loss(pred.sum(), outputs={"pred": pred}).backward()
    pipe.after_backward()
    pipe.consolidate()
    assert pipe.metrics()["loss/task"] == pytest.approx(pred.sum().item())
    ctx = pipe.before_step()
    with pytest.raises(steadytrain.UsageError, match=r"metric 'bad' must be a scalar"):
        ctx.log("bad", torch.ones(2))


def test_the_pipeline_says_which_instances_add_terms_and_which_rescale_gradients(model):
    from steadytrain.plugins.grad_clip import GradClip
    from steadytrain.plugins.label_smoothing import LabelSmoothing

    pipe = Pipeline([LabelSmoothing(id="ls"), GradClip(id="clip"), L2Outputs()])
    assert pipe.term_plugins == ("ls", "l2_outputs")
    assert pipe.gradient_rescalers == ("clip",)
    pipe.setup(model, None)
    assert not pipe.in_step
    pipe.before_step()
    assert pipe.in_step
