import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from helpers import regularize, round_trip

import steadytrain
from steadytrain.plugins.corrector_penalty import (
    Correction,
    CorrectionError,
    CorrectorPenalty,
    apply_corrector,
    correction_losses,
    corrector_penalty,
    record_corrections,
)

ROOT = Path(__file__).resolve().parents[2]


def clamp_corrector(fields):
    return {name: value.clamp(min=0.0) for name, value in fields.items()}


def straight_through_corrector(fields):
    return {name: x + (x.clamp(min=0.0) - x).detach() for name, x in fields.items()}


class TinyEmulator(torch.nn.Module):
    """Predicts one (batch, 3) field per variable and passes them through a corrector."""

    def __init__(self, names, corrector=clamp_corrector, source="corrections", seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.names = list(names)
        self.net = torch.nn.Sequential(
            torch.nn.Linear(4, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3 * len(self.names))
        )
        self.corrector = corrector
        self.source = source

    def raw(self, x):
        out = self.net(x).view(x.shape[0], len(self.names), 3)
        return {name: out[:, i] for i, name in enumerate(self.names)}

    def forward(self, x, steps=1):
        outputs = []
        for _ in range(steps):
            fields = apply_corrector(self.corrector, self.raw(x), source=self.source)
            outputs.append(fields)
            x = x + torch.cat([fields[n] for n in self.names], dim=1).mean(1, keepdim=True)
        return outputs


def batch(seed=1, n=8):
    return torch.randn(n, 4, generator=torch.Generator().manual_seed(seed))


def pipeline(*plugins, model=None):
    model = model or TinyEmulator(["a"])
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    return steadytrain.Pipeline(list(plugins)).setup(model, opt, total_steps=100), model, opt


def one_step(pipe, model, x, *, steps=1, task=True):
    """One optimizer step: forward (a rollout of *steps*), combined loss, one backward."""
    pipe.before_step()
    outputs = model(x, steps)
    task_loss = sum(o[n].pow(2).mean() for o in outputs for n in o) if task else None
    loss = pipe.compute_loss(task_loss)
    loss.backward()
    pipe.after_backward()
    pipe.consolidate()
    return loss


def reference_mse(model, x, std, names=None):
    fields = model.raw(x)
    names = names or list(fields)
    return torch.stack(
        [F.mse_loss((fields[n].clamp(min=0) - fields[n]) / std[n],
                    torch.zeros_like(fields[n])) for n in names]
    ).mean()


# -- the plain functions ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("loss", "reference"),
    [
        ("mse", lambda z: F.mse_loss(z, torch.zeros_like(z))),
        ("l1", lambda z: F.l1_loss(z, torch.zeros_like(z))),
        ("huber", lambda z: F.huber_loss(z, torch.zeros_like(z), delta=0.5)),
        ("smooth_l1", lambda z: F.smooth_l1_loss(z, torch.zeros_like(z), beta=0.5)),
    ],
)
def test_penalty_is_the_torch_loss_of_the_normalized_correction(loss, reference):
    gen = torch.Generator().manual_seed(0)
    pre = {"a": torch.randn(4, 5, generator=gen), "b": 3 * torch.randn(2, 7, generator=gen)}
    post = {n: v.clamp(-0.5, 0.5) for n, v in pre.items()}
    std = {"a": 0.7, "b": 2.5}
    corrections = {n: Correction(pre[n], post[n]) for n in pre}
    got = corrector_penalty(corrections, std, loss=loss, delta=0.5)
    expected = (reference((post["a"] - pre["a"]) / 0.7)
                + reference((post["b"] - pre["b"]) / 2.5)) / 2
    torch.testing.assert_close(got, expected)


def test_area_weighted_mse_is_the_weighted_mean_over_cells():
    gen = torch.Generator().manual_seed(0)
    delta = torch.randn(3, 4, 6, generator=gen)
    area = torch.cos(torch.linspace(-1.2, 1.2, 4))[:, None].expand(4, 6)
    got = corrector_penalty({"t": delta}, {"t": 2.0}, loss="area_mse", area_weights=area)
    expected = (area * (delta / 2.0) ** 2).sum() / (3 * area.sum())
    torch.testing.assert_close(got, expected)


def test_normalizer_mean_cancels_because_the_target_is_zero():
    gen = torch.Generator().manual_seed(0)
    pre = 5 + torch.randn(16, generator=gen)
    post = pre.clamp(max=5.0)
    mean, std = 4.2, 1.7
    normalized = ((post - mean) / std) - ((pre - mean) / std)
    torch.testing.assert_close(
        corrector_penalty({"x": Correction(pre, post)}, {"x": std}),
        normalized.pow(2).mean(),
    )


def test_variable_weights_multiply_before_the_mean_over_variables():
    a, b = torch.full((4,), 2.0), torch.full((4,), 1.0)
    got = corrector_penalty({"a": a, "b": b}, {"a": 1.0, "b": 1.0}, variable_weights={"a": 3.0})
    assert got.item() == pytest.approx((3 * 4.0 + 1.0) / 2)


def test_recording_reports_only_the_variables_the_corrector_replaced():
    pipe, _, _ = pipeline(CorrectorPenalty(CorrectorPenalty.Config(std={"a": 1.0})))
    untouched = torch.ones(3)
    ctx = pipe.before_step()
    record_corrections({"a": -untouched, "b": untouched}, {"a": untouched, "b": untouched})
    assert list(ctx.outputs["corrections"]) == ["a"]
    record_corrections({"a": -untouched}, {"a": untouched})
    assert isinstance(ctx.outputs["corrections"], list) and len(ctx.outputs["corrections"]) == 2


