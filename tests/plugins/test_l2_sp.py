import pytest
import torch
from expect import raises
from helpers import round_trip

import steadytrain
from steadytrain import CheckpointError, ConfigError, FilterError, Pipeline
from steadytrain.plugins.l2_sp import L2SP, l2_sp


def net(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))


def moved(model, seed=1):
    """Move every parameter by a random amount, as training would."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=gen))
    return model


def set_up(plugin, model):
    pipe = Pipeline([plugin])
    pipe.setup(model, torch.optim.SGD(model.parameters(), lr=0.1))
    return pipe


def step(pipe, task=None):
    pipe.before_step()
    loss = pipe.compute_loss(task)
    loss.backward()
    pipe.after_backward()
    pipe.consolidate()
    return loss


def test_the_term_is_alpha_half_the_squared_distance_to_the_start_and_its_gradient():
    model = net()
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    pipe = set_up(L2SP(L2SP.Config(alpha=0.3)), model)
    moved(model)
    loss = step(pipe)
    expected = 0.3 / 2 * sum((p - start[n]).pow(2).sum() for n, p in model.named_parameters())
    torch.testing.assert_close(loss, expected)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, 0.3 * (p.detach() - start[name]))


def test_parameters_missing_from_the_reference_are_pulled_to_zero_by_beta():
    pretrained = net(seed=5)
    model = moved(net())
    reference = {n: t for n, t in pretrained.state_dict().items() if not n.startswith("2.")}
    plugin = L2SP(L2SP.Config(alpha=0.5, beta=0.02)).bind(reference=reference)
    pipe = set_up(plugin, model)
    pipe.before_step()
    loss = pipe.compute_loss(None)
    loss.backward()
    pipe.after_backward()
    pipe.consolidate()
    params = dict(model.named_parameters())
    sp = 0.5 / 2 * sum((params[n] - reference[n]).pow(2).sum() for n in reference)
    l2 = 0.02 / 2 * sum(params[n].pow(2).sum() for n in ("2.weight", "2.bias"))
    torch.testing.assert_close(loss, sp + l2)
    torch.testing.assert_close(params["0.weight"].grad,
                               0.5 * (params["0.weight"].detach() - reference["0.weight"]))
    torch.testing.assert_close(params["2.weight"].grad, 0.02 * params["2.weight"].detach())
    metrics = pipe.metrics()
    assert metrics["reg/l2_sp/sp"] == pytest.approx(sp.item())
    assert metrics["reg/l2_sp/l2"] == pytest.approx(l2.item())
    assert metrics["l2_sp/distance"] == pytest.approx((2 * sp / 0.5).sqrt().item())


def test_the_plain_function_matches_the_formula():
    a, b = torch.randn(3, requires_grad=True), torch.randn(2, 2, requires_grad=True)
    a0, new = torch.randn(3), torch.randn(5, requires_grad=True)
    terms = l2_sp([a, b], [a0, torch.zeros(2, 2)], [new], alpha=2.0, beta=4.0)
    torch.testing.assert_close(terms["sp"], (a - a0).pow(2).sum() + b.pow(2).sum())
    torch.testing.assert_close(terms["l2"], 2.0 * new.pow(2).sum())
    assert "l2" not in l2_sp([a], [a0], [], alpha=1.0, beta=1.0)


def test_by_default_the_start_is_the_model_at_setup_and_training_moves_away_from_it():
    model = net()
    pipe = set_up(L2SP(), model)
    start = [p.detach().clone() for p in model.parameters()]
    assert step(pipe).item() == 0.0
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(3):
        pipe.before_step()
        out = model(torch.randn(16, 4))
        pipe.compute_loss(out.pow(2).mean()).backward()
        pipe.after_backward()
        optimizer.step()
        pipe.consolidate()
        optimizer.zero_grad()
    pipe.metrics()
    pipe.before_step()
    pipe.compute_loss(None)
    distance = torch.sqrt(sum((p.detach() - s).pow(2).sum()
                              for p, s in zip(model.parameters(), start, strict=True)))
    pipe.after_backward()
    pipe.consolidate()
    assert distance > 0
    assert pipe.metrics()["l2_sp/distance"] == pytest.approx(distance.item(), rel=1e-6)


def test_filters_choose_the_parameters():
    model = net()
    pipe = set_up(L2SP(exclude=["*.bias"]), model)
    moved(model)
    step(pipe)
    params = dict(model.named_parameters())
    assert params["0.bias"].grad is None and params["2.bias"].grad is None
    assert params["0.weight"].grad.abs().sum() > 0


def test_frozen_parameters_are_left_out():
    model = net()
    model[0].requires_grad_(False)
    with raises(FilterError, "l2_sp.include: pattern '0.*' matches no trainable parameter"):
        set_up(L2SP(include=["0.*"]), model)


def test_a_reference_file_is_read_weights_only(tmp_path):
    pretrained, model = net(seed=3), net()
    torch.save(pretrained.state_dict(), tmp_path / "start.pt")
    pipe = set_up(L2SP(L2SP.Config(alpha=1.0, reference_file=str(tmp_path / "start.pt"))), model)
    expected = 0.5 * sum((p - q).pow(2).sum() for p, q in
                         zip(model.parameters(), pretrained.parameters(), strict=True))
    torch.testing.assert_close(step(pipe), expected)


def test_the_checkpoint_keeps_the_start_across_a_resume():
    model = net()
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    pipe = set_up(L2SP(L2SP.Config(alpha=1.0)), model)
    step(pipe)
    state = round_trip(pipe.state_dict())
    moved(model)  # the resumed run starts from the trained weights, not the start
    resumed = Pipeline([L2SP(L2SP.Config(alpha=1.0))])
    resumed.load_state_dict(state)
    resumed.setup(model, None)
    expected = 0.5 * sum((p - start[n]).pow(2).sum() for n, p in model.named_parameters())
    torch.testing.assert_close(step(resumed), expected)


def test_configured_from_a_dict():
    pipe = Pipeline.from_config({"plugins": [
        {"plugin": "l2_sp", "id": "anchor", "alpha": 0.2, "exclude": ["2.*"]}]})
    model = net()
    pipe.setup(model, None)
    moved(model)
    pipe.before_step()
    terms = pipe.compute_loss(None)
    start = net()
    expected = 0.1 * sum((p - q).pow(2).sum() for (n, p), q in
                         zip(model.named_parameters(), start.parameters(), strict=True)
                         if n.startswith("0."))
    torch.testing.assert_close(terms, expected)


# -- bad input --------------------------------------------------------------------------


def test_a_reference_of_another_shape_is_an_error_naming_the_parameter():
    reference = {**net().state_dict(), "2.weight": torch.zeros(10, 8)}
    with raises(ConfigError, "l2_sp: the bound reference", "parameter '2.weight' has shape "
                "(10, 8), the parameter (3, 8)", "exclude the parameter"):
        set_up(L2SP().bind(reference=reference), net())


def test_a_reference_matching_no_parameter_is_an_error():
    reference = {f"module.{n}": t for n, t in net().state_dict().items()}
    with raises(ConfigError, "l2_sp: the bound reference: none of the 4 selected parameters",
                "'module.0.weight'", "no 'module.' prefix"):
        set_up(L2SP().bind(reference=reference), net())


def test_alpha_zero_with_nothing_new_is_an_error():
    with raises(ConfigError, "l2_sp.alpha: 0 with no new parameters leaves nothing"):
        set_up(L2SP(L2SP.Config(alpha=0.0)), net())
    reference = {n: t for n, t in net().state_dict().items() if n.startswith("0.")}
    with raises(ConfigError, "l2_sp.alpha: 0 with beta = 0"):
        set_up(L2SP(L2SP.Config(alpha=0.0, beta=0.0)).bind(reference=reference), net())


def test_alpha_zero_penalizes_only_the_new_parameters():
    model = net()
    reference = {n: t for n, t in model.state_dict().items() if n.startswith("0.")}
    pipe = set_up(L2SP(L2SP.Config(alpha=0.0, beta=1.0)).bind(reference=reference), model)
    loss = step(pipe)
    torch.testing.assert_close(loss, 0.5 * (model[2].weight.pow(2).sum()
                                            + model[2].bias.pow(2).sum()))


@pytest.mark.parametrize(
    ("content", "problem"),
    [(None, "cannot read"), ([1, 2], "must hold a state dict")],
)
def test_a_bad_reference_file_is_an_error(tmp_path, content, problem):
    path = tmp_path / "start.pt"
    if content is not None:
        torch.save(content, path)
    with raises(ConfigError, "l2_sp.reference_file", problem):
        set_up(L2SP(L2SP.Config(reference_file=str(path))), net())


def test_binding_something_that_is_not_a_mapping_is_an_error():
    with raises(ConfigError, "l2_sp: bind(reference=...) needs a mapping"):
        L2SP().bind(reference=[torch.zeros(1)])


def test_a_checkpoint_of_other_parameters_is_refused():
    pipe = set_up(L2SP(), net())
    state = pipe.state_dict()
    other = set_up(L2SP(exclude=["*.bias"]), net())
    with raises(CheckpointError, "'l2_sp'", "the instance anchors", "filters or the model"):
        other.load_state_dict(state)


def test_an_option_out_of_range_is_an_error_naming_it():
    with raises(ConfigError, "plugins[0].beta: must be a number >= 0, got -1"):
        steadytrain.load_config({"plugins": [{"plugin": "l2_sp", "beta": -1}]})
