"""steadytrain.losses: the built-in losses against torch's functions, names and options,
and third-party losses from the ``steadytrain.losses`` entry-point group."""

import textwrap

import pytest
import torch
import torch.nn.functional as F
from expect import raises

import steadytrain
from steadytrain import ConfigError, RegistryError, losses
from steadytrain.plugins.corrector.corrector_penalty import CorrectorPenalty, corrector_penalty

REDUCTIONS = ["mean", "sum", "none"]


def pair(seed=0, shape=(4, 5, 6)):
    gen = torch.Generator().manual_seed(seed)
    x = (2 * torch.randn(*shape, generator=gen, dtype=torch.float64)).requires_grad_()
    return x, torch.randn(*shape, generator=gen, dtype=torch.float64)


TORCH_LOSSES = {
    "mse": ({}, lambda x, y, r: F.mse_loss(x, y, reduction=r)),
    "l1": ({}, lambda x, y, r: F.l1_loss(x, y, reduction=r)),
    "smooth_l1": ({"beta": 0.3}, lambda x, y, r: F.smooth_l1_loss(x, y, reduction=r, beta=0.3)),
    "huber": ({"delta": 0.3}, lambda x, y, r: F.huber_loss(x, y, reduction=r, delta=0.3)),
    "smooth_l1_mse": ({"beta": 0.5, "mse_weight": 0.25}, lambda x, y, r: (
        0.25 * F.mse_loss(x, y, reduction=r)
        + 0.75 * F.smooth_l1_loss(x, y, reduction=r, beta=0.5))),
    "cosine": ({}, lambda x, y, r: losses.reduce(
        1 - F.cosine_similarity(x, y, dim=-1), r)),
}


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("name", TORCH_LOSSES)
def test_a_built_in_loss_is_torchs_function(name, reduction):
    options, reference = TORCH_LOSSES[name]
    x, y = pair()
    got = losses.get(name, **options)(x, y, reduction=reduction)
    expected = reference(x, y, reduction)
    torch.testing.assert_close(got, expected, rtol=1e-14, atol=1e-14)
    weights = torch.rand_like(got)
    for ours, theirs in zip(torch.autograd.grad((got * weights).sum(), x),
                            torch.autograd.grad((expected * weights).sum(), x), strict=True):
        torch.testing.assert_close(ours, theirs, rtol=1e-14, atol=1e-14)


def test_the_cosine_loss_is_one_minus_the_cosine_of_each_vector():
    x, y = pair()
    by_hand = 1 - (x * y).sum(-1) / (x.norm(dim=-1) * y.norm(dim=-1))
    torch.testing.assert_close(losses.get("cosine")(x, y, reduction="none"), by_hand)
    assert losses.get("cosine")(x, 3.0 * x).item() == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize("gamma", [0.0, 1.0, 2.0, 3.5])
def test_focal_mse_weighs_each_squared_error_by_its_detached_magnitude(gamma):
    x, y = pair()
    error = x.detach() - y
    got = losses.get("focal_mse", gamma=gamma)(x, y)
    expected = (error.abs() ** gamma * error**2).mean()
    torch.testing.assert_close(got, expected, rtol=1e-13, atol=0)
    # The weight is a constant: the gradient is |e|^γ · 2e / N, not that of |e|^(γ+2).
    (grad,) = torch.autograd.grad(got, x)
    torch.testing.assert_close(grad, error.abs() ** gamma * 2 * error / error.numel())


def test_focal_mse_with_gamma_zero_is_mse_and_its_default_gamma_is_two():
    x, y = pair()
    torch.testing.assert_close(losses.get("focal_mse", gamma=0.0)(x, y), F.mse_loss(x, y))
    assert losses.get("focal_mse") == losses.FocalMSE(gamma=2.0)


def test_focal_mse_puts_more_weight_on_an_outlier_than_mse_does():
    y = torch.zeros(100)
    x = torch.full((100,), 0.1)
    x[0] = 10.0  # one outlier
    share = {}
    for name in ("mse", "focal_mse", "huber"):
        (grad,) = torch.autograd.grad(losses.get(name)(x.requires_grad_(), y), x)
        share[name] = grad[0].abs().item() / grad.abs().sum().item()
    assert share["focal_mse"] > share["mse"] > share["huber"]


