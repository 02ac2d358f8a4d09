import contextlib
import copy
import math
import re
import tomllib
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from expect import raises
from helpers import round_trip

import steadytrain
from steadytrain import CheckpointError, ConfigError, FilterError, Pipeline
from steadytrain.plugins.distillation.hidden_alignment import COLLAPSE_WARNING, HiddenAlignment

ROOT = Path(__file__).resolve().parents[2]


def states(seed=0, layers=3, shape=(2, 5, 8)):
    gen = torch.Generator().manual_seed(seed)
    student = [torch.randn(*shape, generator=gen, dtype=torch.float64).requires_grad_()
               for _ in range(layers)]
    teacher = [torch.randn(*shape, generator=gen, dtype=torch.float64) for _ in range(layers)]
    return student, teacher


def by_hand(student, teacher, a=0.8, b=0.2):
    """a·MSE + b·(1 − mean cosine over tokens), per layer."""
    return torch.stack([a * F.mse_loss(s, t) + b * (1 - F.cosine_similarity(s, t, dim=-1).mean())
                        for s, t in zip(student, teacher, strict=True)])


def set_up(plugin, model=None, optimizer=None):
    pipe = Pipeline([plugin])
    pipe.setup(model if model is not None else torch.nn.Linear(2, 2), optimizer)
    return pipe


def step(pipe, outputs=None, batch=None):
    pipe.before_step(batch=batch)
    loss = pipe.compute_loss(None, outputs=outputs)
    pipe.after_backward()
    pipe.consolidate()
    return loss


def aligned(student, teacher):
    return {"hidden_states": student, "teacher_hidden_states": teacher}


def quiet(config=None, **settings):
    """A HiddenAlignment instance; weighting 'softmax' must warn."""
    softmax = config is not None and config.weighting == "softmax"
    with pytest.warns(UserWarning) if softmax else contextlib.nullcontext():
        return HiddenAlignment(config, **settings)


# -- the loss -------------------------------------------------------------------------------


def test_the_term_is_the_mean_over_layers_of_mse_and_cosine_in_value_and_gradient():
    student, teacher = states()
    pipe = set_up(HiddenAlignment())
    got = step(pipe, aligned(student, teacher))
    expected = by_hand(student, teacher).mean()
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=0)
    ours = torch.autograd.grad(got, student)
    theirs = torch.autograd.grad(expected, student)
    for mine, reference in zip(ours, theirs, strict=True):
        torch.testing.assert_close(mine, reference, rtol=1e-10, atol=1e-14)
    metrics = pipe.metrics()
    for i, (s, t) in enumerate(zip(student, teacher, strict=True)):
        assert metrics[f"hidden_alignment/mse/{i}"] == pytest.approx(F.mse_loss(s, t).item())
        assert metrics[f"hidden_alignment/cosine/{i}"] == pytest.approx(
            F.cosine_similarity(s, t, dim=-1).mean().item())
        assert metrics[f"hidden_alignment/weight/{i}"] == pytest.approx(1 / 3)


def test_the_cosine_is_per_token_so_scaled_tokens_are_aligned_in_direction():
    teacher = torch.randn(2, 5, 8, dtype=torch.float64)
    scale = torch.rand(2, 5, 1, dtype=torch.float64) + 0.5  # another scale for every token
    student = (teacher * scale).requires_grad_()
    plugin = HiddenAlignment(HiddenAlignment.Config(mse_weight=0.0, cosine_weight=1.0))
    assert step(set_up(plugin), aligned([student], [teacher])).item() == pytest.approx(0, abs=1e-12)
    flat_cosine = F.cosine_similarity(student.flatten(), teacher.flatten(), dim=0)
    assert flat_cosine < 1 - 1e-3  # over the whole tensor they are not aligned


def test_the_magnitude_loss_is_taken_by_name_from_the_registry():
    student, teacher = states()
    plugin = HiddenAlignment(HiddenAlignment.Config(loss="huber", loss_options={"delta": 0.5},
                                                    mse_weight=1.0, cosine_weight=0.0))
    pipe = set_up(plugin)
    got = step(pipe, aligned(student, teacher))
    expected = torch.stack([F.huber_loss(s, t, delta=0.5) for s, t in
                            zip(student, teacher, strict=True)]).mean()
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=0)
    assert "hidden_alignment/huber/0" in pipe.metrics()