def test_recording_outside_a_step_does_nothing():
    fields = {"a": -torch.ones(3)}
    assert torch.equal(apply_corrector(clamp_corrector, fields)["a"], torch.zeros(3))


# -- through the pipeline ---------------------------------------------------------------------


def test_pipeline_term_matches_the_reference_and_the_total_loss():
    std = {"a": 0.5, "b": 2.0}
    pipe, model, _ = pipeline(
        CorrectorPenalty(CorrectorPenalty.Config(std=std), weight=0.3),
        model=TinyEmulator(["a", "b"]),
    )
    x = batch()
    expected = reference_mse(model, x, std)
    pipe.before_step()
    task = torch.tensor(1.5)
    model(x)
    loss = pipe.compute_loss(task)
    torch.testing.assert_close(loss, task + 0.3 * expected)
    loss.backward()
    pipe.after_backward()
    pipe.consolidate()
    metrics = pipe.metrics()
    assert metrics["reg/corrector_penalty/penalty"] == pytest.approx(expected.item())
    assert metrics["corrector_penalty/step_0_weighted"] == pytest.approx(0.3 * expected.item())


def test_a_penalty_on_one_of_fifty_channels_equals_one_of_one():
    names = [f"c_{i}" for i in range(50)]
    std = {n: 1.0 for n in names}
    x = batch()
    many, many_model, _ = pipeline(
        CorrectorPenalty(CorrectorPenalty.Config(std=std), include=["c_7"]),
        model=TinyEmulator(names),
    )
    one, one_model, _ = pipeline(
        CorrectorPenalty(CorrectorPenalty.Config(std=std)), model=TinyEmulator(names)
    )
    many.before_step()
    many_model(x)
    got = many.compute_loss(None)
    one.before_step()
    fields = one_model.raw(x)
    record_corrections({"c_7": fields["c_7"]}, {"c_7": fields["c_7"].clamp(min=0)})
    expected = one.compute_loss(None)
    torch.testing.assert_close(got, expected)
    torch.testing.assert_close(got, reference_mse(many_model, x, std, ["c_7"]))


def test_absent_variables_do_not_dilute_a_rollout_step():
    plugin = CorrectorPenalty(CorrectorPenalty.Config(std={"a": 1.0, "b": 1.0}))
    pipe, _, _ = pipeline(plugin)
    pipe.before_step()
    da, db = torch.full((4,), 2.0, requires_grad=True), torch.full((4,), 1.0, requires_grad=True)
    # Step 0 corrects a and b, step 1 only b: step 1's term is b's loss, not half of it.
    total = pipe.compute_loss(None, outputs={"corrections": [{"a": da, "b": db}, {"b": db}]})
    assert total.item() == pytest.approx((4.0 + 1.0) / 2 + 1.0)


def test_rollout_steps_are_weighted_and_reported_per_step():
    alpha = 0.5
    plugin = CorrectorPenalty(
        CorrectorPenalty.Config(std={"a": 1.0}, rollout_alpha=alpha), weight=2.0
    )
    pipe, model, _ = pipeline(plugin)
    x = batch()
    pipe.before_step()
    outputs = model(x, steps=3)
    total = pipe.compute_loss(None)
    # Reproduce the rollout's raw fields by hand.
    raws, xi = [], x
    for out in outputs:
        raws.append(model.raw(xi)["a"])
        xi = xi + out["a"].mean(1, keepdim=True)
    terms = [(r.clamp(min=0) - r).pow(2).mean() for r in raws]
    expected = sum(t * (1 + alpha * i) ** -0.5 for i, t in enumerate(terms))
    torch.testing.assert_close(total, 2.0 * expected)
    total.backward()
    pipe.after_backward()
    pipe.consolidate()
    metrics = pipe.metrics()
    for i, t in enumerate(terms):
        assert metrics[f"corrector_penalty/step_{i}"] == pytest.approx(t.item())
        assert metrics[f"corrector_penalty/step_{i}_weighted"] == pytest.approx(
            2.0 * (1 + alpha * i) ** -0.5 * t.item()
        )
    assert metrics["corrector_penalty/var/a"] == pytest.approx(sum(terms).item() / 3)


def test_step_reduction_mean_averages_the_rollout():
    plugin = CorrectorPenalty(CorrectorPenalty.Config(std={"a": 1.0}, step_reduction="mean"))
    pipe, _, _ = pipeline(plugin)
    pipe.before_step()
    sets = [{"a": torch.full((2,), v, requires_grad=True)} for v in (1.0, 3.0)]
    assert pipe.compute_loss(None, outputs={"corrections": sets}).item() == pytest.approx(5.0)


def test_exclude_sea_ice_and_include_a_digit_family():
    names = ["thetao_0", "thetao_1", "thetao_12", "thetao_mean", "sea_ice_fraction"]
    plugin = CorrectorPenalty(
        CorrectorPenalty.Config(std={n: 1.0 for n in names}),
        include=["thetao_#", "sea_ice_fraction"], exclude=["sea_ice_fraction"],
    )
    pipe, model, _ = pipeline(plugin, model=TinyEmulator(names))
    x = batch()
    expected = reference_mse(model, x, {n: 1.0 for n in names}, names[:3])
    pipe.before_step()
    model(x)
    torch.testing.assert_close(pipe.compute_loss(None), expected)
    pipe.after_backward()
    assert {n for n in pipe.run.metrics.names() if "/var/" in n} == {
        f"corrector_penalty/var/{n}" for n in names[:3]
    }


