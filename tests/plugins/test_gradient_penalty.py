import pytest
import torch
import torch.nn.functional as F
from expect import raises
from helpers import round_trip

import steadytrain
from steadytrain import CheckpointError, ConfigError, Pipeline
from steadytrain.plugins.gradient_penalty import GradientPenalty, r1_penalty, wgan_gp_penalty


def critic(seed=0, dim=6):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(dim, 16), torch.nn.Tanh(),
                               torch.nn.Linear(16, 1)).double()


def data(seed=0, batch=5, dim=6):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, dim, generator=gen, dtype=torch.float64),
            torch.randn(batch, dim, generator=gen, dtype=torch.float64) + 2.0)


def set_up(plugin, model):
    pipe = Pipeline([plugin])
    pipe.setup(model, None)
    return pipe


def per_sample_norms(function, points):
    """‖∂f(x_b)/∂x_b‖ for each sample on its own, with torch.autograd.grad."""
    norms = []
    for point in points:
        x = point.detach().clone().requires_grad_()
        (grad,) = torch.autograd.grad(function(x[None]).sum(), x, create_graph=True)
        norms.append(grad.norm())
    return torch.stack(norms)


def param_grads(value, module):
    return torch.autograd.grad(value, list(module.parameters()), retain_graph=True,
                               materialize_grads=True)


def test_r1_is_the_mean_squared_input_gradient_in_value_and_parameter_gradient():
    d = critic()
    x = data()[0].requires_grad_()
    pipe = set_up(GradientPenalty(weight=0.7), d)
    pipe.before_step()
    scores = d(x)
    loss = pipe.compute_loss(scores.mean(), outputs={"inputs": x, "scores": scores})
    expected = scores.mean() + 0.7 * per_sample_norms(d, x).square().mean()
    torch.testing.assert_close(loss, expected, rtol=1e-12, atol=0)
    # The host's plain backward (no create_graph) differentiates through the penalty, so
    # the plugin does not ask for backward(create_graph=True).
    assert not pipe.needs_create_graph
    reference = param_grads(expected, d)
    loss.backward()
    for ours, theirs in zip([p.grad for p in d.parameters()], reference, strict=True):
        torch.testing.assert_close(ours, theirs, rtol=1e-10, atol=1e-12)


def test_wgan_gp_matches_a_hand_written_reference_at_the_same_interpolations():
    d = critic()
    real, fake = data()
    plugin = GradientPenalty(GradientPenalty.Config(mode="wgan_gp", seed=3)).bind(critic=d)
    pipe = set_up(plugin, d)
    pipe.before_step()
    got = pipe.compute_loss(None, outputs={"real": real, "fake": fake})
    eps = torch.rand(5, 1, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    mixed = eps * real + (1 - eps) * fake
    expected = (per_sample_norms(d, mixed) - 1).square().mean()
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=0)
    for ours, theirs in zip(param_grads(got, d), param_grads(expected, d), strict=True):
        torch.testing.assert_close(ours, theirs, rtol=1e-10, atol=1e-12)


def test_for_a_linear_critic_the_penalties_are_functions_of_its_weight():
    w = torch.tensor([[0.6, -1.2, 2.0]], dtype=torch.float64, requires_grad=True)
    linear = lambda x: x @ w.T + 0.5  # noqa: E731
    real, fake = data(dim=3)
    x = real.clone().requires_grad_()
    norm = w.detach().norm()
    r1 = r1_penalty(linear(x), x)
    torch.testing.assert_close(r1, norm**2)
    torch.testing.assert_close(torch.autograd.grad(r1, w)[0], 2 * w.detach())
    gp = wgan_gp_penalty(linear, real, fake, target_norm=1.0)
    torch.testing.assert_close(gp, (norm - 1) ** 2)
    torch.testing.assert_close(torch.autograd.grad(gp, w)[0], 2 * (norm - 1) * w.detach() / norm)


def test_the_gradient_is_taken_per_sample_over_dimension_zero():
    images = torch.randn(4, 2, 3, 3, dtype=torch.float64, requires_grad=True)
    scale = torch.arange(1.0, 5.0, dtype=torch.float64)[:, None, None, None]
    scores = (scale * images).sum((1, 2, 3))  # ∂f/∂x_b = scale_b everywhere
    expected = (scale.flatten() ** 2 * 18).mean()
    torch.testing.assert_close(r1_penalty(scores, images), expected)


