"""The gradient norms the plugins of a step share: ``ctx.gradient_norms`` and friends."""

import math
import re
from pathlib import Path

import pytest
import torch

import steadytrain
from steadytrain import Pipeline, hookimpl
from steadytrain.grad_norms import tensor_norms, total_norm
from steadytrain.plugins.grad_clip import GradClip
from steadytrain.trace import TRACE_ENV

DOCS = Path(__file__).resolve().parents[1] / "docs"
GUIDE = DOCS / "plugin-authors.md"
USER_GUIDE = DOCS / "user-guide.md"
NORM_TYPES = [1.0, 2.0, 3.5, math.inf]


class FunctionCalls(torch.overrides.TorchFunctionMode):
    """Counts the calls of one torch function made while the mode is active."""

    def __init__(self, function) -> None:
        super().__init__()
        self.function, self.count = function, 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.count += func is self.function
        return func(*args, **(kwargs or {}))


class Probe(steadytrain.Plugin):
    """Records, in after_backward, the shared norms of every parameter's gradient."""

    name = "probe"
    uses_filter = False

    @hookimpl
    def setup(self, run):
        self.params = [p for _, p in run.named_parameters()]
        self.seen = []

    @hookimpl
    def after_backward(self, ctx):
        self.seen.append((ctx.gradient_norms(self.params), ctx.gradient_norm(self.params)))


class Doubler(steadytrain.Plugin):
    """Doubles every gradient in after_backward and says so, without rescales_gradients."""

    name = "doubler"
    uses_filter = False

    @hookimpl
    def setup(self, run):
        self.params = [p for _, p in run.named_parameters()]

    @hookimpl
    def after_backward(self, ctx):
        ctx.gradient_norms(self.params)
        torch._foreach_mul_([p.grad for p in self.params], 2.0)
        ctx.gradients_changed()


def net() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))


def backward(model: torch.nn.Module, pipe: Pipeline) -> list[torch.Tensor]:
    """Open a step and back-propagate a loss; the gradients as they are before the hooks."""
    pipe.before_step()
    x = torch.randn(16, 4, generator=torch.Generator().manual_seed(1))
    pipe.compute_loss(model(x).pow(2).sum() * 10).backward()
    return [p.grad.clone() for p in model.parameters()]


def norms_of(grads, norm_type=2.0) -> list[torch.Tensor]:
    return [torch.linalg.vector_norm(g.float(), norm_type) for g in grads]


# -- the plain functions ---------------------------------------------------------------


