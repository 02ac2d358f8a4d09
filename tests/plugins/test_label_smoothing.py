import tomllib

import pytest
import torch
import torch.nn.functional as F
from helpers import round_trip

import steadytrain
from steadytrain.plugins.label_smoothing import LabelSmoothing, label_smoothing_term


def batch(*shape, classes=7, ignore_index=-100, ignored=3, seed=0):
    """Logits of shape (*shape, classes) and targets with *ignored* ignored entries."""
    gen = torch.Generator().manual_seed(seed)
    logits = 3 * torch.randn(*shape, classes, generator=gen)
    targets = torch.randint(0, classes, shape, generator=gen)
    targets.view(-1)[:ignored] = ignore_index
    return logits, targets


def torch_layout(logits):
    """F.cross_entropy wants the classes in dimension 1."""
    return logits.movedim(-1, 1)


def smoothed_step(pipe, logits, targets, *, ignore_index=-100):
    """One host step whose task loss is plain cross-entropy; returns the combined loss."""
    pipe.before_step(targets=targets)
    task = F.cross_entropy(torch_layout(logits), targets, ignore_index=ignore_index)
    loss = pipe.compute_loss(task, outputs={"logits": logits})
    pipe.after_backward()
    pipe.consolidate()
    return loss


@pytest.mark.parametrize("shape", [(12,), (3, 8), (2, 3, 4)])
@pytest.mark.parametrize("ignore_index", [-100, 2])
@pytest.mark.parametrize("smoothing", [0.0, 0.1, 0.35, 1.0])
@pytest.mark.parametrize("ignored", [0, 3])
def test_cross_entropy_plus_term_is_label_smoothed_cross_entropy(
    shape, ignore_index, smoothing, ignored
):
    logits, targets = batch(*shape, ignore_index=ignore_index, ignored=ignored)
    plain = F.cross_entropy(torch_layout(logits), targets, ignore_index=ignore_index)
    term = label_smoothing_term(logits, targets, smoothing, ignore_index)
    expected = F.cross_entropy(
        torch_layout(logits), targets, ignore_index=ignore_index, label_smoothing=smoothing
    )
    torch.testing.assert_close(plain + term, expected)


def test_class_dim_one_takes_the_cross_entropy_layout():
    logits, targets = batch(2, 5)
    layout = torch_layout(logits)  # (batch, classes, seq)
    expected = F.cross_entropy(layout, targets, label_smoothing=0.1)
    term = label_smoothing_term(layout, targets, 0.1, class_dim=1)
    torch.testing.assert_close(F.cross_entropy(layout, targets) + term, expected)


def test_all_targets_ignored_gives_zero():
    logits, targets = batch(2, 4, ignored=8)
    assert label_smoothing_term(logits, targets, 0.1) == 0


def test_plugin_in_a_pipeline_matches_smoothed_cross_entropy_and_its_gradient():
    logits, targets = batch(4, 6)
    logits.requires_grad_()
    pipe = steadytrain.Pipeline([LabelSmoothing()]).setup()
    loss = smoothed_step(pipe, logits, targets)
    (grad,) = torch.autograd.grad(loss, logits)
    reference = logits.detach().requires_grad_()
    expected = F.cross_entropy(torch_layout(reference), targets, label_smoothing=0.1)
    (expected_grad,) = torch.autograd.grad(expected, reference)
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(grad, expected_grad)


def test_weight_scales_the_smoothing():
    logits, targets = batch(4, 6)
    pipe = steadytrain.Pipeline([LabelSmoothing(LabelSmoothing.Config(smoothing=0.2), weight=0.5)])
    loss = smoothed_step(pipe.setup(), logits, targets)
    expected = F.cross_entropy(torch_layout(logits), targets, label_smoothing=0.1)
    torch.testing.assert_close(loss, expected)


def test_targets_key_reads_a_mapping_of_targets_and_ignore_index_from_the_config():
    logits, targets = batch(3, 5, ignore_index=0)
    config = LabelSmoothing.Config(targets_key="labels", ignore_index=0, logits_key="scores")
    pipe = steadytrain.Pipeline([LabelSmoothing(config)]).setup()
    pipe.before_step(targets={"labels": targets, "mask": torch.ones(3, 5)})
    task = F.cross_entropy(torch_layout(logits), targets, ignore_index=0)
    loss = pipe.compute_loss(task, outputs={"scores": logits})
    expected = F.cross_entropy(torch_layout(logits), targets, ignore_index=0, label_smoothing=0.1)
    torch.testing.assert_close(loss, expected)