def test_decay_weights_layer_i_by_d_to_the_i_normalized():
    student, teacher = states(layers=4)
    plugin = HiddenAlignment(HiddenAlignment.Config(weighting="decay", decay=0.85))
    got = step(set_up(plugin), aligned(student, teacher))
    factors = torch.tensor([0.85**i for i in range(4)], dtype=torch.float64)
    torch.testing.assert_close(got, (factors * by_hand(student, teacher)).sum() / factors.sum())


def test_layers_are_selected_by_name_with_include_and_exclude():
    student, teacher = states(layers=4)
    pipe = set_up(HiddenAlignment(exclude=["0", "3"]))
    got = step(pipe, aligned(student, teacher))
    torch.testing.assert_close(got, by_hand(student[1:3], teacher[1:3]).mean())
    assert "hidden_alignment/mse/0" not in pipe.metrics()


def test_mappings_are_paired_by_name():
    student, teacher = states()
    names = ["embed", "block_0", "block_1"]
    pipe = set_up(HiddenAlignment(include=["block_*"]))
    got = step(pipe, aligned(dict(zip(names, student, strict=True)),
                             dict(zip(names, teacher, strict=True))))
    torch.testing.assert_close(got, by_hand(student[1:], teacher[1:]).mean())
    assert "hidden_alignment/cosine/block_1" in pipe.metrics()


def test_reported_hidden_states_build_the_list_of_layers():
    student, teacher = states()
    pipe = set_up(HiddenAlignment())
    pipe.before_step()
    for s in student:
        steadytrain.report("hidden_states", s)
    got = pipe.compute_loss(None, outputs={"teacher_hidden_states": teacher})
    torch.testing.assert_close(got, by_hand(student, teacher).mean())


# -- learnable weights ------------------------------------------------------------------------


def learnable(weighting, layers=3, **settings):
    config = HiddenAlignment.Config(weighting=weighting, layers=tuple(map(str, range(layers))))
    return quiet(config, **settings)


def test_uncertainty_weighting_is_kendalls_formula_and_its_parameters_are_the_pipelines():
    student, teacher = states()
    plugin = learnable("uncertainty")
    pipe = set_up(plugin)
    (log_variances,) = list(pipe.parameters())
    with torch.no_grad():
        log_variances.copy_(torch.tensor([0.5, -1.0, 2.0]))
    got = step(pipe, aligned(student, teacher))
    losses = by_hand(student, teacher)
    s = log_variances.detach().double()
    torch.testing.assert_close(got, (torch.exp(-s) * losses + s).sum(), rtol=1e-6, atol=0)
    (grad,) = torch.autograd.grad(got, log_variances)
    torch.testing.assert_close(grad, (1 - torch.exp(-s) * losses.detach()).float())


def optimize(pipe, student, teacher, steps, lr, extra=()):
    optimizer = torch.optim.Adam([*pipe.parameters(), *extra], lr=lr)
    pipe.run.optimizers = (optimizer,)
    for _ in range(steps):
        pipe.before_step()
        pipe.compute_loss(None, outputs=aligned(list(student), teacher)).backward()
        steadytrain.step_optimizer(optimizer, pipe.after_backward())
        pipe.consolidate()
        optimizer.zero_grad()


def test_uncertainty_weights_settle_at_the_log_of_each_layer_loss():
    student, teacher = states()
    student = [s.detach() for s in student]
    pipe = set_up(learnable("uncertainty"))
    optimize(pipe, student, teacher, steps=300, lr=0.05)
    (log_variances,) = list(pipe.parameters())
    torch.testing.assert_close(log_variances.detach(),
                               by_hand(student, teacher).log().float(), atol=0.02, rtol=0)