def test_epoch_aggregate_is_the_mean_over_the_epoch():
    plugin = CorrectorPenalty(CorrectorPenalty.Config(std={"a": 1.0}), weight=0.5)
    pipe, model, opt = pipeline(plugin)
    pipe.epoch_start(0)
    raws = []
    for seed in range(3):
        x = batch(seed)
        raw = model.raw(x)["a"].detach()
        raws.append((raw.clamp(min=0) - raw).pow(2).mean().item())
        one_step(pipe, model, x)
        opt.step()
        opt.zero_grad()
    pipe.run.metrics.reset()
    pipe.epoch_end()
    metrics = pipe.metrics()
    assert metrics["corrector_penalty/epoch"] == pytest.approx(sum(raws) / 3)
    assert metrics["corrector_penalty/epoch_weighted"] == pytest.approx(0.5 * sum(raws) / 3)


def test_two_instances_read_their_own_realms():
    ocean_model = TinyEmulator(["thetao_0"], source="ocean_corrections", seed=1)
    atmos_model = TinyEmulator(["q"], source="atmosphere_corrections", seed=2)
    ocean = CorrectorPenalty(
        CorrectorPenalty.Config(source="ocean_corrections", std={"thetao_0": 0.5}),
        id="ocean", weight=1.0,
    )
    atmos = CorrectorPenalty(
        CorrectorPenalty.Config(source="atmosphere_corrections"), id="atmosphere", weight=0.2
    ).bind(normalizer=type("Stats", (), {"std": {"q": 3.0}})())
    model = torch.nn.ModuleList([ocean_model, atmos_model])
    pipe, _, _ = pipeline(ocean, atmos, model=model)
    x = batch()
    pipe.before_step()
    ocean_model(x)
    atmos_model(x)
    total = pipe.compute_loss(None)
    expected = (reference_mse(ocean_model, x, {"thetao_0": 0.5})
                + 0.2 * reference_mse(atmos_model, x, {"q": 3.0}))
    torch.testing.assert_close(total, expected)


# -- the correctness traps --------------------------------------------------------------------


def test_gradient_accumulation_gives_the_full_batch_gradients():
    k, x = 4, batch(n=16)
    reference = TinyEmulator(["a", "b"])
    std = {"a": 0.5, "b": 2.0}
    (fields,) = reference(x)
    task = sum(fields[n].pow(2).mean() for n in fields)
    (task + 0.7 * reference_mse(reference, x, std)).backward()

    model = TinyEmulator(["a", "b"])
    pipe, _, _ = pipeline(CorrectorPenalty(CorrectorPenalty.Config(std=std), weight=0.7),
                          model=model)
    for i, chunk in enumerate(x.chunk(k)):
        pipe.before_step(micro_batch=i, num_micro_batches=k)
        (out,) = model(chunk)
        pipe.compute_loss(sum(out[n].pow(2).mean() for n in out)).backward()
    pipe.after_backward()
    pipe.consolidate()
    for p, q in zip(model.parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad)


def test_two_separate_backwards_over_the_shared_graph_fail():
    model = TinyEmulator(["a"])
    pre = model.raw(batch())
    post = clamp_corrector(pre)
    task = post["a"].pow(2).mean()
    penalty = corrector_penalty({"a": Correction(pre["a"], post["a"])}, {"a": 1.0})
    task.backward()
    with pytest.raises(RuntimeError, match="backward through the graph a second time"):
        penalty.backward()


def test_straight_through_corrector_is_an_error():
    plugin = CorrectorPenalty(CorrectorPenalty.Config(std={"a": 1.0}))
    pipe, model, _ = pipeline(plugin, model=TinyEmulator(["a"], straight_through_corrector))
    pipe.before_step()
    model(batch())
    with pytest.raises(CorrectionError, match="straight-through corrector: post − pre"):
        pipe.compute_loss(None)


def test_straight_through_corrector_warns_when_asked():
    plugin = CorrectorPenalty(CorrectorPenalty.Config(std={"a": 1.0}, on_detached="warn"))
    pipe, model, _ = pipeline(plugin, model=TinyEmulator(["a"], straight_through_corrector))
    pipe.before_step()
    model(batch())
    with pytest.warns(UserWarning, match="corrector_penalty: the corrections of 'a'"):
        pipe.compute_loss(None)


def test_corrections_of_a_detached_corrector_are_an_error():
    plugin = CorrectorPenalty(CorrectorPenalty.Config(std={"a": 1.0}))
    pipe, model, _ = pipeline(plugin)
    pipe.before_step()
    raw = model.raw(batch())["a"].detach()
    with pytest.raises(CorrectionError, match=r"corrector_penalty: .*'a' .*do not require grad"):
        pipe.compute_loss(None, outputs={"corrections": {"a": raw.clamp(min=0) - raw}})


def test_nan_under_the_mask_is_masked_out_of_value_and_gradient():
    pre = torch.tensor([[-1.0, float("nan"), 0.5], [-2.0, 1.0, float("nan")]],
                       requires_grad=True)
    mask = ~torch.isnan(pre.detach())
    plugin = CorrectorPenalty(CorrectorPenalty.Config(std={"sst": 2.0}))
    pipe, _, _ = pipeline(plugin)
    pipe.before_step()
    apply_corrector(clamp_corrector, {"sst": pre}, mask=mask)
    total = pipe.compute_loss(None)
    valid = pre.detach()[mask]
    expected = ((valid.clamp(min=0) - valid) / 2.0).pow(2).mean()
    torch.testing.assert_close(total, expected)
    total.backward()
    assert torch.isfinite(pre.grad).all()


def test_unmasked_nan_is_reported_not_propagated():
    pipe, _, _ = pipeline(CorrectorPenalty(CorrectorPenalty.Config(std={"sst": 1.0})))
    pipe.before_step()
    pre = torch.tensor([float("nan"), -1.0], requires_grad=True)
    apply_corrector(clamp_corrector, {"sst": pre})
    with pytest.raises(steadytrain.TermError, match="not finite"):
        pipe.compute_loss(None)


