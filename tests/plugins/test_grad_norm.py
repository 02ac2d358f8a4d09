import math

import pytest
import torch

import steadytrain
from steadytrain.plugins.grad_norm import GradNorm, grad_norm


def model_with_grads() -> torch.nn.Module:
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Linear(6, 2))
    net(torch.randn(5, 4)).pow(2).sum().backward()
    return net


@pytest.mark.parametrize("norm_type", [1.0, 2.0, 3.5, math.inf])
def test_grad_norm_equals_the_norm_clip_grad_norm_reports(norm_type):
    net = model_with_grads()
    expected = torch.nn.utils.clip_grad_norm_(net.parameters(), math.inf, norm_type=norm_type)
    torch.testing.assert_close(grad_norm(net.parameters(), norm_type), expected)


def test_parameters_without_gradients_are_left_out():
    net = model_with_grads()
    net[1].bias.grad = None
    with_grad = [p for p in net.parameters() if p.grad is not None]
    torch.testing.assert_close(grad_norm(net.parameters()), grad_norm(with_grad))
    assert grad_norm([torch.nn.Parameter(torch.ones(2))]).item() == 0.0


def test_plugin_records_the_norm_of_the_selected_parameters():
    net = model_with_grads()
    pipe = steadytrain.Pipeline.from_config(
        {"plugins": [{"plugin": "grad_norm", "include": ["1.*"], "norm_type": 1.0}]}
    ).setup(net, None)
    pipe.before_step()
    pipe.compute_loss(torch.zeros(()))
    pipe.after_backward()
    pipe.consolidate()
    expected = grad_norm(net[1].parameters(), 1.0).item()
    assert pipe.metrics()["grad_norm/norm"] == pytest.approx(expected)


def test_a_pattern_matching_no_parameter_is_an_error():
    net = model_with_grads()
    pipe = steadytrain.Pipeline([GradNorm(include=["encoder.*"])])
    with pytest.raises(steadytrain.FilterError, match=r"grad_norm\.include: pattern 'encoder"):
        pipe.setup(net, None)


def test_norm_type_must_be_positive_and_may_be_inf():
    config = steadytrain.load_config({"plugins": [{"plugin": "grad_norm", "norm_type": math.inf}]})
    assert config.plugins[0].options.norm_type == math.inf
    with pytest.raises(steadytrain.ConfigError, match=r"plugins\[0\]\.norm_type: must be a "
                       r"number > 0 \(or inf for the max-abs norm\), got 0"):
        steadytrain.load_config({"plugins": [{"plugin": "grad_norm", "norm_type": 0}]})