def train_student(weighting, steps=150):
    """Free student states of three layers whose teachers differ in scale (RMS 1.0, 0.3,
    2.0), trained by SGD (lr 10) jointly with the layer weights (Adam, lr 0.1); the final
    MSE of each layer relative to its start, the final factors and the plugin."""
    gen = torch.Generator().manual_seed(0)
    teacher = [scale * torch.randn(4, 6, 8, generator=gen) for scale in (1.0, 0.3, 2.0)]
    student = [torch.nn.Parameter(0.1 * torch.randn(4, 6, 8, generator=gen)) for _ in teacher]
    plugin = HiddenAlignment() if weighting == "uniform" else learnable(weighting)
    pipe = set_up(plugin)
    optimizers = [torch.optim.SGD(student, lr=10.0)]
    if plugin.parameters():
        optimizers.append(torch.optim.Adam(plugin.parameters(), lr=0.1))
    pipe.run.optimizers = tuple(optimizers)
    start = [F.mse_loss(s, t).item() for s, t in zip(student, teacher, strict=True)]
    for _ in range(steps):
        pipe.before_step()
        pipe.compute_loss(None, outputs=aligned(list(student), teacher)).backward()
        outcome = pipe.after_backward()
        for optimizer in optimizers:
            steadytrain.step_optimizer(optimizer, outcome)
            optimizer.zero_grad()
        pipe.consolidate()
    step(pipe, aligned(list(student), teacher))
    metrics = pipe.metrics()
    mse = [metrics[f"hidden_alignment/mse/{i}"] / start[i] for i in range(3)]
    weights = [metrics[f"hidden_alignment/weight/{i}"] for i in range(3)]
    return mse, weights, plugin


def test_learnable_softmax_weights_collapse_onto_the_easiest_layer():
    mse, weights, plugin = train_student("softmax")
    assert weights[1] > 0.9  # layer 1 has the smallest loss from the start
    assert plugin.parameters()[1].exp().item() < 0.5  # its temperature heads for 0
    uniform, _, _ = train_student("uniform")
    for layer in (0, 2):  # the other layers are left far less aligned
        assert mse[layer] > 3 * uniform[layer]
    assert max(uniform) < 0.15


def test_choosing_softmax_weighting_warns_of_the_collapse():
    with pytest.warns(UserWarning, match=re.escape(COLLAPSE_WARNING)):
        steadytrain.Pipeline.from_config({"plugins": [
            {"plugin": "hidden_alignment", "weighting": "softmax", "layers": ["0"]}]})


def test_learnable_weights_outside_every_optimizer_are_an_error():
    student, teacher = states()
    model = torch.nn.Linear(2, 2)
    pipe = set_up(learnable("uncertainty", id="align"), model,
                  torch.optim.SGD(model.parameters(), lr=0.1))
    with raises(ConfigError, "align.weighting: the learnable layer weights of 'uncertainty' "
                "are in none of the optimizers", "optimizer.add_param_group"):
        step(pipe, aligned(student, teacher))


def test_learnable_weights_added_after_setup_are_accepted():
    student, teacher = states()
    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    pipe = set_up(learnable("uncertainty"), model, optimizer)
    optimizer.add_param_group({"params": list(pipe.parameters()), "weight_decay": 0.0})
    step(pipe, aligned(student, teacher))


@pytest.mark.parametrize("weighting", ["uncertainty", "softmax"])
def test_learnable_weights_are_checkpointed(weighting):
    student, teacher = states()
    pipe = set_up(learnable(weighting))
    optimize(pipe, [s.detach() for s in student], teacher, steps=5, lr=0.1)
    trained = [p.detach().clone() for p in pipe.parameters()]
    state = round_trip(pipe.state_dict())
    resumed = Pipeline([learnable(weighting)])
    resumed.load_state_dict(state)
    resumed.setup(torch.nn.Linear(2, 2), None)
    for mine, saved in zip(resumed.parameters(), trained, strict=True):
        torch.testing.assert_close(mine.detach(), saved)
    assert not torch.equal(trained[0], torch.zeros_like(trained[0]))


