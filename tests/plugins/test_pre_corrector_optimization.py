import copy
import re
from pathlib import Path

import pytest
import torch

import steadytrain
from steadytrain.plugins.corrector_penalty import (
    Correction,
    CorrectionError,
    CorrectorPenalty,
    apply_corrector,
    corrector_penalty,
)
from steadytrain.plugins.pre_corrector_optimization import (
    PreCorrectorOptimization,
    uncorrected_fields,
)

ROOT = Path(__file__).resolve().parents[2]
NAMES = ("thetao_0", "thetao_1", "sea_ice_fraction", "zos")
STD = {"thetao_0": 2.0, "thetao_1": 1.5, "sea_ice_fraction": 0.3, "zos": 0.5}


def ocean_corrector(fields):
    """Clamps like ACE's ocean corrector: temperatures above freezing, ice in [0, 1]; zos
    passes through untouched (the same tensor object), so it is never recorded."""
    out = dict(fields)
    for name in ("thetao_0", "thetao_1"):
        out[name] = fields[name].clamp(min=-0.5)
    out["sea_ice_fraction"] = fields["sea_ice_fraction"].clamp(0.0, 1.0)
    return out


class Ocean(torch.nn.Module):
    """One (batch, 5) field per variable, passed through the corrector; a rollout feeds
    the corrected fields back."""

    def __init__(self, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.net = torch.nn.Sequential(
            torch.nn.Linear(4, 32), torch.nn.Tanh(), torch.nn.Linear(32, 5 * len(NAMES)))

    def raw(self, x):
        out = 2 * self.net(x).view(x.shape[0], len(NAMES), 5)
        return {name: out[:, i] for i, name in enumerate(NAMES)}

    def forward(self, x, steps=1):
        outputs = []
        for _ in range(steps):
            fields = apply_corrector(ocean_corrector, self.raw(x))
            outputs.append(fields)
            x = x + torch.stack([fields[n] for n in NAMES], 1).mean((1, 2))[:, None]
        return outputs


def normalized_mse(fields, targets):
    """The host's task loss: per-variable MSE in std units, averaged over variables (as
    fme's StepLoss does)."""
    return torch.stack([((fields[n] - targets[n]) / STD[n]).pow(2).mean() for n in NAMES]).mean()


def data(seed=1, n=8):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, generator=gen)
    targets = {name: torch.rand(n, 5, generator=gen) for name in NAMES}
    return x, targets


def pipeline(*plugins, model=None):
    model = model or Ocean()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    return steadytrain.Pipeline(list(plugins)).setup(model, opt, total_steps=10), model


def pre_corrector(**settings):
    return PreCorrectorOptimization(PreCorrectorOptimization.Config(), **settings)


def fme_loss_fields(output, uncorrected, excluded):
    """fme's loss input with pre-corrector optimization, by hand: ai2cm/ace,
    fme/ace/stepper/single_module.py (TrainStepper._accumulate_loss and
    PreCorrectorOptimizationConfig.select_precorrected, commit 046a3f8)."""
    return {**output, **{k: v for k, v in uncorrected.items() if k not in excluded}}


def reference_step(model, x, targets, excluded, steps=1):
    """The task loss on the pre-corrector values of every corrected, non-excluded
    variable, built without the pipeline; its gradients."""
    model = copy.deepcopy(model)
    total = 0.0
    for _ in range(steps):
        raw = model.raw(x)
        corrected = ocean_corrector(raw)
        uncorrected = {n: raw[n] for n in corrected if corrected[n] is not raw[n]}
        total = total + normalized_mse(fme_loss_fields(corrected, uncorrected, excluded), targets)
        x = x + torch.stack([corrected[n] for n in NAMES], 1).mean((1, 2))[:, None]
    total.backward()
    return total, [p.grad for p in model.parameters()]