# -- std sources -----------------------------------------------------------------------------


class Normalizer:
    def __init__(self, std):
        self.std = std


@pytest.mark.parametrize("suffix", [".json", ".pt"])
def test_std_comes_from_config_then_normalizer_then_file(tmp_path, suffix):
    path = tmp_path / f"stats{suffix}"
    table = {"a": 4.0, "b": 5.0, "c": 6.0}
    if suffix == ".json":
        path.write_text(json.dumps(table))
    else:
        torch.save({n: torch.tensor(v) for n, v in table.items()}, path)
    plugin = CorrectorPenalty(CorrectorPenalty.Config(std={"a": 1.0}, std_file=str(path)))
    plugin.bind(normalizer=Normalizer({"a": 2.0, "b": torch.tensor(3.0)}))
    pipe, _, _ = pipeline(plugin)
    pipe.before_step()
    ones = torch.ones(2, requires_grad=True)
    total = pipe.compute_loss(None, outputs={"corrections": {"a": ones, "b": ones, "c": ones}})
    assert total.item() == pytest.approx((1 / 1 + 1 / 9 + 1 / 36) / 3)


def test_area_weights_from_a_file(tmp_path):
    area = torch.tensor([1.0, 3.0])
    torch.save(area, tmp_path / "area.pt")
    plugin = CorrectorPenalty(CorrectorPenalty.Config(
        loss="area_mse", std={"a": 1.0}, area_weights_file=str(tmp_path / "area.pt")))
    pipe, _, _ = pipeline(plugin)
    pipe.before_step()
    delta = torch.tensor([[2.0, 1.0]], requires_grad=True)
    total = pipe.compute_loss(None, outputs={"corrections": {"a": delta}})
    assert total.item() == pytest.approx((1 * 4 + 3 * 1) / 4)


# -- bad input -------------------------------------------------------------------------------


def run_once(plugin, corrections, model=None):
    pipe, _, _ = pipeline(plugin, model=model)
    pipe.before_step()
    return pipe.compute_loss(None, outputs={"corrections": corrections})


def grad_ones(*shape):
    return torch.ones(*shape, requires_grad=True)


def test_a_variable_without_std_is_an_error_naming_instance_and_variable():
    plugin = CorrectorPenalty(CorrectorPenalty.Config(std={"a": 1.0}), id="ocean")
    with pytest.raises(steadytrain.ConfigError, match=r"ocean\.std: no std .* 'sea_ice'"):
        run_once(plugin, {"a": grad_ones(2), "sea_ice": grad_ones(2)})


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"loss": "relative_l2"}, r"plugins\[0\]\.loss: 'relative_l2' is a relative norm.*zero"),
        ({"loss": "msee"}, r"plugins\[0\]\.loss: must be one of .*did you mean 'mse'"),
        ({"std": {"a": -1.0}}, r"plugins\[0\]\.std: 'a': must be a positive number"),
        ({"variable_weights": {"a": -1.0}}, r"plugins\[0\]\.variable_weights: 'a': must be"),
        ({"rollout_alpha": -0.1}, r"plugins\[0\]\.rollout_alpha: must be a number >= 0"),
        ({"on_detached": "ignore"}, r"plugins\[0\]\.on_detached: must be one of"),
    ],
)
def test_bad_options_are_config_errors_with_their_path(options, message):
    with pytest.raises(steadytrain.ConfigError, match=message):
        steadytrain.load_config({"plugins": [{"plugin": "corrector_penalty", **options}]})


@pytest.mark.parametrize(
    "weight", [-0.5, {"kind": "piecewise", "boundaries": [10], "values": [0.0, -1.0]}]
)
def test_a_negative_weight_is_an_error(weight):
    with pytest.raises(steadytrain.ConfigError, match=r"plugins\[0\]\.weight: must be >= 0"):
        steadytrain.Pipeline.from_config(
            {"plugins": [{"plugin": "corrector_penalty", "id": "ocean", "weight": weight}]}
        )


def test_shapes_that_differ_between_pre_and_post_are_an_error():
    plugin = CorrectorPenalty(CorrectorPenalty.Config(std={"a": 1.0}))
    bad = Correction(grad_ones(2, 3), grad_ones(3, 2))
    with pytest.raises(CorrectionError, match=r"corrections\['a'\].*\(2, 3\) differs"):
        run_once(plugin, {"a": bad})


def test_a_mask_that_does_not_fit_is_an_error():
    plugin = CorrectorPenalty(CorrectorPenalty.Config(std={"a": 1.0}))
    bad = Correction(grad_ones(2, 3), grad_ones(2, 3), torch.ones(3, 2, dtype=torch.bool))
    with pytest.raises(CorrectionError, match=r"corrections\['a'\].*mask must be"):
        run_once(plugin, {"a": bad})


def test_an_exclusion_matching_nothing_is_an_error():
    plugin = CorrectorPenalty(CorrectorPenalty.Config(std={"a": 1.0}), exclude=["sea_ice"])
    with pytest.raises(steadytrain.FilterError, match=r"corrector_penalty\.exclude: .*'sea_ice'"):
        run_once(plugin, {"a": grad_ones(2)})


def test_filters_that_select_nothing_are_an_error():
    plugin = CorrectorPenalty(CorrectorPenalty.Config(std={"a": 1.0}), exclude=["a"])
    with pytest.raises(steadytrain.FilterError, match="select none of the corrected variables"):
        run_once(plugin, {"a": grad_ones(2)})


