import tomllib

import pytest
import torch
from helpers import regularize

import steadytrain
from steadytrain.plugins.gate_smoothness import GateSmoothness, gate_smoothness


def gates(*shape, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.softmax(torch.randn(*shape, generator=gen), dim=-1)


def hand_smoothness(g, time_dim):
    """Mean over all elements of the squared change between consecutive time steps."""
    g = g.movedim(time_dim, 0)
    total, count = 0.0, 0
    for t in range(g.shape[0] - 1):
        total = total + ((g[t + 1] - g[t]) ** 2).sum()
        count += g[t].numel()
    return total / count



@pytest.mark.parametrize(
    ("shape", "time_dim"),
    [((9, 3), 0), ((9, 3), -2), ((2, 9, 3), -2), ((2, 9, 3), 1), ((9, 2, 4), 0), ((2, 9, 4, 3), 1)],
)
def test_smoothness_matches_the_hand_formula(shape, time_dim):
    g = gates(*shape)
    assert torch.allclose(gate_smoothness(g, time_dim), hand_smoothness(g, time_dim))


def test_default_time_dim_compares_tokens_not_sequences_of_the_batch():
    # two sequences whose gates are constant in time but differ from each other
    g = torch.stack([torch.tensor([0.8, 0.1, 0.1]).expand(6, 3),
                     torch.tensor([0.1, 0.1, 0.8]).expand(6, 3)])
    assert gate_smoothness(g) == 0
    assert gate_smoothness(g, time_dim=0) > 0


def test_constant_gates_have_zero_penalty_and_a_jump_is_counted_once():
    g = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, 1.0]])
    # one jump of (−1, +1) among 3 transitions × 2 entries
    assert torch.allclose(gate_smoothness(g, 0), torch.tensor(2 / 6))


@pytest.mark.parametrize(
    ("shape", "time_dim", "message"),
    [
        ((3,), -2, r"need a time dimension and a gate dimension, got shape \(3,\)"),
        ((2, 5, 3), -1, r"time_dim -1 is the last dimension, which holds the gate values"),
        ((2, 5, 3), 2, r"time_dim 2 is the last dimension"),
        ((2, 5, 3), 3, r"time_dim 3 is out of range for gates of shape \(2, 5, 3\)"),
        ((2, 1, 3), -2, r"time_dim -2 has size 1 .*no transition to smooth"),
    ],
)
def test_wrong_shapes_are_errors(shape, time_dim, message):
    with pytest.raises(ValueError, match=message):
        gate_smoothness(gates(*shape), time_dim)


def test_plugin_shape_error_names_the_instance_the_input_and_the_option():
    pipe = steadytrain.Pipeline([GateSmoothness(GateSmoothness.Config(time_dim=2), id="mix")])
    pipe.setup()
    pipe.before_step()
    with pytest.raises(steadytrain.ConfigError, match=r"mix: outputs\['gates'\]: time_dim 2 is"):
        pipe.compute_loss(None, outputs={"gates": gates(2, 5, 3)})


def test_gradient_wrt_gate_logits_matches_the_hand_formula():
    """The source's weight 0.1 on (batch, seq, k) gates."""
    logits = torch.randn(3, 7, 3, requires_grad=True)
    pipe = steadytrain.Pipeline([GateSmoothness(weight=0.1)]).setup()
    loss = regularize(pipe, {"gates": torch.softmax(logits, -1)})
    (grad,) = torch.autograd.grad(loss, logits)
    reference = logits.detach().requires_grad_()
    hand = 0.1 * hand_smoothness(torch.softmax(reference, -1), 1)
    (expected,) = torch.autograd.grad(hand, reference)
    assert torch.allclose(loss, hand)
    assert torch.allclose(grad, expected)


def test_low_precision_gates_are_differenced_in_float32():
    g = gates(2, 50, 3).bfloat16()
    assert gate_smoothness(g).dtype == torch.float32
    assert torch.allclose(gate_smoothness(g), hand_smoothness(g.float(), 1))


def test_gates_that_do_not_sum_to_one_are_an_error():
    pipe = steadytrain.Pipeline([GateSmoothness(id="mix")]).setup()
    pipe.before_step()
    with pytest.raises(steadytrain.ConfigError, match=r"mix: outputs\['gates'\] is not a valid"):
        pipe.compute_loss(None, outputs={"gates": torch.sigmoid(torch.randn(2, 5, 3))})


def test_toml_options_reach_the_plugin():
    config = tomllib.loads(
        '[[plugins]]\nplugin = "gate_smoothness"\nweight = 0.1\ntime_dim = 0\nkey = "router"\n'
    )
    pipe = steadytrain.Pipeline.from_config(config).setup()
    g = gates(6, 2, 3)
    pipe.before_step()
    term = pipe.compute_loss(None, outputs={"router": g})
    assert torch.allclose(term, 0.1 * hand_smoothness(g, 0))


def test_bad_time_dim_type_is_a_config_error():
    message = r"plugins\[0\]\.time_dim: expected an integer"
    with pytest.raises(steadytrain.ConfigError, match=message):
        steadytrain.load_config({"plugins": [{"plugin": "gate_smoothness", "time_dim": "seq"}]})
