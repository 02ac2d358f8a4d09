import math
import tomllib

import pytest
import torch
from helpers import regularize

import steadytrain
from steadytrain.plugins.sparsity_target import SparsityTarget, sparsity_penalty


def test_penalty_is_the_squared_distance_of_the_density_to_the_target():
    mask = torch.zeros(4, 10)
    mask[:, :3] = 1.0  # density 0.3
    assert torch.allclose(sparsity_penalty(mask, 0.15), torch.tensor((0.3 - 0.15) ** 2))
    soft = torch.rand(3, 7, 11)
    expected = (soft.sum() / soft.numel() - 0.4) ** 2
    assert torch.allclose(sparsity_penalty(soft, 0.4), expected)


def test_boolean_masks_are_counted_in_float32():
    mask = torch.rand(5, 20) < 0.25
    expected = (mask.sum().item() / mask.numel() - 0.15) ** 2
    assert math.isclose(sparsity_penalty(mask).item(), expected, rel_tol=1e-6)
    pipe = steadytrain.Pipeline([SparsityTarget()]).setup()
    assert math.isclose(regularize(pipe, {"sparsity_mask": mask}).item(), expected, rel_tol=1e-6)


def test_gradient_wrt_mask_scores_matches_the_hand_formula():
    """The source's weight 0.1 and target 0.15 on a sigmoid mask."""
    scores = torch.randn(4, 6, 16, requires_grad=True)
    pipe = steadytrain.Pipeline([SparsityTarget(weight=0.1)]).setup()
    loss = regularize(pipe, {"sparsity_mask": torch.sigmoid(scores)})
    (grad,) = torch.autograd.grad(loss, scores)
    reference = scores.detach().requires_grad_()
    hand = 0.1 * (torch.sigmoid(reference).mean() - 0.15) ** 2
    (expected,) = torch.autograd.grad(hand, reference)
    assert torch.allclose(loss, hand)
    assert torch.allclose(grad, expected)


def test_density_metric_is_the_mean_of_the_masks():
    first, second = torch.rand(4, 8), torch.rand(2, 3)
    pipe = steadytrain.Pipeline([SparsityTarget(id="topk")]).setup()
    pipe.before_step()
    pipe.compute_loss(None, outputs={"sparsity_mask": [first, second]})
    pipe.after_backward()
    pipe.consolidate()
    metrics = pipe.metrics()
    assert math.isclose(metrics["topk/density"], ((first.mean() + second.mean()) / 2).item(),
                        rel_tol=1e-6)


@pytest.mark.parametrize(
    ("values", "span"),
    [([0.2, 1.5], r"\[0\.2, 1\.5\]"), ([-0.1, 0.5], r"\[-0\.1, 0\.5\]")],
)
def test_mask_outside_zero_one_is_an_error_naming_the_instance(values, span):
    pipe = steadytrain.Pipeline([SparsityTarget(id="topk")]).setup()
    pipe.before_step()
    with pytest.raises(
        steadytrain.ConfigError,
        match=rf"topk: outputs\['sparsity_mask'\] is not a valid mask: its values span {span}",
    ):
        pipe.compute_loss(None, outputs={"sparsity_mask": torch.tensor(values)})


def test_mask_at_the_bounds_is_valid():
    pipe = steadytrain.Pipeline([SparsityTarget()]).setup()
    loss = regularize(pipe, {"sparsity_mask": torch.tensor([0.0, 1.0])})
    assert torch.allclose(loss, torch.tensor(0.35**2))


def test_empty_mask_is_an_error():
    pipe = steadytrain.Pipeline([SparsityTarget(id="topk")]).setup()
    pipe.before_step()
    with pytest.raises(steadytrain.ConfigError, match=r"topk: .*is not a valid mask: it is empty"):
        pipe.compute_loss(None, outputs={"sparsity_mask": torch.zeros(0, 4)})


@pytest.mark.parametrize("target", [-0.1, 1.5])
def test_target_outside_zero_one_is_a_config_error(target):
    message = rf"plugins\[0\]\.target: must be in \[0\.0, 1\.0\], got {target}"
    with pytest.raises(steadytrain.ConfigError, match=message):
        steadytrain.load_config({"plugins": [{"plugin": "sparsity_target", "target": target}]})


def test_toml_options_reach_the_plugin():
    config = tomllib.loads(
        '[[plugins]]\nplugin = "sparsity_target"\nweight = 0.1\ntarget = 0.3\nkey = "mask"\n'
    )
    pipe = steadytrain.Pipeline.from_config(config).setup()
    mask = torch.rand(3, 9)
    pipe.before_step()
    term = pipe.compute_loss(None, outputs={"mask": mask})
    assert torch.allclose(term, 0.1 * (mask.mean() - 0.3) ** 2)