def test_a_variable_weight_pattern_matching_nothing_is_an_error():
    plugin = CorrectorPenalty(CorrectorPenalty.Config(std={"a": 1.0},
                                                      variable_weights={"thetao_#": 2.0}))
    with pytest.raises(steadytrain.FilterError, match=r"variable_weights\.include: .*thetao_#"):
        run_once(plugin, {"a": grad_ones(2)})


def test_missing_corrections_are_an_error_naming_the_source():
    plugin = CorrectorPenalty(CorrectorPenalty.Config(source="ocean_corrections"), id="ocean")
    pipe, _, _ = pipeline(plugin)
    pipe.before_step()
    with pytest.raises(steadytrain.ConfigError, match=r"ocean\.source: .*'ocean_corrections'"):
        pipe.compute_loss(torch.tensor(0.0), outputs={"corrections": {}})


def test_area_mse_without_weights_is_an_error():
    plugin = CorrectorPenalty(CorrectorPenalty.Config(loss="area_mse", std={"a": 1.0}))
    with pytest.raises(steadytrain.ConfigError, match=r"loss: 'area_mse' needs per-cell"):
        run_once(plugin, {"a": grad_ones(2)})


def test_an_unreadable_std_file_is_an_error(tmp_path):
    plugin = CorrectorPenalty(CorrectorPenalty.Config(std_file=str(tmp_path / "none.json")))
    with pytest.raises(steadytrain.ConfigError, match=r"corrector_penalty\.std_file: cannot"):
        pipeline(plugin)


# -- config and checkpoint -------------------------------------------------------------------


def test_configured_from_toml(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text(
        '[[plugins]]\nplugin = "corrector_penalty"\nid = "ocean"\nweight = 0.2\n'
        'loss = "l1"\nsource = "ocean_corrections"\nexclude = ["sea_ice_fraction"]\n'
        "std = { thetao_0 = 1.3, sea_ice_fraction = 0.1 }\n"
    )
    pipe = steadytrain.Pipeline.from_config(path)
    plugin = pipe.plugins["ocean"]
    assert isinstance(plugin, CorrectorPenalty)
    assert plugin.config.std == {"thetao_0": 1.3, "sea_ice_fraction": 0.1}
    pipe.setup(TinyEmulator(["a"]), total_steps=10)
    pipe.before_step()
    delta = grad_ones(4)
    total = pipe.compute_loss(None, outputs={
        "ocean_corrections": {"thetao_0": 2.6 * delta, "sea_ice_fraction": delta}})
    assert total.item() == pytest.approx(0.2 * 2.0)


def train(pipe, model, opt, steps):
    losses = []
    for _ in range(steps):
        if pipe.run.step % 3 == 0:
            pipe.epoch_start()
        losses.append(one_step(pipe, model, batch(100 + pipe.run.step)).detach())
        opt.step()
        opt.zero_grad()
        if pipe.run.step % 3 == 0:
            pipe.epoch_end()
    return losses, pipe.metrics()


def test_checkpoint_resume_is_bit_exact():
    def fresh():
        plugin = CorrectorPenalty(CorrectorPenalty.Config(std={"a": 0.5}), weight=0.4)
        return pipeline(plugin)

    pipe, model, opt = fresh()
    first, _ = train(pipe, model, opt, 4)
    saved = round_trip({"pipe": pipe.state_dict(), "model": model.state_dict(),
                        "opt": opt.state_dict()})
    rest, metrics = train(pipe, model, opt, 5)

    pipe2, model2, opt2 = fresh()
    pipe2.load_state_dict(saved["pipe"])
    model2.load_state_dict(saved["model"])
    opt2.load_state_dict(saved["opt"])
    rest2, metrics2 = train(pipe2, model2, opt2, 5)
    assert all(torch.equal(a, b) for a, b in zip(rest, rest2, strict=True))
    assert metrics2["corrector_penalty/epoch"] == metrics["corrector_penalty/epoch"]
    assert len(first) == 4


def test_loading_a_foreign_state_is_an_error():
    plugin = CorrectorPenalty(CorrectorPenalty.Config())
    with pytest.raises(steadytrain.CheckpointError, match=r"\[.shadow.\], expected \[.epoch_count"):
        plugin.load_state_dict({"shadow": torch.zeros(1)})


# -- the example -----------------------------------------------------------------------------


def test_emulator_example_runs_with_tiny_settings(tmp_path):
    path = ROOT / "examples" / "emulator" / "train.py"
    spec = importlib.util.spec_from_file_location("emulator_train", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    rows = module.main(["--tiny", "--weights", "0", "1", "--out", str(tmp_path)])
    assert [r["weight"] for r in rows] == [0.0, 1.0]
    assert all(math.isfinite(r["val_rmse"]) and r["correction"] >= 0 for r in rows)


def test_emulator_example_refuses_a_plot_without_matplotlib_before_training(
    monkeypatch, capsys
):
    path = ROOT / "examples" / "emulator" / "train.py"
    spec = importlib.util.spec_from_file_location("emulator_train", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if it were not installed
    with pytest.raises(SystemExit):
        module.main(["--tiny", "--plot", "sweep.png"])
    assert "--plot needs matplotlib: pip install 'steadytrain[plots]'" in capsys.readouterr().err


def test_later_steps_may_carry_a_subset_of_the_first_steps_variables():
    plugin = CorrectorPenalty(CorrectorPenalty.Config(std={"a": 1.0, "b": 1.0}), exclude=["b"])
    total = run_once(plugin, [{"a": grad_ones(2), "b": grad_ones(2)}, {"a": 2 * grad_ones(2)},
                              {"b": grad_ones(2)}])  # the last step selects nothing: no term
    assert total.item() == pytest.approx(1.0 + 4.0)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"loss": "relative_l2"}, "correction_losses: loss: must be one of"),
        ({"loss": "area_mse"}, "'area_mse' needs area_weights"),
    ],
)
def test_plain_function_rejects_bad_arguments(kwargs, message):
    with pytest.raises(steadytrain.ConfigError, match=message):
        corrector_penalty({"a": torch.ones(2)}, {"a": 1.0}, **kwargs)


