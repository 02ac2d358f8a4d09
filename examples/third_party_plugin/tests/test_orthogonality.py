"""The plugin passes steadytrain's conformance kit, and its term is the formula."""

from importlib import metadata

import pytest
import torch
from steadytrain_orthogonality import OrthogonalityPenalty, orthogonality_penalty

import steadytrain


def test_conformance(conformance_check):
    conformance_check(OrthogonalityPenalty)


def test_the_installed_entry_point_finds_the_plugin():
    entry = steadytrain.Registry.discover().entry("orthogonality")
    assert entry.distribution == "steadytrain-orthogonality"
    assert entry.version == metadata.version("steadytrain-orthogonality")
    assert entry.load() is OrthogonalityPenalty


@pytest.mark.parametrize("shape", [(3, 5), (5, 3), (4, 2, 3)])
def test_the_penalty_is_the_squared_distance_of_the_smaller_gram_from_the_identity(shape):
    torch.manual_seed(0)
    weight = torch.randn(shape, dtype=torch.float64)
    matrix = weight.reshape(shape[0], -1)
    k = min(matrix.shape)
    gram = matrix @ matrix.T if matrix.shape[0] == k else matrix.T @ matrix
    expected = sum((gram[i, j].item() - float(i == j)) ** 2 for i in range(k) for j in range(k))
    assert orthogonality_penalty(weight).item() == pytest.approx(expected, rel=1e-12)


def test_an_orthogonal_matrix_has_no_penalty():
    q, _ = torch.linalg.qr(torch.randn(6, 4, dtype=torch.float64))
    assert orthogonality_penalty(q).item() == pytest.approx(0.0, abs=1e-20)


def test_the_pipeline_adds_the_weighted_mean_and_its_gradient_is_4_w_gram_minus_i():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 5), torch.nn.Tanh(), torch.nn.Linear(5, 2))
    pipe = steadytrain.Pipeline.from_config(
        {"plugins": [{"plugin": "orthogonality", "weight": 0.1, "exclude": ["2.*"]}]})
    pipe.setup(model, torch.optim.SGD(model.parameters(), lr=0.0))
    pipe.before_step()
    loss = pipe.compute_loss(torch.zeros((), requires_grad=True))
    loss.backward()
    w = model[0].weight.detach()  # 5 × 3: tall, so the penalty is ‖WᵀW − I‖²
    residual = w.T @ w - torch.eye(3)
    assert loss.item() == pytest.approx(0.1 * residual.square().sum().item(), rel=1e-5)
    torch.testing.assert_close(model[0].weight.grad, 0.1 * 4 * w @ residual)
    assert model[2].weight.grad is None  # excluded
