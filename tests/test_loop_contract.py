"""The loop contract: the calls a host makes in every step, and every way of getting them wrong.

Each misuse would otherwise leave a technique off or run it twice without a word, so each
is a UsageError (or a TermError/ConfigError for a bad value) that says what to call.
"""

import math

import pytest
import torch
from expect import raises

import steadytrain
from steadytrain import ConfigError, Pipeline, TermError, UsageError, hookimpl


class Square(steadytrain.Plugin):
    """A regularizer: the mean square of the model's output."""

    name = "square"

    @hookimpl
    def compute_regularizers(self, ctx):
        return {"sq": ctx.outputs["pred"].pow(2).mean()}


class Calls(steadytrain.Plugin):
    """Counts the hooks that run; returns no term."""

    name = "calls"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.count = {}

    def _seen(self, hook):
        self.count[hook] = self.count.get(hook, 0) + 1

    @hookimpl
    def after_backward(self, ctx):
        self._seen("after_backward")

    @hookimpl
    def consolidate(self, ctx):
        self._seen("consolidate")

    @hookimpl
    def on_eval_start(self, run):
        self._seen("on_eval_start")


@pytest.fixture
def data():
    torch.manual_seed(1)
    return torch.randn(6, 4)


def forward(pipe, model, x):
    """compute_loss of one micro-batch: the task loss and the output the terms read."""
    pred = model(x)
    return pipe.compute_loss(pred.sum(), outputs={"pred": pred})


def open_step(model, *plugins, **before):
    pipe = Pipeline(list(plugins)).setup(model, None)
    pipe.before_step(**before)
    return pipe


# -- after_backward -----------------------------------------------------------------------


def test_after_backward_without_compute_loss_names_the_term_plugins(model, data):
    pipe = open_step(model, Square(id="reg_a"), Calls(), Square(id="reg_b"))
    model(data).sum().backward()  # the host's own backward of the task loss alone
    with raises(UsageError, "after_backward()", "compute_loss() ran for 0 of 1",
                "reg_a, reg_b", "loss = pipe.compute_loss(task_loss)"):
        pipe.after_backward()


def test_after_backward_without_compute_loss_is_allowed_when_no_instance_returns_terms(
    model, data
):
    calls = Calls()
    pipe = open_step(model, calls)
    model(data).sum().backward()
    assert not pipe.after_backward().skip
    assert calls.count == {"after_backward": 1}


def test_after_backward_when_one_micro_batch_skipped_compute_loss_names_the_term_plugins(
    model, data
):
    pipe = open_step(model, Square(id="reg"), micro_batch=0, num_micro_batches=2)
    forward(pipe, model, data[:3]).backward()
    pipe.before_step(micro_batch=1, num_micro_batches=2)
    model(data[3:]).sum().backward()
    with raises(UsageError, "compute_loss() ran for 1 of 2 micro-batch(es)", "reg",
                "pipe.compute_loss(task_loss)"):
        pipe.after_backward()


def test_after_backward_twice_in_one_step_is_refused_and_runs_the_hooks_once(model, data):
    calls = Calls()
    pipe = open_step(model, calls)
    pipe.after_backward()
    with raises(UsageError, "after_backward() twice in step 0", "consolidate()"):
        pipe.after_backward()
    assert calls.count == {"after_backward": 1}


# -- consolidate and compute_loss -------------------------------------------------------------


def test_consolidate_twice_is_refused_and_closes_the_step_once(model):
    calls = Calls()
    pipe = open_step(model, calls)
    pipe.after_backward()
    pipe.consolidate()
    with raises(UsageError, "consolidate() outside a step", "once per optimizer step"):
        pipe.consolidate()
    assert calls.count["consolidate"] == 1
    assert pipe.run.step == 1


def test_compute_loss_twice_in_one_micro_batch_is_refused(model, data):
    pipe = open_step(model, Square())
    forward(pipe, model, data)
    with raises(UsageError, "compute_loss() twice for micro_batch 0 of step 0",
                "once per micro-batch"):
        forward(pipe, model, data)


def test_compute_loss_after_after_backward_is_refused(model, data):
    pipe = open_step(model, Square(), micro_batch=0, num_micro_batches=1)
    forward(pipe, model, data)
    pipe.after_backward()
    with raises(UsageError, "compute_loss() twice"):
        forward(pipe, model, data)


# -- calls outside the pipeline's life ---------------------------------------------------------


def _evaluate(pipe):
    with pipe.evaluating():
        pass


STEP_CALLS = {
    "before_step": lambda pipe: pipe.before_step(),
    "compute_loss": lambda pipe: pipe.compute_loss(torch.zeros(())),
    "after_backward": lambda pipe: pipe.after_backward(),
    "consolidate": lambda pipe: pipe.consolidate(),
    "epoch_start": lambda pipe: pipe.epoch_start(),
    "epoch_end": lambda pipe: pipe.epoch_end(),
    "evaluating": _evaluate,
}


@pytest.mark.parametrize("method", STEP_CALLS)
def test_every_step_call_before_setup_is_refused(method):
    pipe = Pipeline([Square(), Calls()])
    with raises(UsageError, f"{method}() needs setup() first", "pipe.setup(model, optimizer)"):
        STEP_CALLS[method](pipe)


@pytest.mark.parametrize("method", STEP_CALLS)
def test_every_step_call_after_close_is_refused(model, method):
    pipe = Pipeline([Square(), Calls()]).setup(model, None)
    pipe.close()
    with raises(UsageError, f"{method}() on a closed pipeline"):
        STEP_CALLS[method](pipe)


