"""``steadytrain.step_optimizer``: the optimizer steps exactly when no plugin asked to skip.

Every case runs twice from the same seed: once through ``step_optimizer``, once as the
reference the host would write by hand (``optimizer.step()``, ``scaler.step(optimizer)``,
or no step at all), and the weights and optimizer states must agree bit for bit.
"""

import copy
from contextlib import nullcontext

import pytest
import torch
from exact import assert_same
from expect import raises
from helpers import no_host_sync

import steadytrain
from steadytrain import Pipeline, SkipRequest, StepOutcome, UsageError, step_optimizer

PLAIN = {
    "SGD": lambda params: torch.optim.SGD(params, lr=0.1),
    "SGD with momentum": lambda params: torch.optim.SGD(params, lr=0.1, momentum=0.9),
    "AdamW": lambda params: torch.optim.AdamW(params, lr=0.01),
}
FUSED = {
    "AdamW": lambda params: torch.optim.AdamW(params, lr=0.01, fused=True),
    "Adam": lambda params: torch.optim.Adam(params, lr=0.01, fused=True),
    "SGD with momentum": lambda params: torch.optim.SGD(params, lr=0.1, momentum=0.9,
                                                        fused=True),
    "Adagrad": lambda params: torch.optim.Adagrad(params, lr=0.1, fused=True),
}


def problem(make_optimizer, *, warm_steps=1, device="cpu"):
    """A model whose gradients are ready, and its optimizer after *warm_steps* plain steps."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Tanh(), torch.nn.Linear(3, 2))
    model.to(device)
    optimizer = make_optimizer(model.parameters())
    for step in range(warm_steps + 1):
        optimizer.zero_grad()
        model(torch.randn(5, 4, device=device)).pow(2).mean().backward()
        if step < warm_steps:
            optimizer.step()
    return model, optimizer


def snapshot(model, optimizer):
    return copy.deepcopy((model.state_dict(), optimizer.state_dict()))


def request(when):
    return StepOutcome((SkipRequest("guard", "non-finite gradients", when),))


#: Ways to say "skip": a device flag (the decision not read on the host), a host decision,
#: the flag alone, a bool.
SKIP = {
    "device flag": lambda: request(torch.tensor(True)),
    "host decision": lambda: request(True),
    "flag tensor": lambda: torch.tensor(True),
    "bool": lambda: True,
}
STEP = {
    "no request": lambda: StepOutcome(()),
    "device flag": lambda: request(torch.tensor(False)),
    "host decision": lambda: request(False),
    "flag tensor": lambda: torch.tensor(False),
    "bool": lambda: False,
}


def stepped_by_hand(make_optimizer, **problem_args):
    model, optimizer = problem(make_optimizer, **problem_args)
    optimizer.step()
    return snapshot(model, optimizer)


# -- plain optimizers ---------------------------------------------------------------------------


@pytest.mark.parametrize("outcome", STEP)
@pytest.mark.parametrize("optimizer", PLAIN)
def test_a_plain_optimizer_steps_when_no_plugin_asked_to_skip(optimizer, outcome):
    model, opt = problem(PLAIN[optimizer])
    step_optimizer(opt, STEP[outcome]())
    assert_same(snapshot(model, opt), stepped_by_hand(PLAIN[optimizer]))


@pytest.mark.parametrize("outcome", SKIP)
@pytest.mark.parametrize("optimizer", PLAIN)
def test_a_plain_optimizer_does_not_step_when_a_plugin_asked_to_skip(optimizer, outcome):
    model, opt = problem(PLAIN[optimizer])
    before = snapshot(model, opt)
    step_optimizer(opt, SKIP[outcome]())
    assert_same(snapshot(model, opt), before)


# -- fused optimizers: the flag is handed over as found_inf -----------------------------------


@pytest.mark.parametrize("optimizer", FUSED)
def test_a_fused_optimizer_skipped_on_a_device_flag_leaves_weights_and_state_as_they_were(
    optimizer,
):
    model, opt = problem(FUSED[optimizer])
    before = snapshot(model, opt)
    step_optimizer(opt, request(torch.tensor(True)))
    assert_same(snapshot(model, opt), before)


def test_a_skipped_fused_adamw_keeps_its_moments_and_step_count():
    model, opt = problem(FUSED["AdamW"], warm_steps=2)
    state = {name: [opt.state[p][name].clone() for p in model.parameters()]
             for name in ("exp_avg", "exp_avg_sq", "step")}
    step_optimizer(opt, request(torch.tensor(True)))
    for name, values in state.items():
        for p, value in zip(model.parameters(), values, strict=True):
            assert torch.equal(opt.state[p][name], value), name
    assert all(float(opt.state[p]["step"]) == 2 for p in model.parameters())


@pytest.mark.parametrize("optimizer", FUSED)
def test_a_fused_optimizer_not_skipped_on_a_device_flag_steps_like_optimizer_step(optimizer):
    model, opt = problem(FUSED[optimizer])
    step_optimizer(opt, request(torch.tensor(False)))
    assert_same(snapshot(model, opt), stepped_by_hand(FUSED[optimizer]))


@pytest.mark.parametrize("optimizer", FUSED)
def test_the_first_step_of_a_fresh_fused_optimizer_is_skipped_on_a_device_flag(optimizer):
    model, opt = problem(FUSED[optimizer], warm_steps=0)
    before = snapshot(model, opt)
    step_optimizer(opt, request(torch.tensor(True)))
    assert_same(snapshot(model, opt), before)


@pytest.mark.parametrize("optimizer", FUSED)
def test_the_first_step_of_a_fresh_fused_optimizer_steps_like_optimizer_step(optimizer):
    model, opt = problem(FUSED[optimizer], warm_steps=0)
    step_optimizer(opt, request(torch.tensor(False)))
    assert_same(snapshot(model, opt), stepped_by_hand(FUSED[optimizer], warm_steps=0))


def test_step_optimizer_leaves_no_found_inf_on_a_fused_optimizer():
    model, opt = problem(FUSED["AdamW"])
    step_optimizer(opt, request(torch.tensor(True)))
    assert not hasattr(opt, "found_inf")
    opt.step()  # a later plain step is not skipped by a leftover flag
    reference_model, reference = problem(FUSED["AdamW"])
    reference.step()
    assert_same(model.state_dict(), reference_model.state_dict())


def test_an_optimizer_that_already_has_found_inf_set_is_refused():
    model, opt = problem(FUSED["AdamW"])
    opt.found_inf = torch.tensor(0.0)
    before = snapshot(model, opt)
    with raises(UsageError, "step_optimizer", "already has a found_inf set",
                "step_optimizer(optimizer, outcome, scaler=scaler)"):
        step_optimizer(opt, request(torch.tensor(True)))
    assert_same(snapshot(model, opt), before)


# -- under torch.amp.GradScaler --------------------------------------------------------------


def scaled(make_optimizer, *, unscale=True):
    """A model, its optimizer and a CPU GradScaler after one scaled backward."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Tanh(), torch.nn.Linear(3, 2))
    optimizer = make_optimizer(model.parameters())
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    scaler.scale(model(torch.randn(5, 4)).pow(2).mean()).backward()
    if unscale:
        scaler.unscale_(optimizer)
    return model, optimizer, scaler