def test_toml_config_and_stateless_checkpoint_round_trip():
    config = tomllib.loads(
        '[[plugins]]\nplugin = "label_smoothing"\nid = "ls"\nsmoothing = 0.2\n'
        "ignore_index = -1\n"
    )
    pipe = steadytrain.Pipeline.from_config(config).setup()
    assert pipe.plugins["ls"].config == LabelSmoothing.Config(smoothing=0.2, ignore_index=-1)
    logits, targets = batch(2, 6, ignore_index=-1)
    loss = smoothed_step(pipe, logits, targets, ignore_index=-1)
    expected = F.cross_entropy(
        torch_layout(logits), targets, ignore_index=-1, label_smoothing=0.2
    )
    torch.testing.assert_close(loss, expected)
    buffer = round_trip(pipe.state_dict())
    fresh = steadytrain.Pipeline.from_config(config)
    fresh.load_state_dict(buffer)
    fresh.setup()
    assert fresh.run.step == 1
    torch.testing.assert_close(smoothed_step(fresh, logits, targets, ignore_index=-1), expected)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"smoothing": 1.5}, r"plugins\[0\]\.smoothing: must be in \[0\.0, 1\.0\], got 1\.5"),
        ({"logits_key": ""}, r"plugins\[0\]\.logits_key: must be a non-empty string"),
        ({"targets_key": 3}, r"plugins\[0\]\.targets_key: "),
        ({"ignore_index": 0.5}, r"plugins\[0\]\.ignore_index: expected an integer"),
        ({"check": "always"}, r"plugins\[0\]\.check: must be one of 'auto', 'every_step'"),
    ],
)
def test_bad_options_are_config_errors(options, message):
    with pytest.raises(steadytrain.ConfigError, match=message):
        steadytrain.load_config({"plugins": [{"plugin": "label_smoothing", **options}]})


def test_include_is_an_error():
    with pytest.raises(steadytrain.ConfigError, match=r"ls\.include: label_smoothing has no"):
        steadytrain.Pipeline([LabelSmoothing(id="ls", include=["decoder.*"])]).setup()


def step_error(config, *, outputs, targets, error=steadytrain.SteadytrainError):
    pipe = steadytrain.Pipeline([LabelSmoothing(config, id="ls")]).setup()
    pipe.before_step(targets=targets)
    with pytest.raises(error) as info:
        pipe.compute_loss(None, outputs=outputs)
    return str(info.value)


def test_missing_logits_is_an_error_listing_the_outputs():
    logits, targets = batch(2, 3)
    message = step_error(LabelSmoothing.Config(), outputs={"gates": logits, "hidden": logits},
                         targets=targets)
    assert "ls.logits_key: no output 'logits' in this step; the outputs are: gates, hidden" \
        in message


@pytest.mark.parametrize(
    ("config", "targets", "message"),
    [
        ({}, None, "ls.targets_key: the step's targets is a NoneType, not a tensor"),
        ({}, {"labels": 0}, "ls.targets_key: the targets are a mapping with keys labels"),
        ({"targets_key": "labels"}, {"ids": 0}, "ls.targets_key: no entry 'labels' in the step's"
                                                " targets (ids)"),
        ({"targets_key": "labels"}, None, "no entry 'labels' in the step's targets (not a "
                                          "mapping but a NoneType)"),
    ],
)
def test_missing_or_misplaced_targets_are_errors(config, targets, message):
    logits, _ = batch(2, 3)
    assert message in step_error(LabelSmoothing.Config(**config), outputs={"logits": logits},
                                 targets=targets)


@pytest.mark.parametrize(
    ("config", "make_targets", "message"),
    [
        ({}, lambda t: t.float(), "ls.targets_key: must be class indices (an integer tensor), "
                                  "got torch.float32"),
        ({}, lambda t: t[:, :2], "ls.class_dim: targets of shape (2, 2) do not fit logits of "
                                 "shape (2, 3, 7)"),
        ({"class_dim": 1}, lambda t: t, "ls.class_dim: targets of shape (2, 3) do not fit "
                                        "logits of shape (2, 3, 7) with the classes in "
                                        "dimension 1 (the targets must have shape (2, 7))"),
        ({"class_dim": 3}, lambda t: t, "ls.class_dim: 3 is out of range for logits of shape "
                                        "(2, 3, 7)"),
    ],
)
def test_wrong_targets_or_shapes_are_errors(config, make_targets, message):
    logits, targets = batch(2, 3)
    assert message in step_error(LabelSmoothing.Config(**config), outputs={"logits": logits},
                                 targets=make_targets(targets), error=steadytrain.ConfigError)


