from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from expect import raises

import steadytrain
from steadytrain import ConfigError, Pipeline
from steadytrain.plugins.distillation.logit_distillation import (
    LogitDistillation,
    distillation_loss,
)


def logits(seed=0, shape=(3, 4, 11)):
    gen = torch.Generator().manual_seed(seed)
    student = (3 * torch.randn(*shape, generator=gen, dtype=torch.float64)).requires_grad_()
    return student, 3 * torch.randn(*shape, generator=gen, dtype=torch.float64)


def torch_reference(student, teacher, temperature):
    """T²·KL(p_t ‖ p_s) by F.kl_div, over the positions flattened into one batch."""
    classes = student.shape[-1]
    return temperature**2 * F.kl_div(
        F.log_softmax(student.reshape(-1, classes) / temperature, dim=-1),
        F.log_softmax(teacher.reshape(-1, classes) / temperature, dim=-1),
        log_target=True, reduction="batchmean")


def set_up(plugin, total_steps=None):
    pipe = Pipeline([plugin])
    pipe.setup(torch.nn.Linear(2, 2), None, total_steps=total_steps)
    return pipe


def step(pipe, outputs, *, batch=None, targets=None):
    pipe.before_step(batch=batch, targets=targets)
    loss = pipe.compute_loss(None, outputs=outputs)
    pipe.after_backward()
    pipe.consolidate()
    return loss


@pytest.mark.parametrize("temperature", [0.5, 1.0, 3.0])
def test_the_term_is_t_squared_kl_div_in_value_and_gradient(temperature):
    student, teacher = logits()
    pipe = set_up(LogitDistillation(LogitDistillation.Config(temperature=temperature)))
    got = step(pipe, {"logits": student, "teacher_logits": teacher})
    expected = torch_reference(student, teacher, temperature)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=0)
    (ours,) = torch.autograd.grad(got, student)
    (theirs,) = torch.autograd.grad(expected, student)
    torch.testing.assert_close(ours, theirs, rtol=1e-10, atol=1e-14)


def test_the_kl_runs_from_the_teacher_to_the_student():
    student, teacher = logits(shape=(5, 7))
    p_t = torch.softmax(teacher / 2, -1)
    by_hand = 4 * (p_t * (p_t.log() - torch.log_softmax(student / 2, -1))).sum(-1).mean()
    torch.testing.assert_close(distillation_loss(student, teacher, 2.0), by_hand)


def test_t_squared_keeps_the_gradient_at_high_temperature_that_of_matching_logits():
    # Hinton et al. 2015: at high T, ∂(T²·KL)/∂z_s → (z_s − z_t − mean)/C for C classes.
    student, teacher = logits(shape=(6, 9))
    (grad,) = torch.autograd.grad(distillation_loss(student, teacher, 3000.0) * 6, student)
    difference = student.detach() - teacher
    limit = (difference - difference.mean(-1, keepdim=True)) / 9
    torch.testing.assert_close(grad, limit, rtol=0.01, atol=1e-5)


def test_the_temperature_follows_its_schedule():
    student, teacher = logits()
    config = LogitDistillation.Config(
        temperature=steadytrain.schedules.LinearWarmup(start=3.0, value=1.0, warmup_steps=4))
    pipe = set_up(LogitDistillation(config))
    seen = []
    for _ in range(6):
        loss = step(pipe, {"logits": student, "teacher_logits": teacher})
        seen.append(pipe.metrics()["logit_distillation/temperature"])
        torch.testing.assert_close(loss, torch_reference(student, teacher, seen[-1]),
                                   rtol=1e-12, atol=0)
    assert seen == [3.0, 2.5, 2.0, 1.5, 1.0, 1.0]


def test_top_k_compares_the_teachers_k_likeliest_classes_renormalized():
    student, teacher = logits()
    got = distillation_loss(student, teacher, 2.0, top_k=3)
    classes = teacher.topk(3, dim=-1).indices
    expected = torch_reference(student.gather(-1, classes), teacher.gather(-1, classes), 2.0)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=0)
    torch.testing.assert_close(distillation_loss(student, teacher, 2.0, top_k=50),
                               torch_reference(student, teacher, 2.0), rtol=1e-12, atol=0)


@pytest.mark.parametrize("targets_key", [None, "labels"])
def test_ignored_positions_are_left_out(targets_key):
    student, teacher = logits()
    labels = torch.randint(0, 11, (3, 4), generator=torch.Generator().manual_seed(1))
    labels[0, :3] = -100
    labels[2, 1] = -100
    plugin = LogitDistillation(LogitDistillation.Config(
        temperature=2.0, ignore_index=-100, targets_key=targets_key))
    targets = labels if targets_key is None else {"labels": labels}
    got = step(set_up(plugin), {"logits": student, "teacher_logits": teacher}, targets=targets)
    keep = labels != -100
    torch.testing.assert_close(got, torch_reference(student[keep], teacher[keep], 2.0),
                               rtol=1e-12, atol=0)