def test_wgan_gp_drives_the_critics_gradient_norm_to_one():
    torch.manual_seed(0)
    d = torch.nn.Sequential(torch.nn.Linear(2, 32), torch.nn.ReLU(), torch.nn.Linear(32, 1))
    plugin = GradientPenalty(GradientPenalty.Config(mode="wgan_gp"), weight=10.0).bind(critic=d)
    pipe = set_up(plugin, d)
    optimizer = torch.optim.Adam(d.parameters(), lr=3e-2, betas=(0.5, 0.9))
    gen = torch.Generator().manual_seed(1)
    for _ in range(60):
        real = torch.randn(64, 2, generator=gen) * 0.5 + torch.tensor([2.0, 0.0])
        fake = torch.randn(64, 2, generator=gen)
        pipe.before_step()
        wasserstein = d(fake).mean() - d(real).mean()
        pipe.compute_loss(wasserstein, outputs={"real": real, "fake": fake}).backward()
        steadytrain.step_optimizer(optimizer, pipe.after_backward())
        pipe.consolidate()
        optimizer.zero_grad()
        norm = pipe.metrics()["gradient_penalty/grad_norm"]
    assert 0.8 < norm < 1.2


# -- the penalty has a meaningful size; the source's has not --------------------------------


def test_wgan_gp_is_of_the_size_of_the_critic_loss_and_changes_its_gradient():
    d = critic(dim=16)
    real, fake = data(dim=16, batch=32)
    wasserstein = d(fake).mean() - d(real).mean()
    gp = 10.0 * wgan_gp_penalty(d, real, fake, generator=torch.Generator().manual_seed(0))
    assert gp.item() / wasserstein.abs().item() > 1.0
    plain = torch.cat([g.flatten() for g in param_grads(wasserstein, d)])
    both = torch.cat([g.flatten() for g in param_grads(wasserstein + gp, d)])
    assert (both - plain).norm() / plain.norm() > 0.5


def source_gradient_penalty(student, teacher, alpha):
    """Seed 002's 'gradient penalty': the gradient of MSE(x̂, teacher) at x̂, squared."""
    mixed = (alpha * student + (1 - alpha) * teacher).detach().requires_grad_()
    (grad,) = torch.autograd.grad(F.mse_loss(mixed, teacher), mixed)
    return grad.square().mean()


def test_the_sources_gradient_penalty_is_about_1e_14_of_the_loss():
    # Hidden states of a realistic size: batch 4, 512 tokens, width 4096.
    gen = torch.Generator().manual_seed(0)
    teacher = torch.randn(4, 512, 4096, generator=gen)
    student = teacher + 0.5 * torch.randn(4, 512, 4096, generator=gen)
    loss = F.mse_loss(student, teacher)
    ratio = (source_gradient_penalty(student, teacher, alpha=0.5) / loss).item()
    elements = teacher.numel()
    assert ratio == pytest.approx(4 * 0.5**2 / elements**2, rel=1e-3)  # 4α²/N²
    assert 1e-15 < ratio < 1e-13


# -- configuration and bad input ---------------------------------------------------------------


def test_wgan_gp_without_a_bound_critic_is_an_error_at_setup():
    pipe = Pipeline.from_config({"plugins": [
        {"plugin": "gradient_penalty", "id": "gp", "mode": "wgan_gp"}]})
    with raises(ConfigError, "gp.mode: 'wgan_gp'", "no critic is bound",
                "plugin.bind(critic=D) before pipe.setup()"):
        pipe.setup(critic(), None)


def test_a_critic_bound_in_mode_r1_is_an_error():
    with raises(ConfigError, "gp.mode: a critic is bound, but mode 'r1'", "never calls it"):
        set_up(GradientPenalty(id="gp").bind(critic=critic()), critic())


def test_an_option_of_the_other_mode_is_an_error_naming_it():
    with raises(ConfigError, "plugins[0].seed: is an option of mode 'wgan_gp', but mode is "
                "'r1'"):
        steadytrain.load_config({"plugins": [{"plugin": "gradient_penalty", "seed": 2}]})
    with raises(ConfigError, "plugins[0].input_key: is an option of mode 'r1'"):
        steadytrain.load_config({"plugins": [
            {"plugin": "gradient_penalty", "mode": "wgan_gp", "input_key": "x"}]})


def test_binding_something_that_is_not_callable_is_an_error():
    with raises(ConfigError, "gp: bind(critic=...) needs a module or function"):
        GradientPenalty(id="gp").bind(critic=3)