def with_target(targets, value):
    targets = targets.clone()
    targets.view(-1)[-1] = value
    return targets


@pytest.mark.parametrize("value", [7, 12])
def test_targets_outside_the_classes_name_the_value_the_classes_and_the_option(value):
    logits, targets = batch(2, 3)
    message = step_error(LabelSmoothing.Config(), outputs={"logits": logits},
                         targets=with_target(targets, value), error=steadytrain.ConfigError)
    assert message.startswith(
        f"ls.class_dim: the targets hold {value}, but the logits have 7 classes (0 … 6) in "
        "dimension -1 of shape (2, 3, 7); every target must be a class or ignore_index (-100)"
    )


@pytest.mark.parametrize(("host", "ours"), [(-100, -1), (-1, -100), (-100, 0)])
def test_an_ignore_index_other_than_the_hosts_is_an_error_naming_it(host, ours):
    logits, targets = batch(2, 3, ignore_index=host)
    message = step_error(LabelSmoothing.Config(ignore_index=ours), outputs={"logits": logits},
                         targets=targets, error=steadytrain.ConfigError)
    assert message.startswith(
        f"ls.ignore_index: the targets hold {host}, which is neither a class (0 … 6) nor "
        f"ignore_index ({ours}); set ignore_index to the value the host's loss ignores"
    )


def test_the_plain_function_checks_targets_when_asked():
    logits, targets = batch(2, 3)
    with pytest.raises(steadytrain.OptionError, match=r"ignore_index: the targets hold -5"):
        label_smoothing_term(logits, with_target(targets, -5), check_targets=True)
    good = label_smoothing_term(logits, targets, check_targets=True)
    torch.testing.assert_close(good, label_smoothing_term(logits, targets))


@pytest.mark.parametrize(("check", "checked_later"),
                         [("auto", True), ("every_step", True), ("first_step", False)])
def test_check_policy_says_which_steps_are_checked(check, checked_later):
    logits, targets = batch(2, 3)
    pipe = steadytrain.Pipeline([LabelSmoothing(LabelSmoothing.Config(check=check),
                                                id="ls")]).setup()
    smoothed_step(pipe, logits, targets)
    pipe.before_step(targets=with_target(targets, 9))
    with pytest.raises(steadytrain.SteadytrainError) as info:
        pipe.compute_loss(torch.tensor(1.0), outputs={"logits": logits})
    # unchecked, the bad index reaches torch's gather, whose own error the core wraps
    assert isinstance(info.value, steadytrain.ConfigError) is checked_later
    assert ("ls.class_dim: the targets hold 9" in str(info.value)) is checked_later


def test_check_never_skips_the_first_step_too():
    logits, targets = batch(2, 3)
    message = step_error(LabelSmoothing.Config(check="never"), outputs={"logits": logits},
                         targets=with_target(targets, 9), error=steadytrain.HookError)
    assert "out of bounds" in message


def test_low_precision_logits_give_a_float32_term_of_the_same_values():
    logits, targets = batch(3, 5)
    low = logits.bfloat16()
    term = label_smoothing_term(low, targets, 0.1)
    assert term.dtype == torch.float32
    torch.testing.assert_close(term, label_smoothing_term(low.float(), targets, 0.1))


def smoothed_grads(logits, targets, loss_of, *, class_dim=-1):
    """The gradient that *loss_of(x)* sends to *logits* through a non-leaf ``x``, the way
    a model's output is one, and the loss."""
    leaf = logits.detach().requires_grad_()
    x = leaf * 1  # a non-leaf, as a model's logits are
    loss = loss_of(x)
    loss.backward()
    return loss.detach(), leaf.grad


def cross_entropy_of(targets, class_dim, **options):
    def loss_of(x):
        layout = x if class_dim == 1 else torch_layout(x)
        return F.cross_entropy(layout, targets, **options)
    return loss_of


@pytest.mark.parametrize("class_dim", [-1, 1])
@pytest.mark.parametrize("ignore_index", [-100, 2])
def test_gradient_of_cross_entropy_plus_term_is_torchs_label_smoothed_gradient(
    class_dim, ignore_index
):
    logits, targets = batch(3, 5, ignore_index=ignore_index)
    if class_dim == 1:
        logits = torch_layout(logits).contiguous()
    plain = cross_entropy_of(targets, class_dim, ignore_index=ignore_index)
    smoothed = cross_entropy_of(targets, class_dim, ignore_index=ignore_index,
                                label_smoothing=0.1)
    loss, grad = smoothed_grads(logits, targets, lambda x: plain(x) + label_smoothing_term(
        x, targets, 0.1, ignore_index, class_dim))
    expected_loss, expected_grad = smoothed_grads(logits, targets, smoothed)
    torch.testing.assert_close(loss, expected_loss)
    torch.testing.assert_close(grad, expected_grad)


