import math
import tomllib

import pytest
import torch
from helpers import round_trip

import steadytrain
from steadytrain.plugins.z_loss import ZLoss, log_normalizer, z_loss


def hand_z_loss(rows: list[list[float]], coefficient: float) -> float:
    """coefficient · mean over rows of (log Σ_j exp x_j)², written out."""
    squares = [math.log(sum(math.exp(x) for x in row)) ** 2 for row in rows]
    return coefficient * sum(squares) / len(squares)


def step(pipe, logits, task=None):
    pipe.before_step()
    loss = pipe.compute_loss(task, outputs={"logits": logits})
    pipe.after_backward()
    pipe.consolidate()
    return loss


def test_matches_the_hand_written_formula():
    rows = [[0.5, -1.0, 2.0], [3.0, 3.0, 3.0], [-2.0, 0.0, 1.5], [10.0, -4.0, 0.25]]
    logits = torch.tensor(rows, dtype=torch.float64)
    assert z_loss(logits, 1e-4).item() == pytest.approx(hand_z_loss(rows, 1e-4), rel=1e-12)
    assert z_loss(logits.reshape(2, 2, 3), 0.3).item() == pytest.approx(
        hand_z_loss(rows, 0.3), rel=1e-12)


def test_gradient_is_two_coefficient_log_z_softmax():
    torch.manual_seed(0)
    logits = torch.randn(5, 4, 11, dtype=torch.float64, requires_grad=True)
    z_loss(logits, 0.01).backward()
    log_z = torch.logsumexp(logits.detach(), -1, keepdim=True)
    expected = 2 * 0.01 * log_z * torch.softmax(logits.detach(), -1) / (5 * 4)
    torch.testing.assert_close(logits.grad, expected)


def test_zero_exactly_when_the_normalizer_is_one():
    logits = torch.log(torch.tensor([[0.2, 0.3, 0.5], [0.9, 0.05, 0.05]]))
    assert z_loss(logits).item() == pytest.approx(0.0, abs=1e-15)
    assert z_loss(logits + 2.0).item() == pytest.approx(1e-4 * 4.0, rel=1e-6)


def test_class_dim_picks_where_the_classes_are():
    torch.manual_seed(1)
    logits = torch.randn(2, 6, 5)
    torch.testing.assert_close(z_loss(logits.movedim(-1, 1), class_dim=1), z_loss(logits))
    with pytest.raises(steadytrain.OptionError, match=r"class_dim: 3 is out of range .* 6, 5"):
        log_normalizer(logits, 3)


def test_low_precision_logits_give_a_float32_term():
    torch.manual_seed(2)
    logits = (8 * torch.randn(4, 64)).to(torch.bfloat16)
    term = z_loss(logits)
    assert term.dtype == torch.float32
    torch.testing.assert_close(term, z_loss(logits.float()))


def test_plugin_adds_the_term_and_logs_the_mean_log_z():
    torch.manual_seed(3)
    logits = torch.randn(3, 7, 13, requires_grad=True)
    task = logits.sum() * 0.0 + 1.5
    pipe = steadytrain.Pipeline([ZLoss(ZLoss.Config(coefficient=0.02))]).setup()
    loss = step(pipe, logits, task)
    expected = 1.5 + 0.02 * torch.logsumexp(logits.detach(), -1).square().mean()
    torch.testing.assert_close(loss.detach(), expected)
    metrics = pipe.metrics()
    assert metrics["z_loss/log_z"] == pytest.approx(
        torch.logsumexp(logits.detach(), -1).mean().item(), rel=1e-6)
    assert metrics["reg/z_loss/z"] == pytest.approx(expected.item() - 1.5, rel=1e-5)


def test_registered_with_the_literature_default_and_configurable_from_toml():
    raw = tomllib.loads('[[plugins]]\nplugin = "z_loss"\n\n[[plugins]]\nplugin = "z_loss"\n'
                        'id = "z_strong"\ncoefficient = 1e-3\nlogits_key = "lm_logits"\n')
    pipe = steadytrain.Pipeline.from_config(raw)
    assert pipe.plugins["z_loss"].config == ZLoss.Config(coefficient=1e-4)
    assert pipe.plugins["z_strong"].config == ZLoss.Config(coefficient=1e-3,
                                                           logits_key="lm_logits")
    assert round_trip(pipe.state_dict())["instances"]["z_loss"]["state"] == {}


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"coefficient": 0.0}, "plugins[0].coefficient: must be a positive number"),
        ({"coefficient": "big"}, "plugins[0].coefficient: expected a number"),
        ({"logits_key": ""}, "plugins[0].logits_key: "),
        ({"class_dim": 1.5}, "plugins[0].class_dim: expected an integer"),
    ],
)
def test_bad_options_are_config_errors(options, message):
    with pytest.raises(steadytrain.ConfigError) as info:
        steadytrain.load_config({"plugins": [{"plugin": "z_loss", **options}]})
    assert message in str(info.value)


def test_include_is_an_error():
    with pytest.raises(steadytrain.ConfigError, match=r"z_loss.include: z_loss has no variables"):
        ZLoss(include=["head.*"])


@pytest.mark.parametrize(
    ("config", "outputs", "message"),
    [
        (ZLoss.Config(), {"scores": torch.zeros(2, 3)},
         r"z_loss.logits_key: no output 'logits' .* scores"),
        (ZLoss.Config(), {"logits": [torch.zeros(2, 3)]},
         r"z_loss.logits_key: outputs\['logits'\] is a list"),
        (ZLoss.Config(class_dim=2), {"logits": torch.zeros(2, 3)},
         r"z_loss.class_dim: 2 is out of range for logits of shape \(2, 3\)"),
    ],
)
def test_missing_or_wrong_logits_are_errors_naming_the_option(config, outputs, message):
    pipe = steadytrain.Pipeline([ZLoss(config)]).setup()
    pipe.before_step()
    with pytest.raises(steadytrain.ConfigError, match=message):
        pipe.compute_loss(torch.tensor(1.0), outputs=outputs)