SCALED = {"AdamW": PLAIN["AdamW"], "fused AdamW": FUSED["AdamW"]}


def test_step_optimizer_with_a_scaler_requires_unscale_first():
    model, opt, scaler = scaled(PLAIN["AdamW"], unscale=False)
    before = snapshot(model, opt)
    with raises(UsageError, "step_optimizer(scaler=...)", "call scaler.unscale_(optimizer) "
                "before pipe.after_backward()"):
        step_optimizer(opt, request(torch.tensor(False)), scaler=scaler)
    assert_same(snapshot(model, opt), before)


@pytest.mark.parametrize("outcome", ["device flag", "host decision", "bool"])
@pytest.mark.parametrize("optimizer", SCALED)
def test_a_skip_under_a_grad_scaler_leaves_the_weights_and_backs_off_the_scale(
    optimizer, outcome
):
    model, opt, scaler = scaled(SCALED[optimizer])
    weights = copy.deepcopy(model.state_dict())
    step_optimizer(opt, SKIP[outcome](), scaler=scaler)
    scaler.update()
    assert_same(model.state_dict(), weights)
    assert scaler.get_scale() == 1024.0 * scaler.get_backoff_factor()


@pytest.mark.parametrize("outcome", ["no request", "device flag", "host decision", "bool"])
@pytest.mark.parametrize("optimizer", SCALED)
def test_no_skip_under_a_grad_scaler_steps_like_scaler_step(optimizer, outcome):
    model, opt, scaler = scaled(SCALED[optimizer])
    step_optimizer(opt, STEP[outcome](), scaler=scaler)
    scaler.update()
    reference_model, reference, reference_scaler = scaled(SCALED[optimizer])
    reference_scaler.step(reference)
    reference_scaler.update()
    assert_same(snapshot(model, opt), snapshot(reference_model, reference))
    assert scaler.get_scale() == reference_scaler.get_scale() == 1024.0