def r1_step(outputs):
    pipe = set_up(GradientPenalty(id="gp"), critic())
    pipe.before_step()
    return pipe.compute_loss(None, outputs=outputs)


def test_an_input_that_does_not_require_grad_is_an_error():
    d, x = critic(), data()[0]
    with raises(ConfigError, "gp.input_key: outputs['inputs'] does not require grad",
                "x.requires_grad_() before the forward pass"):
        r1_step({"inputs": x, "scores": d(x)})


def test_an_output_that_does_not_depend_on_the_input_is_an_error():
    d, x = critic(), data()[0].requires_grad_()
    with raises(ConfigError, "gp.output_key: outputs['scores'] does not depend on "
                "outputs['inputs']"):
        r1_step({"inputs": x, "scores": d(data(seed=1)[0])})


@pytest.mark.parametrize(
    ("outputs", "problem"),
    [({"inputs": torch.tensor(1.0, requires_grad=True)}, "got a torch.float32 tensor of "
      "shape ()"),
     ({"inputs": [1.0]}, "got a list")],
)
def test_an_input_that_is_not_a_batch_tensor_is_an_error(outputs, problem):
    with raises(ConfigError, "gp.input_key: outputs['inputs'] must be a floating-point tensor "
                "with a batch dimension", problem):
        r1_step({**outputs, "scores": torch.ones(1, requires_grad=True)})


def test_a_missing_output_is_an_error_naming_the_option():
    with raises(ConfigError, "gp.output_key: no output 'scores' in this step"):
        r1_step({"inputs": data()[0].requires_grad_()})


def wgan_step(plugin, real, fake):
    pipe = set_up(plugin, critic())
    pipe.before_step()
    return pipe.compute_loss(None, outputs={"real": real, "fake": fake})


def test_real_and_fake_of_different_shapes_are_an_error():
    real, fake = data()
    plugin = GradientPenalty(GradientPenalty.Config(mode="wgan_gp"), id="gp").bind(
        critic=critic())
    with raises(ConfigError, "gp.fake_key: outputs['fake'] has shape (4, 6) and "
                "outputs['real'] (5, 6)"):
        wgan_step(plugin, real, fake[:4])


def test_a_critic_that_ignores_its_input_is_an_error():
    real, fake = data()
    plugin = GradientPenalty(GradientPenalty.Config(mode="wgan_gp"), id="gp").bind(
        critic=lambda x: torch.ones(len(x), requires_grad=True))
    with raises(ConfigError, "gp: the bound critic's output", "does not depend on its input"):
        wgan_step(plugin, real, fake)


# -- checkpoints --------------------------------------------------------------------------


def penalties(pipe, steps, real, fake):
    values = []
    for _ in range(steps):
        pipe.before_step()
        values.append(pipe.compute_loss(None, outputs={"real": real, "fake": fake}).detach())
        pipe.after_backward()
        pipe.consolidate()
    return values


def test_the_interpolation_generator_resumes_where_it_stopped():
    d = critic()
    real, fake = data()
    make = lambda: GradientPenalty(GradientPenalty.Config(mode="wgan_gp")).bind(critic=d)  # noqa: E731
    whole = penalties(set_up(make(), d), 3, real, fake)
    first = set_up(make(), d)
    penalties(first, 1, real, fake)
    state = round_trip(first.state_dict())
    resumed = Pipeline([make()])
    resumed.load_state_dict(state)
    resumed.setup(d, None)
    assert torch.equal(torch.stack(penalties(resumed, 2, real, fake)), torch.stack(whole[1:]))
    assert not torch.equal(whole[0], whole[1])


def test_a_generator_state_from_another_kind_of_device_is_refused():
    d = critic()
    plugin = GradientPenalty(GradientPenalty.Config(mode="wgan_gp"), id="gp").bind(critic=d)
    plugin.load_state_dict({"rng": torch.Generator().get_state(), "device": "cuda"})
    with raises(CheckpointError, "'gp'", "state of a cuda generator", "tensors are on cpu"):
        wgan_step(plugin, *data())


def test_a_checkpoint_state_of_the_wrong_kind_is_refused():
    plugin = GradientPenalty(GradientPenalty.Config(mode="wgan_gp"), id="gp")
    with raises(CheckpointError, "'gp'", "rng must be a uint8 tensor"):
        plugin.load_state_dict({"rng": torch.zeros(3), "device": "cpu"})
    with raises(CheckpointError, "'gp'", "keeps no state"):
        GradientPenalty(id="gp").load_state_dict({"rng": None})