def test_defaults_are_the_sources_values():
    assert losses.get("smooth_l1_mse") == losses.SmoothL1MSE(beta=1.0, mse_weight=0.5)
    assert losses.get("huber").delta == 1.0 and losses.get("smooth_l1").beta == 1.0


@pytest.mark.parametrize("name", ["mse", "focal_mse", "cosine"])
def test_an_unknown_reduction_is_an_error(name):
    x, y = pair()
    with pytest.raises(ValueError, match="reduction"):
        losses.get(name)(x, y, reduction="avg")


def test_elementwise_losses_cost_nothing_at_zero_error():
    for name in losses.names():
        loss = losses.get(name)
        if loss.elementwise:
            zero = torch.zeros(3, 4)
            assert torch.equal(loss(zero, zero, reduction="none"), zero), name


# -- names and options ------------------------------------------------------------------


def test_an_unknown_loss_name_is_an_error_with_suggestions():
    with raises(ConfigError, "align.loss: unknown loss 'hubber'", "did you mean 'huber'",
                "the losses are cosine, focal_mse, huber"):
        losses.get("hubber", where="align.loss")


def test_an_unknown_option_is_an_error_naming_the_known_ones():
    with raises(ConfigError, "align.loss_options: loss 'huber' has no option 'delt'",
                "did you mean 'delta'", "its options are: delta"):
        losses.get("huber", where="align.loss_options", delt=0.5)


@pytest.mark.parametrize(
    ("name", "options", "problem"),
    [("huber", {"delta": 0.0}, "delta: must be a positive number, got 0.0"),
     ("smooth_l1_mse", {"mse_weight": 1.5}, "mse_weight: must be in [0.0, 1.0], got 1.5"),
     ("focal_mse", {"gamma": -1.0}, "gamma: must be a number >= 0, got -1.0")],
)
def test_a_bad_option_value_is_an_error_naming_the_option(name, options, problem):
    with raises(ConfigError, f"where: loss {name!r}: {problem}"):
        losses.get(name, where="where", **options)


def test_the_built_ins_are_entry_points_of_steadytrain():
    registry = losses.LossRegistry.discover(autoload=False)
    assert registry.names() == ["cosine", "focal_mse", "huber", "l1", "mse", "smooth_l1",
                                "smooth_l1_mse"]
    assert all(registry._entries[n].entry.dist.name == "steadytrain" for n in registry.names())


# -- third-party losses -----------------------------------------------------------------

LOSSES = '''
import attrs
import torch

from steadytrain import losses


@attrs.frozen
class LogCosh(losses.Loss):
    """log(cosh(x − y)): quadratic near zero, linear far away."""

    name = "log_cosh"
    scale: float = attrs.field(default=1.0)

    def __call__(self, input, target, *, reduction="mean"):
        error = (input - target) / self.scale
        return losses.reduce(self.scale**2 * torch.log(torch.cosh(error)), reduction)


@attrs.frozen
class Renamed(losses.Loss):
    name = "other_name"

    def __call__(self, input, target, *, reduction="mean"):
        return losses.reduce((input - target).abs(), reduction)


class NotAttrs(losses.Loss):
    name = "not_attrs"
'''


def distribution(root, name, module, entry_points):
    info = root / f"{name.replace('-', '_')}-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.0\n")
    lines = "".join(f"{ep} = {module}:{attr}\n" for ep, attr in entry_points.items())
    (info / "entry_points.txt").write_text(f"[steadytrain.losses]\n{lines}")


@pytest.fixture
def site(tmp_path, monkeypatch):
    """A throw-away distribution acme-losses with good and broken losses, and a fresh
    default registry (the one plugins use) that will find it."""
    (tmp_path / "acme_losses.py").write_text(textwrap.dedent(LOSSES))
    (tmp_path / "exploding.py").write_text("raise ImportError('libcosh.so not found')\n")
    distribution(tmp_path, "acme-losses", "acme_losses", {
        "log_cosh": "LogCosh", "renamed": "Renamed", "not_attrs": "NotAttrs", "mse": "LogCosh"})
    distribution(tmp_path, "exploding-losses", "exploding", {"exploding": "Loss"})
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(losses, "_registry", losses.LossRegistry.discover(autoload=False))
    return tmp_path