def test_binding_an_object_without_std_is_an_error():
    with pytest.raises(steadytrain.ConfigError, match=r"corrector_penalty: bind\(normalizer=...\)"):
        CorrectorPenalty(CorrectorPenalty.Config()).bind(normalizer=object())


def test_a_std_that_is_not_a_positive_scalar_is_an_error():
    plugin = CorrectorPenalty(CorrectorPenalty.Config()).bind(
        normalizer=Normalizer({"a": torch.ones(3)}))
    with pytest.raises(steadytrain.ConfigError, match=r"normalizer's std\['a'\]: .*shape \(3,\)"):
        run_once(plugin, {"a": grad_ones(2)})


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("stats.json", "[1, 2]", "must hold a mapping of variable names to std"),
        ("stats.txt", "a = 1", "must be a .json or .pt file"),
    ],
)
def test_a_std_file_of_the_wrong_kind_is_an_error(tmp_path, name, content, message):
    (tmp_path / name).write_text(content)
    plugin = CorrectorPenalty(CorrectorPenalty.Config(std_file=str(tmp_path / name)))
    with pytest.raises(steadytrain.ConfigError, match=message):
        pipeline(plugin)


def test_area_weights_with_another_loss_or_shape_are_errors():
    plugin = CorrectorPenalty(CorrectorPenalty.Config(std={"a": 1.0}))
    plugin.bind(area_weights=torch.ones(3))
    with pytest.raises(steadytrain.ConfigError, match="only used by loss 'area_mse'"):
        run_once(plugin, {"a": grad_ones(3)})
    plugin = CorrectorPenalty(CorrectorPenalty.Config(loss="area_mse", std={"a": 1.0}))
    plugin.bind(area_weights=torch.ones(3))
    with pytest.raises(CorrectionError, match=r"area weights of shape \(3,\) do not"):
        run_once(plugin, {"a": grad_ones(2)})


@pytest.mark.parametrize(
    ("corrections", "message"),
    [
        ([torch.ones(2)], "must hold one mapping of variable → correction per forward step"),
        ({"a": [1.0, 2.0]}, "expected a Correction or a post − pre tensor, got list"),
    ],
)
def test_corrections_of_the_wrong_type_are_errors(corrections, message):
    plugin = CorrectorPenalty(CorrectorPenalty.Config(std={"a": 1.0}))
    with pytest.raises(CorrectionError, match=message):
        run_once(plugin, corrections)


# -- against the published implementation (Ai2's fme) -------------------------------------


def fme_corrector_regularization(corrections, means, stds, *, loss="mse", data_mask=None,
                                 area=None):
    """One forward step of fme's corrector regularization, written out by hand.

    Follows ai2cm/ace, fme/core/loss.py (CorrectorRegularizationConfig.build,
    WeightedMappingLoss.__call__ with weights={}, LossOutput._reduce and LossOutput.total;
    AreaWeightedMSELoss with metrics.weighted_mean) at commit 33a5a09 of
    feature/corrector-regularization, and fme/ace/stepper/single_module.py
    (TrainStepper._accumulate_loss: loss(corrections, zeros, data_mask).total()). Fields
    are (batch, lat, lon), packed on the channel dimension -3; data_mask is per sample.
    """
    names = list(corrections)
    predict = torch.stack([(corrections[n] - means[n]) / stds[n] for n in names], dim=-3)
    target = torch.stack(
        [(torch.zeros_like(corrections[n]) - means[n]) / stds[n] for n in names], dim=-3)
    weights = torch.ones(1, len(names), 1, 1, dtype=predict.dtype)
    x, y = weights * predict, weights * target
    if loss == "mse":
        per_sample = ((x - y) ** 2).mean(dim=(2, 3))
    elif loss == "l1":
        per_sample = (x - y).abs().mean(dim=(2, 3))
    else:
        w = area.expand(x.shape)
        per_sample = (((x - y) ** 2) * w).sum(dim=(2, 3)) / w.sum(dim=(2, 3))
    if data_mask is None:
        return per_sample.mean(dim=0).mean()
    ones = torch.ones(x.shape[0], dtype=x.dtype)
    mask = torch.stack([data_mask.get(n, ones) for n in names], dim=1)
    per_channel = (per_sample * mask).sum(dim=0) / mask.sum(dim=0).clamp(min=1)
    active = mask.sum(dim=0) > 0
    return per_channel[active].mean() if active.any() else per_channel.mean()


FME_MEANS = {"ts": 280.0, "q": 0.01, "ice": 0.2}
FME_STDS = {"ts": 12.0, "q": 0.004, "ice": 0.3}


def fme_fields(seed=0, batch=4):
    gen = torch.Generator().manual_seed(seed)
    return {n: (FME_MEANS[n] + 3 * FME_STDS[n] * torch.randn(batch, 6, 8, generator=gen,
                                                              dtype=torch.float64))
            .requires_grad_() for n in FME_MEANS}


def fme_corrector(fields):
    return {"ts": fields["ts"].clamp(min=275.0), "q": fields["q"].clamp(min=0.0),
            "ice": fields["ice"].clamp(0.0, 1.0)}


AREA = torch.cos(torch.linspace(-1.3, 1.3, 6, dtype=torch.float64))[:, None].expand(6, 8)