def test_a_step_with_every_position_ignored_gives_zero():
    student, teacher = logits()
    plugin = LogitDistillation(LogitDistillation.Config(ignore_index=-100))
    got = step(set_up(plugin), {"logits": student, "teacher_logits": teacher},
               targets=torch.full((3, 4), -100))
    assert got.item() == 0.0


class Teacher(torch.nn.Module):
    def __init__(self, wrap=None):
        super().__init__()
        torch.manual_seed(0)
        self.head = torch.nn.Linear(5, 11)
        self.wrap = wrap

    def forward(self, x, attention_mask=None):
        out = self.head(x)
        if attention_mask is not None:
            out = out * attention_mask[..., None]
        return out if self.wrap is None else self.wrap(out)


def frozen(module):
    return module.requires_grad_(False).eval()


@pytest.mark.parametrize("wrap", [None, lambda z: SimpleNamespace(logits=z),
                                  lambda z: {"logits": z, "loss": None}])
def test_a_bound_teacher_runs_on_the_batch_without_grad(wrap):
    teacher = frozen(Teacher(wrap))
    x = torch.randn(3, 4, 5)
    student = torch.randn(3, 4, 11, requires_grad=True)
    plugin = LogitDistillation(LogitDistillation.Config(temperature=2.0)).bind(teacher=teacher)
    got = step(set_up(plugin), {"logits": student}, batch=x)
    torch.testing.assert_close(got, torch_reference(student, teacher.head(x), 2.0))
    assert all(p.grad is None for p in teacher.parameters())


def test_a_mapping_batch_is_passed_as_keyword_arguments():
    teacher = frozen(Teacher())
    batch = {"x": torch.randn(2, 3, 5), "attention_mask": torch.tensor([[1.0, 1.0, 0.0]] * 2)}
    student = torch.randn(2, 3, 11, requires_grad=True)
    plugin = LogitDistillation().bind(teacher=teacher)
    got = step(set_up(plugin), {"logits": student}, batch=batch)
    torch.testing.assert_close(got, torch_reference(student, teacher(**batch), 1.0))


def test_a_schedule_temperature_round_trips_through_a_config():
    entry = {"plugin": "logit_distillation", "temperature": {
        "kind": "cosine_warmup", "start": 3.0, "value": 1.0, "warmup_steps": 1000}}
    config = steadytrain.load_config({"plugins": [entry]})
    assert steadytrain.load_config(steadytrain.unstructure_config(config)) == config
    plugin = config.plugins[0].build()
    assert plugin.temperature == steadytrain.schedules.CosineWarmup(1.0, 1000, 3.0)
    assert LogitDistillation.Config(temperature=plugin.temperature) == config.plugins[0].options


# -- bad input --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("temperature", "problem"),
    [(0.0, "must stay > 0 (it divides the logits), got Constant(value=0.0)"),
     (-2, "got Constant(value=-2.0), which reaches -2.0"),
     ({"kind": "cosine_curriculum"}, "which reaches 0.0"),
     ({"kind": "linear_warmup", "start": 0.0, "value": 1.0, "warmup_steps": 5},
      "which reaches 0.0")],
)
def test_a_temperature_that_is_not_always_positive_is_an_error(temperature, problem):
    with raises(ConfigError, "plugins[0].temperature: ", problem):
        steadytrain.load_config({"plugins": [
            {"plugin": "logit_distillation", "temperature": temperature}]})


@pytest.mark.parametrize(
    ("temperature", "message"),
    [({"kind": "linear_warmup", "value": 1.0, "warmup_steps": 0},
      "plugins[0].temperature.warmup_steps: must be an integer >= 1, got 0"),
     ({"kind": "linear_warmpu", "value": 1.0},
      "plugins[0].temperature.kind: unknown schedule 'linear_warmpu' (did you mean "
      "'linear_warmup'"),
     ({"kind": "constant", "value": 2.0, "steps": 3},
      "plugins[0].temperature: unknown key 'steps'; known keys: value"),
     ("hot", "plugins[0].temperature: expected a number or a schedule table with a 'kind', "
      "got 'hot'")],
)
def test_a_bad_temperature_schedule_is_an_error_naming_its_key(temperature, message):
    with raises(ConfigError, message):
        steadytrain.load_config({"plugins": [
            {"plugin": "logit_distillation", "temperature": temperature}]})