def formula(x, targets, smoothing, ignore_index=-100):
    """The term written out with plain autograd: ε·mean over kept targets of x_y − mean x."""
    valid = targets != ignore_index
    picked = x.gather(-1, torch.where(valid, targets, 0).unsqueeze(-1)).squeeze(-1)
    return smoothing * ((picked - x.mean(-1)) * valid).sum() / valid.sum()


@pytest.mark.parametrize("leaf", [True, False])
def test_gradient_of_the_term_alone_is_that_of_its_formula(leaf):
    logits, targets = batch(4, 3, ignored=2)
    logits = logits.double()
    x = logits.clone().requires_grad_()
    source = x if leaf else x * 1
    (grad,) = torch.autograd.grad(3 * label_smoothing_term(source, targets, 0.2), x)
    assert grad.layout == torch.strided
    y = logits.clone().requires_grad_()
    (expected,) = torch.autograd.grad(3 * formula(y, targets, 0.2), y)
    torch.testing.assert_close(grad, expected)


def test_a_backward_that_bypasses_the_term_gets_none_of_its_gradient_and_a_repeat_all():
    logits, targets = batch(3, 4)
    leaf = logits.requires_grad_()
    x = leaf * 1
    task = F.cross_entropy(torch_layout(x), targets)
    total = task + label_smoothing_term(x, targets, 0.1)
    (task_only,) = torch.autograd.grad(task, leaf, retain_graph=True)
    first = torch.autograd.grad(total, leaf, retain_graph=True)[0]
    second = torch.autograd.grad(total, leaf)[0]
    reference = logits.detach().requires_grad_()
    (expected_task,) = torch.autograd.grad(F.cross_entropy(torch_layout(reference), targets),
                                           reference)
    (expected,) = torch.autograd.grad(
        F.cross_entropy(torch_layout(reference), targets, label_smoothing=0.1), reference)
    torch.testing.assert_close(task_only, expected_task)
    torch.testing.assert_close(first, expected)
    torch.testing.assert_close(second, expected)


def test_bfloat16_logits_match_torchs_label_smoothed_cross_entropy():
    """Against float64 references, the term's loss and gradient in bfloat16 are as close as
    torch's own label-smoothed cross-entropy on the same bfloat16 logits."""
    logits, targets = batch(8, 16, classes=1000, ignored=5)
    low = logits.bfloat16()
    plain = cross_entropy_of(targets, -1)
    smoothed = cross_entropy_of(targets, -1, label_smoothing=0.1)
    loss, grad = smoothed_grads(low, targets,
                                lambda x: plain(x) + label_smoothing_term(x, targets, 0.1))
    torch_loss, torch_grad = smoothed_grads(low, targets, smoothed)
    exact_loss, exact_grad = smoothed_grads(low.double(), targets, smoothed)
    assert grad.dtype == torch.bfloat16
    error = (grad.double() - exact_grad).norm() / exact_grad.norm()
    torch_error = (torch_grad.double() - exact_grad).norm() / exact_grad.norm()
    assert error < 1e-2 and error < 2 * torch_error
    torch.testing.assert_close(loss.double(), exact_loss, rtol=1e-2, atol=0)
    torch.testing.assert_close(loss.double(), torch_loss.double(), rtol=1e-2, atol=0)


#: Float32 logits that only the term reads, made from the host's logits.
ALONE = {"by a product": lambda x: x.float() * 1,
         "by a conversion": lambda x: x.to(torch.float32, copy=True)}


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs CUDA"))])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("made", list(ALONE))
def test_logits_that_only_the_term_reads_get_torchs_label_smoothed_gradient(
    device, dtype, made, monkeypatch
):
    """As under Accelerate's mixed precision: the host's cross-entropy reads one float32
    copy of the logits and the term another, whose gradient is then the term's alone.
    Logits made by a conversion never have it written out whole: the conversion's
    backward takes the broadcast and the targets' share is added to what it writes."""
    from steadytrain.plugins import label_smoothing

    if made == "by a conversion":
        def written_out(*args):
            raise AssertionError("the term's gradient was written out whole")

        monkeypatch.setattr(label_smoothing, "_whole_gradient", written_out)
    logits, targets = batch(4, 33, classes=5000, ignored=5)
    logits, targets = logits.to(device, dtype), targets.to(device)

    def grad_of(loss_of):
        x = logits.clone().requires_grad_()
        (grad,) = torch.autograd.grad(loss_of(x), x)
        return grad

    def ce(x, **options):
        return F.cross_entropy(x.float().flatten(0, 1), targets.flatten(), **options)

    grad = grad_of(lambda x: ce(x) + label_smoothing_term(ALONE[made](x), targets, 0.1))
    expected = grad_of(lambda x: ce(x, label_smoothing=0.1))
    rtol, atol = {torch.float32: (1e-5, 1e-7), torch.bfloat16: (1e-2, 1e-5)}[dtype]
    torch.testing.assert_close(grad, expected, rtol=rtol, atol=atol)