@pytest.mark.parametrize("norm_type", NORM_TYPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_tensor_norms_are_each_tensors_norm_in_float32(norm_type, dtype):
    torch.manual_seed(0)
    tensors = [torch.randn(3, 5, dtype=dtype), torch.randn(7, dtype=torch.float32),
               torch.randn(2, 2, 2, dtype=dtype)]
    norms = tensor_norms(tensors, norm_type)
    assert [n.dtype for n in norms] == [torch.float32] * 3
    for got, want in zip(norms, norms_of(tensors, norm_type), strict=True):
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("norm_type", NORM_TYPES)
def test_total_norm_of_tensor_norms_is_torchs_total_norm(norm_type):
    torch.manual_seed(0)
    tensors = [torch.randn(3, 5), torch.randn(7), torch.randn(1)]
    expected = torch.nn.utils.get_total_norm(tensors, norm_type)
    torch.testing.assert_close(total_norm(tensor_norms(tensors, norm_type), norm_type), expected)


def test_the_total_norm_of_no_tensors_is_zero():
    zero = total_norm([], device="cpu")
    assert zero.item() == 0.0 and zero.shape == ()
    assert tensor_norms([]) == []


@pytest.mark.parametrize("bad", [0, -1.0, math.nan, "2", True])
def test_a_norm_type_that_is_not_a_positive_number_is_a_usage_error(bad):
    with pytest.raises(steadytrain.UsageError, match=r"norm_type must be a number > 0"):
        tensor_norms([torch.ones(2)], bad)


# -- sharing within a step -------------------------------------------------------------


def test_the_plugins_of_a_step_share_one_pass_until_a_plugin_rescales_gradients():
    model = net()
    config = {"plugins": [
        {"plugin": "stability_monitor"},
        {"plugin": "guard", "spike_factor": 0},
        {"plugin": "grad_clip", "max_norm": 0.1,
         "groups": [{"name": "first", "include": ["0.*"], "max_norm": 0.05}]},
        {"plugin": "grad_norm"},
    ]}
    pipe = Pipeline.from_config(config).setup(model, None)
    raw = backward(model, pipe)
    with FunctionCalls(torch._foreach_norm) as calls:
        pipe.after_backward()
    pipe.consolidate()
    # One pass for the monitor, the guard and the clipping; one after the clipping.
    assert calls.count == 2
    metrics = pipe.metrics()
    raw_total = torch.nn.utils.get_total_norm(raw).item()
    clipped = [p.grad for p in model.parameters()]
    assert metrics["stability_monitor/grad_norm"] == pytest.approx(raw_total, rel=1e-6)
    assert metrics["grad_clip/first/pre_norm"] == pytest.approx(
        torch.nn.utils.get_total_norm(raw[:2]).item(), rel=1e-6)
    assert metrics["grad_norm/norm"] == pytest.approx(
        torch.nn.utils.get_total_norm(clipped).item(), rel=1e-6)
    assert metrics["grad_norm/norm"] < raw_total


def test_a_plugin_after_a_clipper_sees_the_clipped_gradients_and_one_before_it_the_raw():
    model = net()
    before, after = Probe(id="before"), Probe(id="after")
    clip = GradClip(id="clip")
    pipe = Pipeline([before, clip, after]).setup(model, None)
    raw = backward(model, pipe)
    pipe.after_backward()
    pipe.consolidate()
    clipped = [p.grad for p in model.parameters()]
    (raw_norms, raw_total), = before.seen
    (clipped_norms, clipped_total), = after.seen
    for got, want in zip(raw_norms + clipped_norms, norms_of(raw) + norms_of(clipped),
                         strict=True):
        torch.testing.assert_close(got, want)
    torch.testing.assert_close(raw_total, torch.nn.utils.get_total_norm(raw))
    torch.testing.assert_close(clipped_total, torch.nn.utils.get_total_norm(clipped))
    assert clipped_total.item() == pytest.approx(1.0, rel=1e-4)
    assert raw_total.item() > 2.0


def test_a_plugin_that_changes_gradients_and_says_so_is_followed_by_fresh_norms():
    model = net()
    probe = Probe()
    pipe = Pipeline([Doubler(), probe]).setup(model, None)
    raw = backward(model, pipe)
    with FunctionCalls(torch._foreach_norm) as calls:
        pipe.after_backward()
    pipe.consolidate()
    assert calls.count == 2
    (norms, total), = probe.seen
    doubled = [2 * g for g in raw]
    for got, want in zip(norms, norms_of(doubled), strict=True):
        torch.testing.assert_close(got, want)
    torch.testing.assert_close(total, torch.nn.utils.get_total_norm(doubled))


class Halver(steadytrain.Plugin):
    """A rescaler whose hook takes no argument: halves every gradient of the model."""

    name = "halver"
    uses_filter = False
    rescales_gradients = True

    @hookimpl
    def setup(self, run):
        self.params = [p for _, p in run.named_parameters()]

    @hookimpl
    def after_backward(self):
        torch._foreach_mul_([p.grad for p in self.params], 0.5)


@pytest.mark.parametrize("tracing", [False, True])
def test_the_norms_are_taken_afresh_after_a_rescaler_also_when_hooks_are_traced(
        monkeypatch, tracing):
    if tracing:
        monkeypatch.setenv(TRACE_ENV, "1")
    else:
        monkeypatch.delenv(TRACE_ENV, raising=False)
    model = net()
    before, after = Probe(id="before"), Probe(id="after")
    pipe = Pipeline([before, Halver(), after]).setup(model, None)
    raw = backward(model, pipe)
    pipe.after_backward()
    pipe.consolidate()
    ((_, raw_total),), ((_, halved_total),) = before.seen, after.seen
    torch.testing.assert_close(raw_total, torch.nn.utils.get_total_norm(raw))
    torch.testing.assert_close(halved_total, torch.nn.utils.get_total_norm(raw) / 2)


def test_parameters_without_a_gradient_are_left_out_in_order():
    model = net()
    probe = Probe()
    pipe = Pipeline([probe]).setup(model, None)
    raw = backward(model, pipe)
    model[0].bias.grad = None
    pipe.after_backward()
    pipe.consolidate()
    (norms, total), = probe.seen
    kept = [raw[0], *raw[2:]]
    for got, want in zip(norms, norms_of(kept), strict=True):
        torch.testing.assert_close(got, want)
    assert len(norms) == 3
    torch.testing.assert_close(total, torch.nn.utils.get_total_norm(kept))


class Owned(steadytrain.Plugin):
    """Asks for the norm of a parameter it owns (outside the model) and of one without a
    gradient."""

    name = "owned"
    uses_filter = False

    @hookimpl
    def setup(self, run):
        self.scale = torch.nn.Parameter(torch.tensor([3.0, 4.0]))
        self.unused = torch.nn.Parameter(torch.ones(2))

    def parameters(self):
        return [self.scale, self.unused]

    @hookimpl
    def compute_regularizers(self, ctx):
        return {"scale": self.scale.pow(2).sum() / 2}

    @hookimpl
    def after_backward(self, ctx):
        self.norms = ctx.gradient_norms([self.scale, self.unused])
        self.nothing = ctx.gradient_norm([self.unused])


def test_parameters_outside_the_model_are_computed_when_asked_for():
    model = net()
    owned = Owned()
    pipe = Pipeline([owned]).setup(model, None)
    backward(model, pipe)
    pipe.after_backward()
    pipe.consolidate()
    (norm,) = owned.norms
    torch.testing.assert_close(norm, torch.tensor(5.0))  # the gradient is the parameter
    assert owned.nothing.item() == 0.0


class Misplaced(steadytrain.Plugin):
    name = "misplaced"
    uses_filter = False

    @hookimpl
    def consolidate(self, ctx):
        ctx.gradient_norm(ctx.model.parameters())


def test_gradient_norms_outside_after_backward_are_a_usage_error_naming_the_instance():
    model = net()
    pipe = Pipeline([Misplaced(id="late")]).setup(model, None)
    backward(model, pipe)
    pipe.after_backward()
    with pytest.raises(steadytrain.UsageError,
                       match=r"late: ctx\.gradient_norms\(\) and ctx\.gradient_norm\(\) are "
                             r"available in after_backward only"):
        pipe.consolidate()


class BadOrder(Probe):
    name = "bad_order"

    @hookimpl
    def after_backward(self, ctx):
        ctx.gradient_norm(self.params, norm_type=-2)


def test_a_bad_norm_type_in_a_hook_is_a_usage_error_naming_the_instance():
    model = net()
    pipe = Pipeline([BadOrder(id="odd")]).setup(model, None)
    backward(model, pipe)
    with pytest.raises(steadytrain.UsageError,
                       match=r"odd: ctx\.gradient_norms\(\): norm_type must be a number > 0"):
        pipe.after_backward()


# -- the plugin-author guide ------------------------------------------------------------


def guide_example() -> str:
    section = GUIDE.read_text().split("## Gradient norms", 1)[1].split("\n## ", 1)[0]
    (code,) = re.findall(r"```python\n(.*?)```", section, re.DOTALL)
    return code


def test_the_plugin_author_guides_gradient_norm_example_records_per_group_norms():
    namespace: dict = {}
    exec(compile(guide_example(), str(GUIDE), "exec"), namespace)
    model = net()
    plugin = namespace["LayerNorms"](include=["0.*"])
    clip = GradClip(id="clip")
    pipe = Pipeline([plugin, clip]).setup(model, None)
    raw = backward(model, pipe)
    with FunctionCalls(torch._foreach_norm) as calls:
        pipe.after_backward()
    pipe.consolidate()
    assert calls.count == 1  # the clipping shares the plugin's pass
    metrics = pipe.metrics()
    assert sorted(k for k in metrics if k.startswith("layer_norms/")) == [
        "layer_norms/0.bias", "layer_norms/0.weight"]
    assert metrics["layer_norms/0.weight"] == pytest.approx(norms_of(raw)[0].item(), rel=1e-6)
    assert metrics["layer_norms/0.bias"] == pytest.approx(norms_of(raw)[1].item(), rel=1e-6)


def test_the_user_guides_loop_example_prints_torchs_total_norm(capsys):
    section = USER_GUIDE.read_text().split("### Gradient norms, shared", 1)[1].split("\n#", 1)[0]
    (code,) = re.findall(r"```python\n(.*?)```", section, re.DOTALL)
    model = net()
    model(torch.randn(5, 4)).pow(2).sum().backward()
    exec(compile(code, str(USER_GUIDE), "exec"), {"model": model})
    expected = torch.nn.utils.get_total_norm([p.grad for p in model.parameters()])
    assert float(capsys.readouterr().out) == pytest.approx(expected.item(), rel=1e-6)