def test_before_step_while_the_previous_step_waits_for_consolidate_is_refused(model, data):
    calls = Calls()
    pipe = open_step(model, Square(), calls)
    forward(pipe, model, data).backward()
    pipe.after_backward()
    with raises(UsageError, "before_step() while step 0 waits for consolidate()",
                "pipe.consolidate()"):
        pipe.before_step()
    pipe.consolidate()  # the step is still open and closes normally
    assert calls.count["consolidate"] == 1


# -- values the loop passes ------------------------------------------------------------------


@pytest.mark.parametrize("total_steps", [0, -1, True, 1.5])
def test_setup_refuses_total_steps_that_is_not_an_integer_of_at_least_one(model, total_steps):
    pipe = Pipeline([Calls()])
    with raises(ConfigError, "setup(total_steps=...)", "integer >= 1", repr(total_steps)):
        pipe.setup(model, None, total_steps=total_steps)
    assert not pipe.is_setup


@pytest.mark.parametrize("loss_scale", [-1.0, -0.5, 0, 0.0, math.nan, math.inf])
def test_before_step_refuses_a_loss_scale_that_is_not_a_finite_positive_number(
    model, loss_scale
):
    pipe = Pipeline([Square()]).setup(model, None)
    with raises(UsageError, "before_step(loss_scale=...)", "finite number > 0", repr(loss_scale)):
        pipe.before_step(loss_scale=loss_scale)


def test_a_non_scalar_task_loss_is_refused_by_compute_loss_before_any_backward(model, data):
    pipe = open_step(model, Square())
    pred = model(data)
    with raises(TermError, "compute_loss()", "must be a scalar", "shape (6, 2)", ".mean()"):
        pipe.compute_loss(pred.pow(2).mean(1, keepdim=True).expand(6, 2),
                          outputs={"pred": pred})
    assert all(p.grad is None for p in model.parameters())


def test_a_task_loss_that_is_not_a_tensor_is_refused_by_compute_loss(model, data):
    pipe = open_step(model, Square())
    pred = model(data)
    with raises(TermError, "compute_loss()", "must be a tensor", "float"):
        pipe.compute_loss(1.5, outputs={"pred": pred})


class Constant(steadytrain.Plugin):
    """A term cut off from the graph (a hard mask, a detached tensor)."""

    name = "constant"

    @hookimpl
    def compute_regularizers(self, ctx):
        return {"c": ctx.outputs["pred"].detach().abs().mean()}


def test_a_term_that_does_not_require_grad_while_the_task_loss_does_is_refused(model, data):
    pipe = open_step(model, Constant(id="flat"))
    with raises(TermError, "plugin instance 'flat'", "term 'c'", "does not require grad",
                "Compute it from tensors of the forward graph"):
        forward(pipe, model, data)


def test_a_constant_term_is_accepted_when_the_task_loss_needs_no_grad_either(model, data):
    pipe = open_step(model, Constant())
    with torch.no_grad():
        pred = model(data)
        loss = pipe.compute_loss(pred.sum(), outputs={"pred": pred})
    assert float(loss) == pytest.approx(float(pred.sum() + pred.abs().mean()), rel=1e-6)


# -- what the core records -----------------------------------------------------------------


class StepLoss(steadytrain.Plugin):
    """Keeps ``ctx.step_loss`` as after_backward sees it."""

    name = "step_loss"
    seen = None

    @hookimpl
    def after_backward(self, ctx):
        self.seen = ctx.step_loss


def test_step_loss_is_the_mean_of_the_micro_batch_task_losses_detached(model, data):
    probe = StepLoss()
    pipe = Pipeline([probe, Square()]).setup(model, None)
    losses = []
    for i, part in enumerate(data.split(2)):
        pipe.before_step(micro_batch=i, num_micro_batches=3)
        pred = model(part)
        task = pred.pow(2).sum() * (i + 1)  # three clearly different losses
        losses.append(task.detach())
        pipe.compute_loss(task, outputs={"pred": pred}).backward()
    pipe.after_backward()
    assert not probe.seen.requires_grad
    torch.testing.assert_close(probe.seen, (losses[0] + losses[1] + losses[2]) / 3)


def test_step_loss_is_none_when_the_host_passes_no_task_loss(model, data):
    probe = StepLoss()
    pipe = open_step(model, probe, Square())
    pred = model(data)
    pipe.compute_loss(None, outputs={"pred": pred}).backward()
    pipe.after_backward()
    assert probe.seen is None


# -- evaluation and checkpoints belong between steps -------------------------------------------


def test_evaluating_inside_a_step_is_refused_before_any_plugin_swaps_weights(model):
    calls = Calls()
    pipe = open_step(model, calls)
    with raises(UsageError, "evaluating() inside step 0", "after consolidate()"):
        _evaluate(pipe)
    assert "on_eval_start" not in calls.count


def test_state_dict_inside_a_step_is_refused(model):
    pipe = open_step(model, Calls())
    with raises(UsageError, "state_dict() inside step 0", "after consolidate()"):
        pipe.state_dict()


def test_load_state_dict_inside_a_step_is_refused(model):
    pipe = Pipeline([Calls()]).setup(model, None)
    state = pipe.state_dict()
    pipe.before_step()
    with raises(UsageError, "load_state_dict() inside step 0", "between steps"):
        pipe.load_state_dict(state)