@pytest.mark.parametrize("loss", ["mse", "l1", "area_mse"])
def test_a_rollout_matches_fme_in_value_and_gradient(loss):
    steps = [fme_fields(seed) for seed in (0, 1)]
    plugin = CorrectorPenalty(CorrectorPenalty.Config(loss=loss, std=FME_STDS), weight=0.2)
    if loss == "area_mse":
        plugin.bind(area_weights=AREA)
    pipe, _, _ = pipeline(plugin)
    pipe.before_step()
    for fields in steps:
        apply_corrector(fme_corrector, fields)
    got = pipe.compute_loss(None)
    expected = sum(
        0.2 * fme_corrector_regularization(
            {n: post[n] - pre[n] for n in pre}, FME_MEANS, FME_STDS, loss=loss, area=AREA)
        for pre, post in ((f, fme_corrector(f)) for f in steps)
    )
    leaves = [f[n] for f in steps for n in f]
    torch.testing.assert_close(got, expected, rtol=1e-14, atol=0)
    for ours, theirs in zip(torch.autograd.grad(got, leaves, retain_graph=True),
                            torch.autograd.grad(expected, leaves), strict=True):
        torch.testing.assert_close(ours, theirs, rtol=1e-14, atol=1e-15)


def test_per_sample_masks_match_fmes_data_mask_and_an_all_false_mask_drops_out():
    fields = fme_fields()
    post = fme_corrector(fields)
    data_mask = {"q": torch.tensor([1.0, 0.0, 1.0, 0.0], dtype=torch.float64),
                 "ice": torch.zeros(4, dtype=torch.float64)}
    corrections = {n: Correction(fields[n], post[n], None if n not in data_mask
                                 else data_mask[n].bool()[:, None, None]) for n in fields}
    got = corrector_penalty(corrections, FME_STDS)
    expected = fme_corrector_regularization({n: post[n] - fields[n] for n in fields},
                                            FME_MEANS, FME_STDS, data_mask=data_mask)
    torch.testing.assert_close(got, expected, rtol=1e-14, atol=0)


def test_fme_averages_over_every_output_variable_and_this_penalty_over_the_corrected_ones():
    fields = fme_fields()
    post = {**fields, "ice": fields["ice"].clamp(0.0, 1.0)}  # only ice is corrected
    ours = corrector_penalty({"ice": Correction(fields["ice"], post["ice"])}, FME_STDS)
    theirs = fme_corrector_regularization({n: post[n] - fields[n] for n in fields},
                                          FME_MEANS, FME_STDS)
    torch.testing.assert_close(theirs, ours / 3, rtol=1e-14, atol=0)


# -- masks that remove a variable entirely -------------------------------------------------


def test_a_variable_masked_out_everywhere_leaves_the_mean_in_value_and_gradient():
    pre = {"a": torch.tensor([-2.0, 1.0], requires_grad=True),
           "b": torch.tensor([-1.0, float("nan")], requires_grad=True)}
    plugin = CorrectorPenalty(CorrectorPenalty.Config(std={"a": 1.0, "b": 1.0}))
    pipe, _, _ = pipeline(plugin)
    pipe.before_step()
    apply_corrector(clamp_corrector, pre, mask={"b": torch.zeros(2, dtype=torch.bool)})
    total = pipe.compute_loss(None)
    assert total.item() == pytest.approx(4.0 / 2)  # a's loss alone, not (a + 0) / 2
    total.backward()
    assert torch.equal(pre["b"].grad, torch.zeros(2))
    torch.testing.assert_close(pre["a"].grad, torch.tensor([-2.0, 0.0]))


def test_every_variable_masked_out_gives_a_zero_term_not_an_error():
    pre = torch.tensor([-2.0, float("nan")], requires_grad=True)
    plugin = CorrectorPenalty(CorrectorPenalty.Config(std={"a": 1.0}))
    pipe, _, _ = pipeline(plugin)
    pipe.before_step()
    apply_corrector(clamp_corrector, {"a": pre}, mask=torch.zeros(2, dtype=torch.bool))
    total = pipe.compute_loss(None)
    assert total.item() == 0.0
    total.backward()
    assert torch.equal(pre.grad, torch.zeros(2))


@pytest.mark.parametrize("loss", ["mse", "huber", "area_mse"])
def test_the_plain_loss_of_a_masked_out_variable_is_zero(loss):
    delta = torch.full((2, 3), 2.0, requires_grad=True)
    got = correction_losses([delta, delta], [1.0, 1.0], loss=loss, area_weights=torch.ones(3),
                            masks=[torch.zeros(3, dtype=torch.bool), None])
    assert got[0].item() == 0.0 and got[1].item() > 0


def test_a_masked_out_forward_step_leaves_the_mean_over_steps():
    plugin = CorrectorPenalty(CorrectorPenalty.Config(std={"a": 1.0}, step_reduction="mean"))
    pipe, _, _ = pipeline(plugin)
    pipe.before_step()
    values = torch.full((2,), -3.0, requires_grad=True)
    apply_corrector(clamp_corrector, {"a": values})
    apply_corrector(clamp_corrector, {"a": values}, mask=torch.zeros(2, dtype=torch.bool))
    assert pipe.compute_loss(None).item() == pytest.approx(9.0)  # not (9 + 0) / 2


# -- per-variable metrics ------------------------------------------------------------------