def test_a_checkpoint_for_other_layers_is_refused():
    pipe = set_up(learnable("uncertainty"))
    state = pipe.state_dict()
    other = set_up(learnable("uncertainty", layers=4, id="hidden_alignment"))
    with raises(CheckpointError, "'hidden_alignment'", "log_variances is not a tensor of shape "
                "(4,)"):
        other.load_state_dict(state)


# -- taps and a bound teacher ------------------------------------------------------------------


class Tower(torch.nn.Module):
    def __init__(self, width=8, depth=3):
        super().__init__()
        torch.manual_seed(0)
        self.embed = torch.nn.Linear(4, width)
        self.blocks = torch.nn.ModuleList(
            torch.nn.Sequential(torch.nn.Linear(width, width), torch.nn.Tanh())
            for _ in range(depth))

    def hidden(self, x):
        h, out = self.embed(x), []
        for block in self.blocks:
            h = block(h)
            out.append(h)
        return out

    def forward(self, x):
        return self.hidden(x)[-1]


def student_and_teacher():
    student = Tower()
    teacher = copy.deepcopy(student).requires_grad_(False).eval()
    with torch.no_grad():
        student.blocks[1][0].weight.mul_(1.5)
    return student, teacher


def test_taps_on_the_student_and_a_bound_teacher_match_the_hidden_states():
    student, teacher = student_and_teacher()
    plugin = HiddenAlignment(HiddenAlignment.Config(
        student_taps=("blocks.?",), teacher_taps=("blocks.?",)))
    pipe = set_up(plugin.bind(teacher=teacher), student)
    x = torch.randn(3, 5, 4)
    pipe.before_step(batch=x)
    student(x)
    got = pipe.compute_loss(None)
    torch.testing.assert_close(got, by_hand(student.hidden(x), teacher.hidden(x)).mean())
    got.backward()
    assert all(p.grad is None for p in teacher.parameters())
    assert student.blocks[1][0].weight.grad.abs().sum() > 0
    pipe.after_backward()
    pipe.consolidate()
    metrics = pipe.metrics()
    assert metrics["hidden_alignment/mse/blocks.0"] == pytest.approx(0.0, abs=1e-12)
    assert metrics["hidden_alignment/mse/blocks.1"] > 0


def test_the_teachers_taps_capture_only_the_plugins_own_runs():
    student, teacher = student_and_teacher()
    plugin = HiddenAlignment(HiddenAlignment.Config(
        student_taps=("blocks.?",), teacher_taps=("blocks.?",))).bind(teacher=teacher)
    pipe = set_up(plugin, student)
    x = torch.randn(3, 5, 4)
    teacher(x)  # the host evaluating its teacher, outside any step
    pipe.before_step(batch=x)
    student(x)
    teacher(x)  # and inside one
    torch.testing.assert_close(pipe.compute_loss(None),
                               by_hand(student.hidden(x), teacher.hidden(x)).mean())