class TinyLM(torch.nn.Module):
    """Embeddings, a body and a head that makes the logits; returns them as a float32
    copy, as Accelerate hands over a model's outputs under mixed precision."""

    def __init__(self, classes=11, twice=False):
        super().__init__()
        self.embed = torch.nn.Embedding(classes, 8)
        self.body = torch.nn.Linear(8, 8)
        self.lm_head = torch.nn.Linear(8, classes)
        self.twice = twice

    def forward(self, tokens):
        logits = self.lm_head(torch.tanh(self.body(self.embed(tokens))))
        if self.twice:
            logits = logits + self.lm_head(self.body(self.embed(tokens)))
        return logits, logits.double().float()


def lm_grads(config, *, through_pipeline):
    torch.manual_seed(0)
    model = TinyLM()
    tokens = torch.randint(0, 11, (3, 6))
    targets = torch.randint(0, 11, (3, 6))
    targets[0, :2] = -100
    if through_pipeline:
        pipe = steadytrain.Pipeline([LabelSmoothing(LabelSmoothing.Config(**config))])
        pipe.setup(model)
        pipe.before_step(targets=targets)
        logits, handed = model(tokens)
        task = F.cross_entropy(torch_layout(logits), targets)
        pipe.compute_loss(task, outputs={"logits": handed}).backward()
        pipe.after_backward()
        pipe.consolidate()
        pipe.close()
    else:
        logits, _ = model(tokens)
        F.cross_entropy(torch_layout(logits), targets, label_smoothing=0.1).backward()
    return [p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize("config", [{}, {"logits_module": "lm_head"}],
                         ids=["outputs", "logits_module"])
def test_logits_from_the_outputs_or_from_a_module_give_torchs_smoothed_gradients(config):
    got = lm_grads({"smoothing": 0.1, **config}, through_pipeline=True)
    expected = lm_grads({}, through_pipeline=False)
    for g, e in zip(got, expected, strict=True):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-7)


def test_logits_module_matching_no_module_or_several_is_an_error():
    model = TinyLM()
    with pytest.raises(steadytrain.FilterError, match=r"label_smoothing\.logits_module.*'head'"):
        steadytrain.Pipeline([LabelSmoothing(LabelSmoothing.Config(
            logits_module="head"))]).setup(model)
    with pytest.raises(steadytrain.ConfigError, match=(
            r"label_smoothing\.logits_module: '\*' matches 3 modules \(embed, body, lm_head\)")):
        steadytrain.Pipeline([LabelSmoothing(LabelSmoothing.Config(
            logits_module="*"))]).setup(model)


def test_logits_module_that_runs_twice_or_returns_no_tensor_is_an_error():
    model = TinyLM(twice=True)
    pipe = steadytrain.Pipeline([LabelSmoothing(LabelSmoothing.Config(
        logits_module="lm_head"))]).setup(model)
    pipe.before_step(targets=torch.zeros(2, 3, dtype=torch.long))
    logits, _ = model(torch.zeros(2, 3, dtype=torch.long))
    with pytest.raises(steadytrain.ConfigError,
                       match=r"logits_module: module 'lm_head' ran 2 times in this forward"):
        pipe.compute_loss(logits.sum())
    pipe.close()

    class Pair(torch.nn.Module):
        def forward(self, x):
            return x, x

    model = torch.nn.Sequential(torch.nn.Linear(3, 3), Pair())
    pipe = steadytrain.Pipeline([LabelSmoothing(LabelSmoothing.Config(
        logits_module="1"))]).setup(model)
    pipe.before_step(targets=torch.zeros(2, dtype=torch.long))
    out, _ = model(torch.zeros(2, 3))
    with pytest.raises(steadytrain.ConfigError,
                       match=r"logits_module: the output of module '1' is a tuple, not a tensor"):
        pipe.compute_loss(out.sum())
    pipe.close()