def test_variable_metrics_are_the_mean_over_the_steps_that_recorded_the_variable():
    plugin = CorrectorPenalty(CorrectorPenalty.Config(std={"a": 1.0, "b": 2.0},
                                                      variable_weights={"b": 3.0}), weight=0.5)
    pipe, _, _ = pipeline(plugin)

    def grad_full(value):
        return torch.full((2,), value, requires_grad=True)

    # Two optimizer steps; the set of corrected variables changes from step to step.
    rollouts = [
        [{"a": grad_full(1.0), "b": grad_full(2.0)}, {"a": grad_full(3.0)},
         {"a": grad_full(2.0), "b": grad_full(4.0)}, {"b": grad_full(6.0)}],
        [{"b": grad_full(8.0)}],
    ]
    for sets in rollouts:
        pipe.before_step()
        pipe.compute_loss(None, outputs={"corrections": sets}).backward()
        pipe.after_backward()
        pipe.consolidate()
    metrics = pipe.metrics()
    a = [1.0, 9.0, 4.0]                       # (delta / 1)²
    b = [1.0, 4.0, 9.0, 16.0]                 # (delta / 2)²
    assert metrics["corrector_penalty/var/a"] == pytest.approx(sum(a) / len(a))
    assert metrics["corrector_penalty/var/b"] == pytest.approx(sum(b) / len(b))
    assert metrics["corrector_penalty/var_weighted/b"] == pytest.approx(0.5 * 3 * sum(b) / 4)


# -- how the filters are resolved -----------------------------------------------------------


def test_patterns_are_checked_against_every_step_of_the_first_micro_batch():
    # sea_ice appears in the second forward step only: its exclusion is not an error.
    plugin = CorrectorPenalty(CorrectorPenalty.Config(std={"a": 1.0}), exclude=["sea_ice"])
    total = run_once(plugin, [{"a": grad_ones(2)}, {"a": grad_ones(2), "sea_ice": grad_ones(2)}])
    assert total.item() == pytest.approx(2.0)


def test_a_pattern_matching_only_a_later_steps_variable_is_an_error_on_the_first():
    plugin = CorrectorPenalty(CorrectorPenalty.Config(std={"a": 1.0}), exclude=["sea_ice"])
    pipe, _, _ = pipeline(plugin)
    with pytest.raises(steadytrain.FilterError, match=r"exclude: pattern 'sea_ice' matches no"):
        regularize(pipe, {"corrections": {"a": grad_ones(2)}})


def test_a_set_first_seen_later_is_resolved_with_the_same_patterns():
    plugin = CorrectorPenalty(CorrectorPenalty.Config(std={"a": 1.0, "b": 1.0, "c": 4.0}),
                              exclude=["b"])
    pipe, _, _ = pipeline(plugin)
    regularize(pipe, {"corrections": {"a": grad_ones(2), "b": grad_ones(2)}})
    # A new variable c is selected (include "*"), b stays excluded.
    later = regularize(pipe, {"corrections": {"b": grad_ones(2), "c": 2 * grad_ones(2)}})
    assert later.item() == pytest.approx(1.0 / 4)
    with pytest.raises(steadytrain.ConfigError, match=r"no std for the corrected variable 'd'"):
        regularize(pipe, {"corrections": {"d": grad_ones(2)}})


def test_a_variable_weight_pattern_matching_only_excluded_variables_is_an_error():
    plugin = CorrectorPenalty(CorrectorPenalty.Config(std={"a": 1.0, "b": 1.0},
                                                      variable_weights={"b": 2.0}),
                              exclude=["b"])
    with pytest.raises(steadytrain.FilterError,
                       match=r"variable_weights\.include: pattern 'b' matches no selected"):
        run_once(plugin, {"a": grad_ones(2), "b": grad_ones(2)})


# -- more bad input --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: record_corrections([torch.ones(1)], {"a": torch.ones(1)}),
         r"record_corrections: pre must be a mapping .* got list"),
        (lambda: apply_corrector(lambda f: [f["a"]], {"a": torch.ones(1)}),
         r"apply_corrector: the corrector .* must return a mapping .* got list"),
        (lambda: corrector_penalty({"a": torch.ones(1)}, {"b": 1.0}),
         r"corrector_penalty: no std for a"),
        (lambda: correction_losses([torch.ones(1)], [1.0, 2.0]),
         r"correction_losses: 1 corrections but 2 std values"),
    ],
)
def test_bad_arguments_to_the_functions_are_errors_naming_them(call, message):
    with pytest.raises(steadytrain.SteadytrainError, match=message):
        call()


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        (Correction([1.0], grad_ones(1)), r"corrections\['a'\].*Correction\.pre must be a tensor"),
        (torch.ones(2, dtype=torch.int64), r"corrections\['a'\].*must be floating point"),
        (Correction(grad_ones(2), grad_ones(2), [True, False]),
         r"corrections\['a'\].*mask must be a boolean tensor"),
    ],
)
def test_recorded_entries_of_the_wrong_kind_are_errors_naming_the_variable(entry, message):
    plugin = CorrectorPenalty(CorrectorPenalty.Config(std={"a": 1.0}), id="ocean")
    with pytest.raises(CorrectionError, match=r"ocean: " + message):
        run_once(plugin, {"a": entry})


def test_binding_area_weights_that_are_not_a_float_tensor_is_an_error():
    with pytest.raises(steadytrain.ConfigError, match=r"ocean: bind\(area_weights=...\) needs"):
        CorrectorPenalty(CorrectorPenalty.Config(), id="ocean").bind(area_weights=[1.0, 2.0])


def test_a_checkpoint_state_of_the_wrong_kind_is_an_error():
    plugin = CorrectorPenalty(CorrectorPenalty.Config(), id="ocean")
    with pytest.raises(steadytrain.CheckpointError, match=r"'ocean'.*epoch_sum must be a tensor"):
        plugin.load_state_dict({"epoch_sum": torch.zeros(3), "epoch_count": 1})