def test_step_optimizer_is_public_api_of_the_core_not_of_a_plugin():
    assert "step_optimizer" in steadytrain.__all__
    assert step_optimizer.__module__ == "steadytrain.optimizer_step"


# -- on CUDA the decision stays on the device ------------------------------------------------

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
#: Fused Adagrad is CPU-only in torch.
FUSED_ON_CUDA = {name: make for name, make in FUSED.items() if name != "Adagrad"}


@cuda
@pytest.mark.parametrize("skip", [True, False], ids=["skip", "step"])
@pytest.mark.parametrize("optimizer", FUSED_ON_CUDA)
def test_a_fused_optimizer_follows_a_device_flag_without_a_host_sync_on_cuda(optimizer, skip):
    model, opt = problem(FUSED_ON_CUDA[optimizer], device="cuda")
    before = snapshot(model, opt)
    outcome = request(torch.tensor(skip, device="cuda"))
    with no_host_sync():
        step_optimizer(opt, outcome)
    expected = before if skip else stepped_by_hand(FUSED_ON_CUDA[optimizer], device="cuda")
    assert_same(snapshot(model, opt), expected)


#: The decision as the host may hold it on CUDA: a device flag, or known on the host.
ON_CUDA = {
    "device flag": lambda skip: request(torch.tensor(skip, device="cuda")),
    "host decision": lambda skip: request(skip),
    "bool": lambda skip: skip,
}


@cuda
@pytest.mark.parametrize("outcome", ON_CUDA)
@pytest.mark.parametrize("skip", [True, False], ids=["skip", "step"])
def test_a_grad_scaler_driving_a_fused_adamw_takes_the_decision_without_a_host_sync_on_cuda(
    skip, outcome
):
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 2).cuda()
    opt = FUSED["AdamW"](model.parameters())
    scaler = torch.amp.GradScaler("cuda", init_scale=1024.0)
    for step in range(2):
        scaler.scale(model(torch.randn(5, 4, device="cuda")).pow(2).mean()).backward()
        scaler.unscale_(opt)
        weights = copy.deepcopy(model.state_dict())
        # Made outside: torch.tensor(..., device="cuda") copies from pageable host memory,
        # which waits for the device.
        decision = ON_CUDA[outcome](skip and step == 1)
        with no_host_sync() if step else nullcontext():  # the first step reads the flag once
            step_optimizer(opt, decision, scaler=scaler)
            scaler.update()
        opt.zero_grad()
    assert (scaler.get_scale() == 512.0) == skip
    assert all(torch.equal(model.state_dict()[k], weights[k]) for k in weights) == skip


@cuda
@pytest.mark.parametrize("check_every", [1000, 1], ids=["no counter read", "reads every step"])
def test_the_documented_loop_with_a_guard_and_a_fused_adamw_never_syncs_the_host_on_cuda(
    check_every,
):
    config = {"plugins": [{"plugin": "guard", "check_every": check_every},
                          {"plugin": "grad_clip"}, {"plugin": "ema", "decay": 0.9}]}
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(),
                                torch.nn.Linear(16, 3)).cuda()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
    pipe = Pipeline.from_config(config).setup(model, optimizer, total_steps=20)
    x = torch.randn(4, 8, device="cuda")
    y = torch.randint(0, 3, (4,), device="cuda")

    def step(batch):
        pipe.before_step(batch=batch, targets=y)
        logits = model(batch)
        loss = pipe.compute_loss(torch.nn.functional.cross_entropy(logits, y))
        loss.backward()
        steadytrain.step_optimizer(optimizer, pipe.after_backward())
        pipe.consolidate()
        optimizer.zero_grad()

    for _ in range(3):  # first-step checks and allocations
        step(x)
    weights = copy.deepcopy(model.state_dict())
    with no_host_sync():
        step(x * float("nan"))  # the guard skips it, on the device
    assert all(torch.equal(model.state_dict()[k], weights[k]) for k in weights)
    with no_host_sync():
        for _ in range(3):
            step(x)
    assert pipe.run.skipped_steps == 1 and pipe.run.step == 7
    assert not all(torch.equal(model.state_dict()[k], weights[k]) for k in weights)