def pipeline_step(pipe, model, x, targets, steps=1):
    plugin = next(p for p in pipe.plugins.values() if isinstance(p, PreCorrectorOptimization))
    pipe.before_step()
    task = sum(normalized_mse(plugin.for_loss(fields), targets) for fields in model(x, steps))
    loss = pipe.compute_loss(task)
    loss.backward()
    pipe.after_backward()
    pipe.consolidate()
    return loss, [p.grad for p in model.parameters()]


# -- the relation to the host's loss ---------------------------------------------------------


@pytest.mark.parametrize("steps", [1, 3])
def test_the_task_loss_and_gradients_are_those_of_the_uncorrected_prediction(steps):
    x, targets = data()
    pipe, model = pipeline(pre_corrector(exclude=["sea_ice_fraction"]))
    expected, expected_grads = reference_step(model, x, targets, {"sea_ice_fraction"}, steps)
    loss, grads = pipeline_step(pipe, model, x, targets, steps)
    torch.testing.assert_close(loss, expected, rtol=0, atol=0)
    for got, want in zip(grads, expected_grads, strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    # ... and differ from those of the corrected prediction, which the host would get alone.
    _, corrected_grads = reference_step(model, x, targets, set(NAMES), steps)
    assert not torch.allclose(grads[0], corrected_grads[0])


def test_the_selected_variables_get_the_gradient_of_the_loss_on_their_raw_values():
    gen = torch.Generator().manual_seed(0)
    raw = {n: torch.randn(3, 5, generator=gen, requires_grad=True) for n in NAMES}
    targets = {n: torch.rand(3, 5, generator=gen) for n in NAMES}
    pipe, _ = pipeline(pre_corrector(exclude=["sea_ice_fraction"]))
    plugin = pipe.plugins["pre_corrector_optimization"]
    pipe.before_step()
    fields = apply_corrector(ocean_corrector, raw)
    pipe.compute_loss(normalized_mse(plugin.for_loss(fields), targets)).backward()
    reference = {n: raw[n].detach().clone().requires_grad_() for n in NAMES}
    ice = reference["sea_ice_fraction"].clamp(0.0, 1.0)
    normalized_mse({**reference, "sea_ice_fraction": ice}, targets).backward()
    for name in NAMES:
        torch.testing.assert_close(raw[name].grad, reference[name].grad, rtol=0, atol=0)
    # The clamp would have cut the temperatures' gradient where it is active.
    clamped = fields["thetao_0"].detach() != raw["thetao_0"].detach()
    assert clamped.any() and (raw["thetao_0"].grad[clamped] != 0).all()


def test_gradient_accumulation_gives_the_full_batch_gradients():
    x, targets = data(n=8)
    pipe, model = pipeline(pre_corrector(exclude=["sea_ice_fraction"]))
    _, expected = reference_step(model, x, targets, {"sea_ice_fraction"})
    plugin = pipe.plugins["pre_corrector_optimization"]
    for i, rows in enumerate(torch.arange(8).chunk(2)):
        pipe.before_step(micro_batch=i, num_micro_batches=2)
        (fields,) = model(x[rows])
        chunk = {n: t[rows] for n, t in targets.items()}
        pipe.compute_loss(normalized_mse(plugin.for_loss(fields), chunk)).backward()
    pipe.after_backward()
    pipe.consolidate()
    for p, want in zip(model.parameters(), expected, strict=True):
        torch.testing.assert_close(p.grad, want)


def test_combined_with_the_penalty_on_the_same_records():
    x, targets = data()
    penalty = CorrectorPenalty(CorrectorPenalty.Config(std=STD), weight=0.3)
    pipe, model = pipeline(pre_corrector(exclude=["sea_ice_fraction"]), penalty)
    reference = copy.deepcopy(model)
    raw = reference.raw(x)
    corrected = ocean_corrector(raw)
    recorded = {n: Correction(raw[n], corrected[n]) for n in NAMES if corrected[n] is not raw[n]}
    expected = (normalized_mse({**corrected, "thetao_0": raw["thetao_0"],
                                "thetao_1": raw["thetao_1"]}, targets)
                + 0.3 * corrector_penalty(recorded, STD))
    expected.backward()
    loss, grads = pipeline_step(pipe, model, x, targets)
    torch.testing.assert_close(loss, expected, rtol=0, atol=0)
    for got, want in zip(grads, (p.grad for p in reference.parameters()), strict=True):
        torch.testing.assert_close(got, want)


def test_for_loss_returns_fmes_loss_input_and_the_plain_function_agrees():
    raw = dict(zip(NAMES, torch.randn(len(NAMES), 2, 3).unbind(), strict=True))
    pipe, _ = pipeline(pre_corrector(exclude=["sea_ice_*"]))
    plugin = pipe.plugins["pre_corrector_optimization"]
    pipe.before_step()
    corrected = apply_corrector(ocean_corrector, raw)
    got = plugin.for_loss(corrected)
    uncorrected = {n: raw[n] for n in corrected if corrected[n] is not raw[n]}
    expected = fme_loss_fields(corrected, uncorrected, {"sea_ice_fraction"})
    assert list(got) == list(corrected)
    assert all(got[n] is expected[n] for n in NAMES)
    recorded = {n: Correction(raw[n], corrected[n]) for n in uncorrected}
    plain = uncorrected_fields(corrected, recorded, ["thetao_0", "thetao_1"])
    assert all(plain[n] is expected[n] for n in NAMES)


def test_corrections_given_by_the_host_replace_by_name():
    raw = {n: torch.randn(2, 3, requires_grad=True) for n in NAMES}
    corrected = ocean_corrector(raw)
    corrections = {n: Correction(raw[n], corrected[n]) for n in ("thetao_0", "sea_ice_fraction")}
    adjusted = {**corrected, "thetao_0": corrected["thetao_0"] + 1}  # changed after the corrector
    pipe, _ = pipeline(pre_corrector(include=["thetao_#"]))
    plugin = pipe.plugins["pre_corrector_optimization"]
    pipe.before_step()
    got = plugin.for_loss(adjusted, corrections=corrections)
    assert got["thetao_0"] is raw["thetao_0"] and got["sea_ice_fraction"] is adjusted[
        "sea_ice_fraction"]
    pipe.compute_loss(normalized_mse(got, corrected)).backward()
    pipe.after_backward()
    pipe.consolidate()
    assert pipe.metrics()["pre_corrector_optimization/variables"] == 1.0


def test_outside_a_training_step_the_fields_are_returned_unchanged():
    x, _ = data()
    pipe, model = pipeline(pre_corrector())
    plugin = pipe.plugins["pre_corrector_optimization"]
    with pipe.evaluating(), torch.no_grad():
        (fields,) = model(x)
        got = plugin.for_loss(fields)
    assert got == fields and got is not fields


def test_the_metric_counts_the_variables_trained_on_their_raw_values():
    x, targets = data()
    pipe, model = pipeline(pre_corrector(exclude=["sea_ice_fraction"]))
    for _ in range(2):
        pipeline_step(pipe, model, x, targets, steps=2)
    assert pipe.metrics()["pre_corrector_optimization/variables"] == 2.0


def test_configured_from_toml_next_to_the_penalty(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text(
        '[[plugins]]\nplugin = "pre_corrector_optimization"\nexclude = ["sea_ice_fraction"]\n\n'
        '[[plugins]]\nplugin = "corrector_penalty"\nweight = 0.2\n'
        "std = { thetao_0 = 2.0, thetao_1 = 1.5, sea_ice_fraction = 0.3 }\n"
    )
    pipe = steadytrain.Pipeline.from_config(path)
    assert isinstance(pipe.plugins["pre_corrector_optimization"], PreCorrectorOptimization)
    assert pipe.plugins["pre_corrector_optimization"].filter.exclude == ("sea_ice_fraction",)


# -- bad input ---------------------------------------------------------------------------------


def test_a_task_loss_not_built_on_for_loss_is_an_error():
    x, targets = data()
    pipe, model = pipeline(pre_corrector(id="pre"))
    pipe.before_step()
    (fields,) = model(x)
    with pytest.raises(CorrectionError, match=r"pre: the corrector changed thetao_0, thetao_1, "
                                              r"sea_ice_fraction .*would do nothing"):
        pipe.compute_loss(normalized_mse(fields, targets))


def test_a_field_changed_after_the_corrector_is_an_error_naming_it():
    x, _ = data()
    pipe, model = pipeline(pre_corrector(id="pre"))
    plugin = pipe.plugins["pre"]
    pipe.before_step()
    (fields,) = model(x)
    with pytest.raises(CorrectionError, match=r"pre\.for_loss: fields\['thetao_1'\] is not the "
                                              r"corrector's output .*forward step 0"):
        plugin.for_loss({**fields, "thetao_1": fields["thetao_1"] * 2})


def test_a_weight_is_an_error():
    with pytest.raises(steadytrain.ConfigError, match=r"pre\.weight: .*adds no term"):
        steadytrain.Pipeline.from_config(
            {"plugins": [{"plugin": "pre_corrector_optimization", "id": "pre", "weight": 0.5}]})


@pytest.mark.parametrize(
    ("fields", "corrections", "message"),
    [
        ([torch.ones(2)], None, r"pre\.for_loss: fields must be a mapping .* got list"),
        ({"thetao_0": torch.ones(2)}, [torch.ones(2)],
         r"pre\.for_loss: corrections must be a mapping .* got list"),
        ({"thetao_0": torch.ones(2)}, {"thetao_0": torch.ones(2)},
         r"pre\.for_loss: corrections\['thetao_0'\] must be a Correction"),
        ({"thetao_0": torch.ones(2)}, {"thetao_0": Correction(torch.ones(3), torch.ones(3))},
         r"pre\.for_loss: corrections\['thetao_0'\]\.pre has shape \(3,\) but"),
    ],
)
def test_bad_arguments_to_for_loss_are_errors(fields, corrections, message):
    pipe, _ = pipeline(pre_corrector(id="pre"))
    pipe.before_step()
    with pytest.raises(CorrectionError, match=message):
        pipe.plugins["pre"].for_loss(fields, corrections=corrections)


def test_missing_corrections_are_an_error_naming_the_source():
    pipe, _ = pipeline(PreCorrectorOptimization(
        PreCorrectorOptimization.Config(source="ocean_corrections"), id="pre"))
    pipe.before_step()
    with pytest.raises(steadytrain.ConfigError, match=r"pre\.source: no output 'ocean_"):
        pipe.compute_loss(torch.tensor(1.0, requires_grad=True))


@pytest.mark.parametrize(
    ("filters", "error"),
    [
        ({"exclude": ["sea_ice"]}, r"pre\.exclude: pattern 'sea_ice' matches no corrected"),
        ({"include": ["zos"]}, r"pre\.include: pattern 'zos' matches no corrected"),
        ({"exclude": ["*"]}, r"pre: include \['\*'\] and exclude \['\*'\] select none"),
    ],
)
def test_filters_that_match_or_select_nothing_are_errors(filters, error):
    x, targets = data()
    pipe, model = pipeline(pre_corrector(id="pre", **filters))
    with pytest.raises(steadytrain.FilterError, match=error):
        pipeline_step(pipe, model, x, targets)


def test_corrections_that_are_not_mappings_are_an_error():
    pipe, _ = pipeline(pre_corrector(id="pre"))
    pipe.before_step()
    with pytest.raises(CorrectionError, match=r"pre: outputs\['corrections'\] must hold one"):
        pipe.compute_loss(torch.tensor(1.0, requires_grad=True),
                          outputs={"corrections": [torch.ones(2)]})


def test_the_documented_loop_runs():
    text = (ROOT / "docs" / "pre_corrector_optimization.md").read_text(encoding="utf-8")
    (loop,) = re.findall(r"```python\n(.*?)```", text, flags=re.DOTALL)
    namespace: dict = {}
    exec(compile(loop, "pre_corrector_optimization.md", "exec"), namespace)
    assert namespace["pipe"].run.step == 10
    assert namespace["pipe"].metrics()["pre_corrector_optimization/variables"] == 2.0