def test_taps_of_a_module_returning_a_tuple_take_tap_element():
    class Pair(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.block = torch.nn.Linear(4, 4)

        def forward(self, x):
            h = self.block(x)
            return h, h.sum()

    class Wrapped(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.layer = Pair()

        def forward(self, x):
            return self.layer(x)[0]

    model = Wrapped()
    x = torch.randn(2, 4)
    plugin = HiddenAlignment(HiddenAlignment.Config(student_taps=("layer",), tap_element=0))
    pipe = set_up(plugin, model)
    pipe.before_step()
    h = model(x)
    teacher = torch.zeros(2, 4)
    got = pipe.compute_loss(None, outputs={"teacher_hidden_states": [teacher]})
    torch.testing.assert_close(got, by_hand([h], [teacher]).mean())


# -- curriculum --------------------------------------------------------------------------------


def test_the_sources_curriculum_runs_from_zero_and_cosine_warmup_with_start_gives_its_intent():
    warmup = 100
    source = [0.5 * (1 + math.cos(math.pi * (1 - step / warmup))) for step in range(warmup + 1)]
    schedule = steadytrain.schedules.CosineWarmup(value=1.0, warmup_steps=warmup)
    for step_index, value in enumerate(source):
        assert schedule(step_index, None) == pytest.approx(value, abs=1e-12)
    assert source[0] == 0.0  # not 0.5, as the source's text says
    intended = steadytrain.schedules.CosineWarmup(value=1.0, warmup_steps=warmup, start=0.5)
    assert intended(0, None) == 0.5 and intended(warmup, None) == 1.0


def test_a_weight_schedule_is_a_curriculum_on_the_alignment():
    student, teacher = states()
    pipe = Pipeline.from_config({"plugins": [{"plugin": "hidden_alignment", "weight": {
        "kind": "cosine_warmup", "start": 0.5, "value": 1.0, "warmup_steps": 4}}]})
    pipe.setup(torch.nn.Linear(2, 2), None)
    expected = by_hand(student, teacher).mean()
    for factor in (0.5, 0.5 + 0.5 * (1 - math.cos(math.pi / 4)) / 2):
        torch.testing.assert_close(step(pipe, aligned(student, teacher)), factor * expected)


def distillation_page_snippets():
    page = (ROOT / "docs" / "distillation.md").read_text()
    return re.findall(r"```toml\n(.*?)```", page, flags=re.DOTALL)


@pytest.mark.parametrize("index", range(len(distillation_page_snippets())))
def test_the_config_snippets_of_the_distillation_page_load(index):
    snippet = distillation_page_snippets()[index]
    softmax = 'weighting = "softmax"' in snippet
    with pytest.warns(UserWarning) if softmax else contextlib.nullcontext():
        Pipeline.from_config(tomllib.loads(snippet))


# -- bad input --------------------------------------------------------------------------------


def test_lists_of_different_lengths_are_an_error_naming_both_sources():
    student, teacher = states()
    with raises(ConfigError, "align: the student has 3 hidden-state layers "
                "(outputs['hidden_states']) and the teacher 2 "
                "(outputs['teacher_hidden_states'])", "paired by position"):
        step(set_up(HiddenAlignment(id="align")), aligned(student, teacher[:2]))


def test_states_of_different_shapes_are_an_error_naming_the_layer():
    student, teacher = states()
    teacher[1] = teacher[1][..., :6]
    with raises(ConfigError, "align: layer '1': the student's hidden states have shape "
                "(2, 5, 8) and the teacher's (2, 5, 6)"):
        step(set_up(HiddenAlignment(id="align")), aligned(student, teacher))


def test_mappings_with_other_names_are_an_error():
    student, teacher = states(layers=2)
    with raises(ConfigError, "align: the student's layers are ['a', 'b'] and the teacher's "
                "['a', 'c']"):
        step(set_up(HiddenAlignment(id="align")),
             aligned(dict(zip("ab", student, strict=True)), dict(zip("ac", teacher,
                                                                     strict=True))))


@pytest.mark.parametrize(
    ("value", "problem"),
    [(torch.zeros(3), "must be a list of hidden states (one per layer) or a mapping"),
     ([torch.zeros(2, 3, dtype=torch.int64)], "outputs['hidden_states'][0] must be a "
      "floating-point tensor of hidden states")],
)
def test_states_that_are_not_lists_of_float_tensors_are_an_error(value, problem):
    with raises(ConfigError, "align.student_key: ", problem):
        step(set_up(HiddenAlignment(id="align")), aligned(value, states()[1]))


def test_a_teacher_that_requires_grad_is_an_error_naming_the_instance():
    teacher = Tower().eval()
    with raises(ConfigError, "align: the teacher's parameter 'embed.weight' requires grad",
                "teacher.requires_grad_(False)"):
        HiddenAlignment(id="align").bind(teacher=teacher)


def test_a_teacher_unfrozen_after_binding_is_an_error_at_setup():
    student, teacher = student_and_teacher()
    plugin = HiddenAlignment(HiddenAlignment.Config(
        student_taps=("blocks.?",), teacher_taps=("blocks.?",)), id="align").bind(teacher=teacher)
    teacher.requires_grad_(True)
    with raises(ConfigError, "align: the teacher's parameter 'embed.weight' requires grad"):
        set_up(plugin, student)


def test_a_bound_teacher_without_teacher_taps_is_an_error():
    _, teacher = student_and_teacher()
    with raises(ConfigError, "align.teacher_taps: a teacher is bound but no teacher_taps"):
        set_up(HiddenAlignment(id="align").bind(teacher=teacher))


def test_teacher_taps_without_a_bound_teacher_are_an_error():
    with raises(ConfigError, "align.teacher_taps: taps the teacher's modules, and no teacher "
                "is bound", "plugin.bind(teacher=module)"):
        set_up(HiddenAlignment(HiddenAlignment.Config(teacher_taps=("blocks.?",)), id="align"))


def test_taps_matching_as_many_modules_on_both_sides_are_required():
    student, teacher = student_and_teacher()
    plugin = HiddenAlignment(HiddenAlignment.Config(
        student_taps=("blocks.?",), teacher_taps=("blocks.[01]",)), id="align")
    with raises(ConfigError, "align.teacher_taps: match 2 teacher modules and student_taps 3"):
        set_up(plugin.bind(teacher=teacher), student)


def test_a_tapped_module_that_runs_twice_is_an_error():
    student, teacher = student_and_teacher()
    plugin = HiddenAlignment(HiddenAlignment.Config(
        student_taps=("blocks.?",), teacher_taps=("blocks.?",)), id="align").bind(teacher=teacher)
    pipe = set_up(plugin, student)
    x = torch.randn(2, 4)
    pipe.before_step(batch=x)
    student(x)
    student(x)
    with raises(ConfigError, "align.student_taps: module 'blocks.0' ran 2 times"):
        pipe.compute_loss(None)


def test_learnable_weighting_without_layer_names_is_an_error():
    with raises(ConfigError, "align.layers: weighting 'uncertainty' learns one weight per "
                "layer", "set layers"):
        set_up(HiddenAlignment(HiddenAlignment.Config(weighting="uncertainty"), id="align"))


def test_outputs_with_other_layers_than_layers_says_are_an_error():
    student, teacher = states()
    plugin = HiddenAlignment(HiddenAlignment.Config(layers=("0", "1")), id="align")
    with raises(ConfigError, "align: the student's layers are ['0', '1', '2'], but layers says "
                "['0', '1']"):
        step(set_up(plugin), aligned(student, teacher))


def test_layers_with_student_taps_is_an_error():
    student, _ = student_and_teacher()
    plugin = HiddenAlignment(HiddenAlignment.Config(student_taps=("blocks.?",), layers=("0",)),
                             id="align")
    with raises(ConfigError, "align.layers: names the layers of outputs['hidden_states'], but "
                "student_taps are set"):
        set_up(plugin, student)


def test_patterns_that_can_select_no_layer_are_an_error_at_setup():
    with raises(FilterError, "align: include [] and exclude [] select none of the names, "
                "whatever they are"):
        set_up(HiddenAlignment(id="align", include=[]))


def test_a_pattern_matching_no_layer_is_an_error_at_the_first_step():
    student, teacher = states()
    with raises(FilterError, "align.exclude: pattern '7' matches no layer"):
        step(set_up(HiddenAlignment(id="align", exclude=["7"])), aligned(student, teacher))


@pytest.mark.parametrize(
    ("options", "message"),
    [({"loss": "hubr"}, "plugins[0].loss: unknown loss 'hubr' (did you mean 'huber'?)"),
     ({"loss": "huber", "loss_options": {"delt": 1.0}},
      "plugins[0].loss_options: loss 'huber' has no option 'delt' (did you mean 'delta'?)"),
     ({"decay": 0.5}, "plugins[0].decay: is used by weighting 'decay' only"),
     ({"mse_weight": 0.0, "cosine_weight": 0.0},
      "plugins[0].cosine_weight: and mse_weight are both 0"),
     ({"weighting": "learned"}, "plugins[0].weighting: must be one of")],
)
def test_bad_options_are_errors_naming_them(options, message):
    with raises(ConfigError, message):
        steadytrain.load_config({"plugins": [{"plugin": "hidden_alignment", **options}]})
