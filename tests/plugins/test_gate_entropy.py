import math
import tomllib
import warnings

import pytest
import torch
from helpers import regularize

import steadytrain
from steadytrain.plugins.gate_entropy import GateEntropy, gate_entropy, gate_entropy_penalty


def gates(*shape, seed=0, scale=1.0):
    gen = torch.Generator().manual_seed(seed)
    return torch.softmax(scale * torch.randn(*shape, generator=gen), dim=-1)


def hand_entropy(g):
    """Per-token entropy summed over the gate entries, then the mean over tokens."""
    return -(g * torch.log(g)).sum(-1).mean()



@pytest.mark.parametrize("shape", [(7, 3), (2, 5, 3), (2, 3, 4, 8)])
def test_entropy_matches_torch_categorical(shape):
    g = gates(*shape)
    expected = torch.distributions.Categorical(probs=g).entropy().mean()
    assert torch.allclose(gate_entropy(g), expected)


def test_entropy_is_not_divided_by_the_gate_size():
    uniform = torch.full((4, 3), 1 / 3)
    assert math.isclose(gate_entropy(uniform).item(), math.log(3), rel_tol=1e-6)


def test_zero_probabilities_contribute_zero_with_a_finite_gradient():
    logits = torch.tensor([[0.0, -200.0, 5.0], [1.0, 1.0, 1.0]], requires_grad=True)
    g = torch.softmax(logits, -1)
    assert g[0, 1] == 0
    entropy = gate_entropy(g)
    expected = torch.distributions.Categorical(probs=g.detach()).entropy().mean()
    assert torch.allclose(entropy, expected)
    (grad,) = torch.autograd.grad(entropy, logits)
    assert torch.isfinite(grad).all()


@pytest.mark.parametrize(
    ("form", "shape_of"),
    [
        ("linear", lambda d: d),
        ("hinge", lambda d: torch.clamp(d, min=0)),
        ("squared", lambda d: d**2),
    ],
)
@pytest.mark.parametrize("target", [0.2, 0.9])
def test_forms_follow_their_formula_for_a_reachable_target(form, shape_of, target):
    g = gates(4, 6, 3, scale=2.0)
    expected = shape_of(target - hand_entropy(g))
    assert torch.allclose(gate_entropy_penalty(g, target, form), expected)


def test_hinge_is_zero_once_the_target_is_reached():
    g = gates(4, 6, 3, scale=0.1)
    assert hand_entropy(g) > 0.5
    assert gate_entropy_penalty(g, 0.5, "hinge") == 0


def test_unreachable_target_is_clamped_to_ln_k():
    g = gates(4, 6, 3)
    for form in ("linear", "hinge"):
        assert torch.allclose(gate_entropy_penalty(g, 2.0, form), math.log(3) - hand_entropy(g))
    uniform = torch.full((5, 3), 1 / 3)
    assert gate_entropy_penalty(uniform, 2.0).abs() < 1e-6


def test_unknown_form_is_an_error():
    with pytest.raises(ValueError, match="form must be one of linear, hinge, squared"):
        gate_entropy_penalty(gates(2, 3), 1.0, "cubic")


def test_plugin_warns_once_per_gate_size_when_the_target_is_unreachable():
    pipe = steadytrain.Pipeline([GateEntropy(id="router")]).setup()
    with pytest.warns(UserWarning, match=r"router\.target: 2 is above .* ln 3 = 1\.0986"):
        regularize(pipe, {"gates": gates(2, 4, 3)})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        regularize(pipe, {"gates": gates(2, 4, 3, seed=1)})
    with pytest.warns(UserWarning, match=r"ln 5 = 1\.6094"):
        regularize(pipe, {"gates": gates(2, 4, 5)})


def test_plugin_does_not_warn_for_a_reachable_target():
    pipe = steadytrain.Pipeline([GateEntropy(GateEntropy.Config(target=1.0))]).setup()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        regularize(pipe, {"gates": gates(2, 4, 3)})


