"""Behaviour shared by the plugins that read reported or tapped tensors.

Each test runs over every such plugin (gate smoothness, gate entropy, sparsity target),
with a valid input and the plain function that gives its expected term.
"""

import math
import tomllib

import pytest
import torch
import torch.nn.functional as F
from helpers import round_trip

import steadytrain
from steadytrain.plugins.gate_entropy import GateEntropy, gate_entropy_penalty
from steadytrain.plugins.gate_smoothness import GateSmoothness, gate_smoothness
from steadytrain.plugins.sparsity_target import SparsityTarget, sparsity_penalty

# gate_entropy's default target (the source's 2.0) is above ln 3; that warning is tested
# in test_gate_entropy.py
pytestmark = pytest.mark.filterwarnings("ignore:.*above the largest entropy")


def gates(*shape, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.softmax(torch.randn(*shape, generator=gen), dim=-1)


def mask(*shape, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.sigmoid(torch.randn(*shape, generator=gen))


CASES = {
    "gate_smoothness": (GateSmoothness, "gates", "smoothness", gates, gate_smoothness),
    "gate_entropy": (GateEntropy, "gates", "entropy_deficit", gates, gate_entropy_penalty),
    "sparsity_target": (SparsityTarget, "sparsity_mask", "sparsity", mask, sparsity_penalty),
}
# An input that fails each plugin's value check.
INVALID = {
    "gate_smoothness": lambda: torch.rand(2, 5, 3) + 0.5,
    "gate_entropy": lambda: torch.rand(2, 5, 3) + 0.5,
    "sparsity_target": lambda: torch.randn(2, 5, 3) * 3,
}


@pytest.fixture(params=sorted(CASES))
def case(request):
    return request.param, *CASES[request.param]


def pipeline_of(*plugins, model=None):
    return steadytrain.Pipeline(plugins).setup(model, total_steps=10)


def one_step(pipe, outputs=None):
    """One optimizer step; returns what compute_loss returned (the weighted terms)."""
    pipe.before_step()
    loss = pipe.compute_loss(None, outputs=outputs)
    pipe.after_backward()
    pipe.consolidate()
    return loss


class Router(torch.nn.Module):
    """A layer that returns its output together with its gate (or mask) tensor."""

    def __init__(self, make):
        super().__init__()
        self.make = make
        self.proj = torch.nn.Linear(3, 3)

    def forward(self, x):
        return self.proj(x), self.make(self.proj(x))


class Reporter(torch.nn.Module):
    """A layer that reports its gate (or mask) to the pipeline under *key*."""

    def __init__(self, key, make):
        super().__init__()
        self.id, self.make = key, make
        self.proj = torch.nn.Linear(3, 3)

    def forward(self, x):
        h = self.proj(x)
        steadytrain.report(self.id, self.make(h))
        return h


def activation(name):
    return (lambda h: torch.softmax(h, -1)) if name.startswith("gate") else torch.sigmoid


def test_reported_tensor_gives_the_plain_functions_term(case):
    _name, plugin, key, _term, make, function = case
    x = make(2, 6, 3)
    pipe = pipeline_of(plugin())
    assert torch.allclose(one_step(pipe, {key: x}), function(x))


def test_a_name_reported_several_times_is_stacked_as_time_steps(case):
    name, plugin, key, _term, _make, function = case
    model = torch.nn.Sequential(Reporter(key, activation(name)), Reporter(key, activation(name)))
    pipe = pipeline_of(plugin(), model=model)
    x = torch.randn(2, 5, 3)
    # outside a step, report() does nothing: these are the references
    first = model[0].make(model[0].proj(x))
    second = model[1].make(model[1].proj(model[0](x)))
    pipe.before_step()
    model(x)
    loss = pipe.compute_loss(None)
    assert torch.allclose(loss, function(torch.stack([first, second], dim=-2)))


def test_a_gate_called_once_per_time_step_is_smoothed_across_time():
    from steadytrain.nn import MemoryGate
    from steadytrain.plugins.gate_smoothness import GateSmoothness

    torch.manual_seed(0)
    gate = MemoryGate(4)
    for source in ("report", "tap"):
        config = (GateSmoothness.Config(taps=("gate",), tap_element=1) if source == "tap"
                  else GateSmoothness.Config())
        model = torch.nn.ModuleDict({"gate": gate})
        pipe = pipeline_of(GateSmoothness(config), model=model)
        pipe.before_step()
        states = torch.randn(8, 5, 3, 4)  # time, batch, (current, stm, ltm), features
        calls = [model["gate"](s[:, 0], s[:, 1], s[:, 2])[1] for s in states]
        loss = pipe.compute_loss(None)
        by_hand = sum(((calls[t + 1] - calls[t]) ** 2).mean() for t in range(7)) / 7
        assert torch.allclose(loss, by_hand), source
        pipe.close()


def test_calls_of_different_shapes_are_inputs_of_their_own():
    from steadytrain.plugins.gate_smoothness import GateSmoothness, gate_smoothness

    pipe = pipeline_of(GateSmoothness(id="mine"))
    pipe.before_step()
    gates = [torch.softmax(torch.randn(2, 5, 3), -1), torch.softmax(torch.randn(4, 3), -1)]
    loss = pipe.compute_loss(None, outputs={"gates": gates})
    assert torch.allclose(loss, (gate_smoothness(gates[0]) + gate_smoothness(gates[1])) / 2)


def test_tapped_tuple_outputs_are_read_at_tap_element(case):
    name, plugin, _key, _term, _make, function = case
    model = torch.nn.ModuleDict({"a": Router(activation(name)), "b": Router(activation(name))})
    pipe = pipeline_of(plugin(plugin.Config(taps=("a", "b"), tap_element=1)), model=model)
    pipe.before_step()
    x = torch.randn(2, 5, 3)
    outs = [model["a"](x), model["b"](x)]
    loss = pipe.compute_loss(None)
    assert torch.allclose(loss, (function(outs[0][1]) + function(outs[1][1])) / 2)


def test_include_and_exclude_narrow_the_tapped_modules(case):
    name, plugin, _key, _term, _make, function = case
    model = torch.nn.ModuleDict({f"r{i}": Router(activation(name)) for i in range(3)})
    instance = plugin(plugin.Config(taps=("r#",), tap_element=1), exclude=["r1"])
    pipe = pipeline_of(instance, model=model)
    pipe.before_step()
    x = torch.randn(2, 5, 3)
    outs = {n: m(x)[1] for n, m in model.items()}
    loss = pipe.compute_loss(None)
    assert torch.allclose(loss, (function(outs["r0"]) + function(outs["r2"])) / 2)


def test_excluding_every_tapped_module_is_an_error(case):
    name, plugin, *_ = case
    model = torch.nn.ModuleDict({f"r{i}": Router(activation(name)) for i in range(2)})
    instance = plugin(plugin.Config(taps=("r#",), tap_element=1), id="mine", exclude=["r*"])
    with pytest.raises(steadytrain.FilterError, match=r"mine: include .* select none of the"):
        pipeline_of(instance, model=model)


def test_tuple_output_without_tap_element_is_an_error(case):
    name, plugin, *_ = case
    model = torch.nn.ModuleDict({"a": Router(activation(name))})
    pipe = pipeline_of(plugin(plugin.Config(taps=("a",)), id="mine"), model=model)
    pipe.before_step()
    model["a"](torch.randn(2, 5, 3))
    message = r"mine\.tap_element: module 'a' returns a tuple"
    with pytest.raises(steadytrain.ConfigError, match=message):
        pipe.compute_loss(None)


def test_tap_element_out_of_range_or_on_a_tensor_is_an_error(case):
    name, plugin, *_ = case
    model = torch.nn.ModuleDict({"a": Router(activation(name)), "s": torch.nn.Softmax(-1)})
    pipe = pipeline_of(plugin(plugin.Config(taps=("a",), tap_element=2)), model=model)
    pipe.before_step()
    model["a"](torch.randn(2, 5, 3))
    with pytest.raises(steadytrain.ConfigError, match=r"tap_element: 2 is out of range"):
        pipe.compute_loss(None)
    pipe = pipeline_of(plugin(plugin.Config(taps=("s",), tap_element=0)), model=model)
    pipe.before_step()
    model["s"](torch.randn(2, 5, 3))
    with pytest.raises(steadytrain.ConfigError, match=r"returns a single Tensor, not a tuple"):
        pipe.compute_loss(None)


def test_tapped_module_that_did_not_run_is_an_error(case):
    name, plugin, *_ = case
    model = torch.nn.ModuleDict({"a": Router(activation(name))})
    pipe = pipeline_of(plugin(plugin.Config(taps=("a",), tap_element=1), id="mine"), model=model)
    pipe.before_step()
    with pytest.raises(steadytrain.ConfigError, match=r"mine\.taps: module 'a' did not run"):
        pipe.compute_loss(None)


def test_tap_pattern_matching_no_module_is_an_error_naming_the_instance(case):
    name, plugin, *_ = case
    model = torch.nn.ModuleDict({"router": Router(activation(name))})
    instance = plugin(plugin.Config(taps=("ruoter",)), id="mine")
    with pytest.raises(steadytrain.FilterError, match=r"mine\.taps.*'ruoter'.*'router'"):
        pipeline_of(instance, model=model)


def test_include_without_taps_is_an_error(case):
    _name, plugin, key, *_ = case
    with pytest.raises(steadytrain.ConfigError, match=rf"mine\.include: .*outputs\['{key}'\]"):
        pipeline_of(plugin(id="mine", include=["layer.*"]))


def test_missing_output_is_an_error_listing_the_outputs(case):
    _name, plugin, key, _term, make, _function = case
    pipe = pipeline_of(plugin(id="mine"))
    pipe.before_step()
    with pytest.raises(
        steadytrain.ConfigError, match=rf"mine\.key: no output '{key}'.*outputs are: hidden, logits"
    ):
        pipe.compute_loss(None, outputs={"logits": torch.zeros(2), "hidden": make(2, 3)})


def test_an_output_that_is_not_a_tensor_is_an_error(case):
    _name, plugin, key, *_ = case
    pipe = pipeline_of(plugin(id="mine"))
    pipe.before_step()
    with pytest.raises(steadytrain.ConfigError, match=rf"mine\.key: outputs\['{key}'\] is a str"):
        pipe.compute_loss(None, outputs={key: "not a tensor"})


def test_invalid_values_are_an_error_naming_the_instance(case):
    name, plugin, key, *_ = case
    pipe = pipeline_of(plugin(id="mine"))
    pipe.before_step()
    with pytest.raises(steadytrain.ConfigError, match=rf"mine: outputs\['{key}'\] is not a valid"):
        pipe.compute_loss(None, outputs={key: INVALID[name]()})


def test_nan_values_fail_the_check(case):
    _name, plugin, key, _term, make, _function = case
    x = make(2, 5, 3)
    x[0, 0, 0] = math.nan
    pipe = pipeline_of(plugin(id="mine"))
    pipe.before_step()
    with pytest.raises(steadytrain.ConfigError, match=r"is not a valid"):
        pipe.compute_loss(None, outputs={key: x})


@pytest.mark.parametrize(
    ("check", "errors_at_second_step"),
    [("auto", True), ("every_step", True), ("first_step", False), ("never", False)],
)
def test_check_policy_decides_which_steps_are_checked(case, check, errors_at_second_step):
    name, plugin, key, _term, make, function = case
    pipe = pipeline_of(plugin(plugin.Config(check=check)))
    one_step(pipe, {key: make(2, 5, 3)})
    bad = INVALID[name]()
    if errors_at_second_step:
        with pytest.raises(steadytrain.ConfigError, match="is not a valid"):
            one_step(pipe, {key: bad})
    else:
        assert torch.allclose(one_step(pipe, {key: bad}), function(bad))


def test_first_step_check_catches_a_bad_first_step(case):
    name, plugin, key, *_ = case
    pipe = pipeline_of(plugin(plugin.Config(check="first_step")))
    with pytest.raises(steadytrain.ConfigError, match="is not a valid"):
        one_step(pipe, {key: INVALID[name]()})


def test_term_gradient_reaches_the_tensor_that_produced_the_input(case):
    name, _plugin, key, _term, _make, function = case
    logits = torch.randn(2, 5, 3, requires_grad=True)
    pipe = pipeline_of(CASES[name][0](weight=0.5))
    loss = one_step(pipe, {key: activation(name)(logits)})
    (grad,) = torch.autograd.grad(loss, logits)
    reference = logits.detach().requires_grad_()
    (expected,) = torch.autograd.grad(0.5 * function(activation(name)(reference)), reference)
    assert torch.allclose(grad, expected)


def test_config_from_toml_and_stateless_checkpoint_round_trip(case, tmp_path):
    name, plugin, _key, _term, make, function = case
    path = tmp_path / "run.toml"
    path.write_text(
        f'[[plugins]]\nplugin = "{name}"\nid = "mine"\nweight = 0.1\nkey = "k"\n'
        'check = "every_step"\n'
    )
    pipe = steadytrain.Pipeline.from_config(path).setup(total_steps=10)
    instance = pipe.plugins["mine"]
    assert isinstance(instance, plugin)
    assert instance.config == plugin.Config(key="k", check="every_step")
    x = make(2, 5, 3)
    assert torch.allclose(one_step(pipe, {"k": x}), 0.1 * function(x))
    buffer = round_trip(pipe.state_dict())
    fresh = steadytrain.Pipeline.from_config(path)
    fresh.load_state_dict(buffer)
    fresh.setup(total_steps=10)
    assert fresh.run.step == 1
    assert torch.equal(one_step(fresh, {"k": x}), one_step(pipe, {"k": x}))


@pytest.mark.parametrize(
    ("option", "value", "message"),
    [
        ("check", "sometimes", "must be one of 'auto', 'every_step', 'first_step', 'never'"),
        ("tap_element", -1, "must be an integer >= 0, got -1"),
        ("taps", 3, "expected a list of strings, got 3"),
        ("kye", "gates", "unknown key 'kye' (did you mean 'key'?)"),
    ],
)
def test_bad_source_options_are_config_errors_with_their_path(case, option, value, message):
    name, *_ = case
    with pytest.raises(steadytrain.ConfigError) as info:
        steadytrain.load_config({"plugins": [{"plugin": name, option: value}]})
    assert str(info.value).startswith(f"plugins[0]{'' if option == 'kye' else '.' + option}: ")
    assert message in str(info.value)


class MemoryModel(torch.nn.Module):
    """The document's building blocks: a 3-way memory gate, then soft top-k sparsity.

    The gate reports its gates as "gates"; the mask reaches the plugin through a tap.
    """

    def __init__(self, dim=8, vocab=11):
        super().__init__()
        self.gate = steadytrain.nn.MemoryGate(dim)
        self.topk = steadytrain.nn.SoftTopK(dim, report_as=None)
        self.head = torch.nn.Linear(dim, vocab)

    def forward(self, current, stm, ltm):
        mixed, gates = self.gate(current, stm, ltm)
        sparse, mask = self.topk(mixed)
        self.seen = gates, mask
        return self.head(sparse)


def test_the_documents_loss_assembled_from_a_config():
    torch.manual_seed(0)
    model = MemoryModel()
    config = tomllib.loads('''
        [[plugins]]
        plugin = "gate_smoothness"
        weight = 0.1
        [[plugins]]
        plugin = "gate_entropy"
        weight = 0.05
        target = 1.0
        [[plugins]]
        plugin = "sparsity_target"
        weight = 0.1
        taps = ["topk"]
        tap_element = 1
        [[plugins]]
        plugin = "label_smoothing"
    ''')
    pipe = steadytrain.Pipeline.from_config(config)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    pipe.setup(model, optimizer, total_steps=3)
    current, stm, ltm = torch.randn(3, 2, 6, 8).unbind(0)
    targets = torch.randint(0, 11, (2, 6))
    pipe.before_step(targets=targets)
    logits = model(current, stm, ltm)
    task = F.cross_entropy(logits.movedim(-1, 1), targets)
    loss = pipe.compute_loss(task, outputs={"logits": logits})
    gates, mask = model.seen
    assert pipe.run.taps["topk"][0][1] is mask
    entropy = -(gates * gates.log()).sum(-1).mean()
    expected = (
        F.cross_entropy(logits.movedim(-1, 1), targets, label_smoothing=0.1)
        + 0.1 * (gates[:, 1:] - gates[:, :-1]).pow(2).mean()
        + 0.05 * (1.0 - entropy)
        + 0.1 * (mask.mean() - 0.15) ** 2
    )
    torch.testing.assert_close(loss, expected)
    loss.backward()
    assert model.gate.gate_bias.grad.abs().sum() > 0
    optimizer.step()
    pipe.after_backward()
    pipe.consolidate()


@pytest.mark.parametrize(("policy", "device", "checked", "due"), [
    ("every_step", "cpu", True, True), ("never", "cpu", False, False),
    ("first_step", "cpu", False, True), ("first_step", "cpu", True, False),
    ("auto", "cpu", True, True), ("auto", "meta", False, True), ("auto", "meta", True, False),
])
def test_check_due_follows_each_policy(policy, device, checked, due):
    from steadytrain.sources import check_due

    assert check_due(policy, torch.empty(1, device=device), checked=checked) is due