def test_a_third_party_loss_is_found_by_name_once_installed(site):
    loss = losses.get("log_cosh", scale=2.0)  # unknown to the registry so far: re-read
    x, y = pair()
    torch.testing.assert_close(loss(x, y), (4.0 * torch.log(torch.cosh((x - y) / 2))).mean())
    assert "log_cosh" in losses.names()


def test_a_plugin_uses_a_third_party_loss_by_name(site):
    delta = torch.tensor([0.5, -3.0], dtype=torch.float64, requires_grad=True)
    got = corrector_penalty({"a": delta}, {"a": 1.0}, loss="log_cosh")
    torch.testing.assert_close(got, torch.log(torch.cosh(delta)).mean())
    config = steadytrain.structure_options({"loss": "log_cosh"}, CorrectorPenalty.Config, "p")
    assert config.loss == "log_cosh"


@pytest.mark.parametrize(
    ("name", "problem"),
    [("exploding", "import failed: ImportError: libcosh.so not found"),
     ("renamed", "the entry point is called 'renamed' but Renamed.name is 'other_name'"),
     ("not_attrs", "must point to a steadytrain.losses.Loss subclass made an attrs class"),
     ("mse", "the name is claimed by several distributions: acme-losses 1.0 "
             "(acme_losses:LogCosh) and steadytrain")],
)
def test_a_broken_third_party_loss_is_reported_with_its_origin(site, name, problem):
    registry = losses.LossRegistry.discover()
    with raises(RegistryError, f"loss {name!r}", problem):
        registry.get(name)
    if name != "mse":
        assert "distribution" in str(registry._entries[name].origin)
    assert registry.get("huber") is losses.Huber  # the others keep working


def test_a_config_naming_a_broken_loss_says_why(site):
    with raises(ConfigError, "p.loss: loss 'exploding'", "exploding-losses 1.0",
                "libcosh.so not found"):
        steadytrain.structure_options({"loss": "exploding"}, CorrectorPenalty.Config, "p")


def test_autoload_off_reads_only_the_built_in_losses(site, monkeypatch):
    assert "log_cosh" in losses.LossRegistry.discover()
    assert "log_cosh" not in losses.LossRegistry.discover(autoload=False)
    monkeypatch.setenv("STEADYTRAIN_DISABLE_PLUGIN_AUTOLOAD", "1")
    assert "log_cosh" not in losses.LossRegistry.discover()


def test_in_process_registration_and_its_refusals(site):
    import attrs

    @attrs.frozen
    class Cubic(losses.Loss):
        name = "cubic"

        def __call__(self, input, target, *, reduction="mean"):
            return losses.reduce((input - target).abs() ** 3, reduction)

    losses.register(Cubic)
    assert losses.get("cubic") == Cubic()
    losses.get("log_cosh")  # re-reading the entry points keeps in-process losses
    assert losses.get("cubic") == Cubic()
    with raises(RegistryError, "cannot register loss 'cubic'", "taken by registered in-process"):
        losses.register(Cubic)
    with raises(RegistryError, "cannot register loss 'x'", "Loss subclass"):
        losses.register(object, name="x")


def test_the_third_party_loss_of_the_losses_page_works(monkeypatch):
    import re
    from pathlib import Path

    page = (Path(__file__).resolve().parents[1] / "docs" / "losses.md").read_text()
    (source,) = [b for b in re.findall(r"```python\n(.*?)```", page, flags=re.DOTALL)
                 if "class LogCosh" in b]
    namespace: dict = {}
    exec(compile(source, "docs/losses.md", "exec"), namespace)
    monkeypatch.setattr(losses, "_registry", losses.LossRegistry.discover(autoload=False))
    losses.register(namespace["LogCosh"])
    x, y = pair()
    torch.testing.assert_close(losses.get("log_cosh")(x, y), torch.log(torch.cosh(x - y)).mean())
    with raises(ConfigError, "loss 'log_cosh': scale: must be a positive number"):
        losses.get("log_cosh", scale=0.0)