def test_gradient_wrt_gate_logits_matches_the_hand_formula():
    """The source's weight 0.05 and target 2.0, on a 3-way gate: 0.05·(ln 3 − H)."""
    logits = torch.randn(2, 6, 3, requires_grad=True)
    pipe = steadytrain.Pipeline([GateEntropy(weight=0.05)]).setup()
    with pytest.warns(UserWarning, match="above the largest entropy"):
        loss = regularize(pipe, {"gates": torch.softmax(logits, -1)})
    (grad,) = torch.autograd.grad(loss, logits)
    reference = logits.detach().requires_grad_()
    hand = 0.05 * (math.log(3) - hand_entropy(torch.softmax(reference, -1)))
    (expected,) = torch.autograd.grad(hand, reference)
    assert torch.allclose(loss, hand)
    assert torch.allclose(grad, expected)


def test_entropy_metric_is_the_mean_gate_entropy():
    pipe = steadytrain.Pipeline([GateEntropy(GateEntropy.Config(target=0.5), id="g")]).setup()
    first, second = gates(2, 4, 3), gates(3, 3, seed=1)
    pipe.before_step()
    pipe.compute_loss(None, outputs={"gates": [first, second]})
    pipe.after_backward()
    pipe.consolidate()
    metrics = pipe.metrics()
    expected = (hand_entropy(first) + hand_entropy(second)) / 2
    assert math.isclose(metrics["g/entropy"], expected.item(), rel_tol=1e-6)
    assert math.isclose(metrics["reg/g/entropy_deficit"], 0.5 - expected.item(), rel_tol=1e-5)


def test_gates_that_do_not_sum_to_one_name_the_instance_and_atol():
    pipe = steadytrain.Pipeline([GateEntropy(id="router")]).setup()
    pipe.before_step()
    with pytest.raises(
        steadytrain.ConfigError,
        match=r"router: outputs\['gates'\] is not a valid gate: .*sums to 1 ± 0\.5.*atol = 0\.001",
    ):
        pipe.compute_loss(None, outputs={"gates": torch.full((4, 3), 0.5)})


def test_atol_admits_low_precision_gates():
    g = gates(2, 8, 3).bfloat16()
    g[0, 0] += 0.004
    strict = steadytrain.Pipeline([GateEntropy(GateEntropy.Config(target=1.0))]).setup()
    with pytest.raises(steadytrain.ConfigError, match=r"atol = 0\.001"):
        regularize(strict, {"gates": g})
    pipe = steadytrain.Pipeline([GateEntropy(GateEntropy.Config(atol=1e-2, target=1.0))]).setup()
    assert torch.allclose(regularize(pipe, {"gates": g}), 1.0 - hand_entropy(g.float()))


def test_negative_gate_entries_are_an_error():
    pipe = steadytrain.Pipeline([GateEntropy(id="router")]).setup()
    pipe.before_step()
    bad = torch.tensor([[1.5, -0.5, 0.0]])
    with pytest.raises(steadytrain.ConfigError, match=r"router: .*negative entry \(-0\.5\)"):
        pipe.compute_loss(None, outputs={"gates": bad})


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"target": -1.0}, r"plugins\[0\]\.target: must be a number >= 0, got -1\.0"),
        ({"form": "quadratic"}, r"plugins\[0\]\.form: must be one of 'linear', 'hinge'"),
        ({"atol": 0}, r"plugins\[0\]\.atol: must be a positive number, got 0"),
    ],
)
def test_bad_options_are_config_errors(options, message):
    with pytest.raises(steadytrain.ConfigError, match=message):
        steadytrain.load_config({"plugins": [{"plugin": "gate_entropy", **options}]})


def test_toml_options_reach_the_plugin():
    config = tomllib.loads(
        '[[plugins]]\nplugin = "gate_entropy"\nweight = 0.05\ntarget = 0.8\nform = "hinge"\n'
    )
    pipe = steadytrain.Pipeline.from_config(config).setup()
    g = gates(2, 5, 3, scale=3.0)
    expected = 0.05 * torch.clamp(0.8 - hand_entropy(g), min=0)
    assert torch.allclose(regularize(pipe, {"gates": g}), expected)