def test_the_plain_function_refuses_a_temperature_of_zero():
    with pytest.raises(ValueError, match="temperature must be > 0"):
        distillation_loss(*logits(), 0.0)


def test_a_teacher_that_requires_grad_is_an_error_naming_the_instance():
    with raises(ConfigError, "kd: the teacher's parameter 'head.weight' requires grad",
                "teacher.requires_grad_(False)"):
        LogitDistillation(id="kd").bind(teacher=Teacher().eval())


def test_a_teacher_unfrozen_after_binding_is_an_error_at_setup():
    teacher = frozen(Teacher())
    plugin = LogitDistillation(id="kd").bind(teacher=teacher)
    teacher.head.weight.requires_grad_(True)
    with raises(ConfigError, "kd: the teacher's parameter 'head.weight' requires grad"):
        set_up(plugin)


def test_a_teacher_in_training_mode_is_an_error():
    with raises(ConfigError, "kd: the teacher is in training mode", "teacher.eval()"):
        LogitDistillation(id="kd").bind(teacher=Teacher().requires_grad_(False))


def test_a_bound_teacher_without_a_batch_is_an_error():
    plugin = LogitDistillation(id="kd").bind(teacher=frozen(Teacher()))
    with raises(ConfigError, "kd: the bound teacher needs the step's input",
                "pipe.before_step(batch=...)"):
        step(set_up(plugin), {"logits": torch.randn(2, 11, requires_grad=True)})


def test_a_bound_teacher_and_teacher_logits_in_the_outputs_are_an_error():
    plugin = LogitDistillation(id="kd").bind(teacher=frozen(Teacher()))
    student, teacher = logits(shape=(2, 11))
    with raises(ConfigError, "kd.teacher_key: a teacher is bound and outputs['teacher_logits']"):
        step(set_up(plugin), {"logits": student, "teacher_logits": teacher},
             batch=torch.randn(2, 5))


def test_logits_of_different_shapes_are_an_error():
    student, teacher = logits()
    with raises(ConfigError, "kd: the student's logits have shape (3, 4, 11) and the "
                "teacher's (3, 4, 10)"):
        step(set_up(LogitDistillation(id="kd")), {"logits": student,
                                                   "teacher_logits": teacher[..., :10]})


def test_missing_teacher_logits_are_an_error_naming_the_option():
    with raises(ConfigError, "kd.teacher_key: no output 'teacher_logits' in this step"):
        step(set_up(LogitDistillation(id="kd")), {"logits": logits()[0]})


@pytest.mark.parametrize(
    ("config", "targets", "message"),
    [({"ignore_index": -100}, None, "kd.ignore_index: masking needs targets of shape (3, 4)"),
     ({"ignore_index": -100}, torch.zeros(3, 5), "got (3, 5)"),
     ({"ignore_index": -100, "targets_key": "labels"}, torch.zeros(3, 4),
      "kd.targets_key: the targets have no entry 'labels'")],
)
def test_targets_that_cannot_mask_are_an_error(config, targets, message):
    student, teacher = logits()
    plugin = LogitDistillation(LogitDistillation.Config(**config), id="kd")
    with raises(ConfigError, message):
        step(set_up(plugin), {"logits": student, "teacher_logits": teacher}, targets=targets)


def test_targets_key_without_ignore_index_is_an_error():
    with raises(ConfigError, "kd.targets_key: the targets are only read to mask ignore_index"):
        set_up(LogitDistillation(LogitDistillation.Config(targets_key="labels"), id="kd"))


def test_the_source_hidden_state_temperature_only_rescales_the_loss():
    # Seed 002 divides hidden states by T before their MSE: that is MSE/T², the cosine
    # does not change, and no distribution is softened.
    gen = torch.Generator().manual_seed(0)
    s, t = torch.randn(4, 8, 16, generator=gen), torch.randn(4, 8, 16, generator=gen)
    for temperature in (2.0, 3.0, 5.0):
        torch.testing.assert_close(F.mse_loss(s / temperature, t / temperature),
                                   F.mse_loss(s, t) / temperature**2)
        torch.testing.assert_close(F.cosine_similarity(s / temperature, t / temperature, -1),
                                   F.cosine_similarity(s, t, -1))


def test_a_temperature_that_is_neither_a_number_nor_a_schedule_is_an_error_in_python():
    with raises(steadytrain.OptionError, "temperature: must be a number or a "
                "steadytrain.schedules schedule, got {'kind': 'constant', 'value': 2.0}"):
        LogitDistillation.Config(temperature={"kind": "constant", "value": 2.0})
