import tomllib

import pytest
import torch
from helpers import round_trip
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

import steadytrain
from steadytrain.plugins.ema import (
    EMA,
    _back_to_back,
    _masked_lerp_,
    ema_decay,
    ema_update_,
    multi_tensor,
)


def make_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8), torch.nn.Tanh(), torch.nn.Linear(8, 2)
    )


class SkipAt(steadytrain.Plugin):
    """Asks the host to skip the optimizer step at the given steps, with a tensor flag."""

    name = "skip_at"

    def __init__(self, steps, **kwargs):
        super().__init__(**kwargs)
        self.steps = set(steps)

    @steadytrain.hookimpl
    def after_backward(self, ctx):
        ctx.request_skip("test", when=torch.tensor(ctx.step in self.steps))


def train(pipe, model, steps, *, on_step=None, opt=None, seed=1, skips=None):
    """A plain host loop; returns the optimizer so a run can be continued.

    With *skips*, the host knows the steps to skip and never reads the pipeline's
    decision, which then reaches ``consolidate`` as a tensor.
    """
    opt = opt or torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    if pipe.run.model is None:
        pipe.setup(model, opt, total_steps=100)
    for _ in range(steps):
        # The batch depends on the step alone, so a resumed run sees the same data.
        gen = torch.Generator().manual_seed(1000 * seed + pipe.run.step)
        x = torch.randn(16, 4, generator=gen)
        pipe.before_step()
        loss = pipe.compute_loss(model(x).pow(2).mean())
        loss.backward()
        outcome = pipe.after_backward()
        if not (pipe.run.step in skips if skips is not None else outcome.skip):
            opt.step()
        pipe.consolidate()
        opt.zero_grad()
        if on_step is not None:
            on_step(pipe.run.step - 1)
    return opt


def reference_run(config, steps, update_steps, multi_avg_fn=None, buffers=False):
    """AveragedModel updated after the given optimizer steps of the same trajectory."""
    model = make_model()
    decay = config.decay
    averaged = AveragedModel(
        model, multi_avg_fn=multi_avg_fn or get_ema_multi_avg_fn(decay), use_buffers=buffers
    )
    pipe = steadytrain.Pipeline([SkipAt(())])

    def on_step(step):
        if step in update_steps:
            averaged.update_parameters(model)

    train(pipe, model, steps, on_step=on_step)
    return averaged


def ema_run(config, steps, skip=(), **kwargs):
    model = make_model()
    plugin = EMA(config, **kwargs)
    pipe = steadytrain.Pipeline([SkipAt(skip), plugin])
    train(pipe, model, steps)
    return model, plugin, pipe


def assert_matches(plugin, averaged):
    exported = plugin.averaged_state_dict()
    for name, tensor in averaged.module.named_parameters():
        torch.testing.assert_close(exported[name], tensor, rtol=1e-6, atol=1e-7)


def test_ema_update_is_the_exponential_average():
    torch.manual_seed(0)
    averaged = [torch.randn(3, 4), torch.randn(5)]
    current = [torch.randn(3, 4), torch.randn(5)]
    expected = [0.9 * a + 0.1 * c for a, c in zip(averaged, current, strict=True)]
    ema_update_(averaged, current, 0.9)
    for got, want in zip(averaged, expected, strict=True):
        torch.testing.assert_close(got, want)


def test_warmup_decay_follows_the_formula():
    assert ema_decay(0.999, 1) == pytest.approx(2 / 11)
    assert ema_decay(0.999, 50) == pytest.approx(51 / 60)
    assert ema_decay(0.9, 1000) == 0.9
    assert ema_decay(0.999, 1, warmup=False) == 0.999


def test_matches_averaged_model_with_ema_fn():
    config = EMA.Config(decay=0.9, warmup=False)
    _, plugin, _ = ema_run(config, 12)
    assert_matches(plugin, reference_run(config, 12, range(12)))
    assert plugin.num_updates == 12


def test_warmup_matches_averaged_model_counting_updates():
    config = EMA.Config(decay=0.95, warmup=True)
    _, plugin, _ = ema_run(config, 40)
    assert_matches(plugin, reference_run(config, 40, range(40), warmup_fn(0.95)))


def test_every_and_start_step_select_the_update_steps():
    config = EMA.Config(decay=0.8, warmup=False, every=3, start_step=4)
    _, plugin, _ = ema_run(config, 14)
    assert_matches(plugin, reference_run(config, 14, {4, 7, 10, 13}))
    assert plugin.num_updates == 4


def warmup_fn(decay):
    def update(averaged, current, num_averaged):
        # AveragedModel copies on its first call, so num_averaged counts from 1 here,
        # as the plugin's n does for its first averaging update.
        torch._foreach_lerp_(
            averaged, current, 1 - min(decay, (1 + num_averaged) / (10 + num_averaged))
        )

    return update


@pytest.mark.parametrize("host_reads_decision", [True, False])
@pytest.mark.parametrize("warmup", [False, True])
def test_skipped_steps_do_not_update_the_average(host_reads_decision, warmup):
    config = EMA.Config(decay=0.8, warmup=warmup)
    model = make_model()
    plugin = EMA(config)
    pipe = steadytrain.Pipeline([SkipAt({0, 2, 5}), plugin])
    train(pipe, model, 8, skips=None if host_reads_decision else {0, 2, 5})
    # The count stays on the device (no sync) exactly when the host left the decision there.
    assert isinstance(plugin._count, torch.Tensor) is not host_reads_decision
    fn = warmup_fn(0.8) if warmup else get_ema_multi_avg_fn(0.8)
    averaged = AveragedModel(make_model(), multi_avg_fn=fn)
    reference = make_model()

    def on_step(step):
        if step not in {0, 2, 5}:
            averaged.update_parameters(reference)

    train(steadytrain.Pipeline([SkipAt({0, 2, 5})]), reference, 8, on_step=on_step)
    assert plugin.num_updates == 5
    assert_matches(plugin, averaged)


def test_buffers_are_averaged_and_integer_buffers_left_alone():
    config = EMA.Config(decay=0.8, warmup=False, buffers=True)
    _, plugin, _ = ema_run(config, 6)
    reference = reference_run(config, 6, range(6), buffers=True)
    exported = plugin.averaged_state_dict()
    assert "1.num_batches_tracked" not in plugin.names
    torch.testing.assert_close(exported["1.running_mean"], reference.module[1].running_mean)
    torch.testing.assert_close(exported["1.running_var"], reference.module[1].running_var)


def test_include_selects_parameters():
    config = EMA.Config(decay=0.8, warmup=False)
    model, plugin, _ = ema_run(config, 5, include=["0.*"], exclude=["*.bias"])
    assert plugin.names == ["0.weight"]
    exported = plugin.averaged_state_dict()
    # Unselected entries are the training weights.
    assert torch.equal(exported["3.weight"], model[3].weight)
    assert not torch.equal(exported["0.weight"], model[0].weight)


@pytest.mark.parametrize("swap", ["auto", "copy"])
def test_evaluation_swaps_averages_in_and_training_weights_back(swap):
    model, plugin, pipe = ema_run(EMA.Config(decay=0.8, swap=swap), 5)
    training = {n: p.detach().clone() for n, p in model.named_parameters()}
    pointers = [p.data_ptr() for p in model.parameters()]
    averaged = plugin.averaged_state_dict()
    with pipe.evaluating():
        for name, param in model.named_parameters():
            assert torch.equal(param, averaged[name])
        assert torch.equal(plugin.averaged_state_dict()["0.weight"], averaged["0.weight"])
        if swap == "copy":
            assert [p.data_ptr() for p in model.parameters()] == pointers
    for name, param in model.named_parameters():
        assert torch.equal(param, training[name])
    assert [p.data_ptr() for p in model.parameters()] == pointers
    # Training goes on from the training weights, and the average with it.
    train(pipe, model, 2)
    assert plugin.num_updates == 7


def test_evaluation_before_the_first_update_uses_training_weights():
    model = make_model()
    plugin = EMA(EMA.Config(start_step=10))
    pipe = steadytrain.Pipeline([plugin])
    train(pipe, model, 3)
    training = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pipe.evaluating():
        for name, param in model.named_parameters():
            assert torch.equal(param, training[name])


def test_teardown_leaves_training_weights_in_the_model():
    model, _, pipe = ema_run(EMA.Config(decay=0.8), 4)
    training = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pipe.evaluating():
        assert not torch.equal(model[0].weight, training["0.weight"])
        pipe.close()
        for name, param in model.named_parameters():
            assert torch.equal(param, training[name])


def test_export_fills_every_name_of_a_tied_weight():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Embedding(6, 4), torch.nn.Linear(4, 6, bias=False))
    model[1].weight = model[0].weight
    plugin = EMA(EMA.Config(decay=0.5, warmup=False))
    pipe = steadytrain.Pipeline([plugin]).setup(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    for _ in range(3):
        pipe.before_step()
        pipe.compute_loss(model(torch.arange(6)).pow(2).mean()).backward()
        pipe.after_backward()
        opt.step()
        pipe.consolidate()
        opt.zero_grad()
    exported = plugin.averaged_state_dict()
    assert plugin.names == ["0.weight"]
    assert torch.equal(exported["1.weight"], plugin.shadow[0])
    assert torch.equal(exported["0.weight"], plugin.shadow[0])
    assert not torch.equal(plugin.shadow[0], model[0].weight)


def test_averaged_state_dict_loads_into_the_model():
    _, plugin, _ = ema_run(EMA.Config(decay=0.8), 4)
    fresh = make_model()
    fresh.load_state_dict(plugin.averaged_state_dict())
    with torch.no_grad():
        for (name, param), average in zip(fresh.named_parameters(), plugin.shadow, strict=True):
            assert name in plugin.names
            assert torch.equal(param, average)


def test_shadow_on_cpu_option():
    _, plugin, _ = ema_run(EMA.Config(decay=0.8, warmup=False, device="cpu"), 6)
    assert all(t.device.type == "cpu" for t in plugin.shadow)
    assert_matches(plugin, reference_run(EMA.Config(decay=0.8), 6, range(6)))


def test_resume_is_bit_exact():
    config = EMA.Config(decay=0.9)
    _, plugin, _ = ema_run(config, 12)

    first = make_model()
    pipe = steadytrain.Pipeline([SkipAt(()), EMA(config)])
    opt = train(pipe, first, 6)
    buffer = round_trip({"pipe": pipe.state_dict(), "model": first.state_dict(),
                "opt": opt.state_dict()})
    saved = buffer

    resumed_model = make_model()
    resumed_model.load_state_dict(saved["model"])
    resumed = steadytrain.Pipeline([SkipAt(()), EMA(config)])
    resumed.load_state_dict(saved["pipe"])
    resumed_opt = torch.optim.SGD(resumed_model.parameters(), lr=0.1, momentum=0.9)
    resumed_opt.load_state_dict(saved["opt"])
    resumed.setup(resumed_model, resumed_opt, total_steps=100)
    train(resumed, resumed_model, 6, opt=resumed_opt)

    ours = resumed.plugins["ema"]
    assert ours.num_updates == plugin.num_updates == 12
    for got, want in zip(ours.shadow, plugin.shadow, strict=True):
        assert torch.equal(got, want)


def test_checkpoint_with_other_tensors_is_refused():
    _, plugin, _ = ema_run(EMA.Config(), 2, include=["0.*"])
    other = EMA(EMA.Config(), include=["3.*"])
    steadytrain.Pipeline([other]).setup(make_model())
    with pytest.raises(steadytrain.CheckpointError, match=r"ema: the checkpoint averages other"):
        other.load_state_dict(plugin.state_dict())


def test_checkpoint_with_other_shapes_is_refused():
    _, plugin, _ = ema_run(EMA.Config(), 2, include=["0.weight"])
    state = plugin.state_dict()
    state["shadow"] = {"0.weight": torch.zeros(3, 3)}
    with pytest.raises(steadytrain.CheckpointError,
                       match=r"ema: shadow of '0\.weight' has shape \(3, 3\) in the checkpoint"):
        plugin.load_state_dict(state)


def test_configured_from_toml():
    text = """
    [[plugins]]
    plugin = "ema"
    id = "ema_enc"
    decay = 0.99
    every = 2
    include = ["0.*"]
    """
    config = steadytrain.load_config(tomllib.loads(text))
    assert config.plugins[0].options == EMA.Config(decay=0.99, every=2)
    pipe = steadytrain.Pipeline.from_config(tomllib.loads(text))
    train(pipe, make_model(), 4)
    assert pipe.plugins["ema_enc"].num_updates == 2
    assert pipe.plugins["ema_enc"].names == ["0.weight", "0.bias"]


def test_listed_by_the_registry():
    assert steadytrain.Registry.discover().get("ema") is EMA


@pytest.mark.parametrize("decay", [1.5, 0.0, 1.0])
def test_decay_outside_the_open_unit_interval_is_an_error(decay):
    with pytest.raises(steadytrain.ConfigError, match=r"plugins\[0\]\.decay: must be in \(0"):
        steadytrain.load_config({"plugins": [{"plugin": "ema", "decay": decay}]})


def test_bad_device_option_is_an_error():
    with pytest.raises(steadytrain.ConfigError, match=r"plugins\[0\]\.device: must be one of"):
        steadytrain.load_config({"plugins": [{"plugin": "ema", "device": "gpu"}]})


def test_pattern_matching_nothing_is_an_error():
    pipe = steadytrain.Pipeline([EMA(EMA.Config(), id="avg", include=["encoder.*"])])
    with pytest.raises(steadytrain.FilterError, match=r"avg\.include: pattern 'encoder\.\*'"):
        pipe.setup(make_model())


def test_selecting_nothing_is_an_error():
    pipe = steadytrain.Pipeline([EMA(EMA.Config(), include=["0.*"], exclude=["0.*"])])
    with pytest.raises(steadytrain.FilterError, match=r"ema: include .* select none of"):
        pipe.setup(make_model())


def test_missing_model_is_an_error():
    with pytest.raises(steadytrain.ConfigError, match="ema: the ema plugin needs a model"):
        steadytrain.Pipeline([EMA()]).setup(None)


def test_start_step_at_or_past_total_steps_is_refused_naming_instance_and_option():
    for start in (100, 250):
        pipe = steadytrain.Pipeline([EMA(EMA.Config(start_step=start), id="avg")])
        with pytest.raises(steadytrain.ConfigError,
                           match=rf"avg\.start_step: is {start}, but the run has total_steps "
                           r"= 100 optimizer steps \(0 … 99\), so nothing would ever be "
                           "averaged"):
            pipe.setup(make_model(), total_steps=100)


def test_start_step_on_the_last_step_averages_once():
    model = make_model()
    plugin = EMA(EMA.Config(start_step=4))
    pipe = steadytrain.Pipeline([plugin]).setup(model, total_steps=5)
    train(pipe, model, 5)
    assert plugin.num_updates == 1
    assert torch.equal(plugin.averaged_state_dict()["0.weight"], model[0].weight)


def test_a_selection_of_integer_buffers_only_is_refused():
    pipe = steadytrain.Pipeline([EMA(EMA.Config(buffers=True), id="avg",
                                     include=["1.num_batches_tracked"])])
    with pytest.raises(steadytrain.FilterError,
                       match=r"avg\.include/exclude: the patterns select only integer tensors "
                       r"\(1\.num_batches_tracked\), which cannot be averaged"):
        pipe.setup(make_model())


def test_checkpoint_missing_an_entry_is_refused():
    _, plugin, _ = ema_run(EMA.Config(), 2)
    state = plugin.state_dict()
    del state["num_updates"]
    with pytest.raises(steadytrain.CheckpointError,
                       match=r"'ema'.*has keys \['shadow'\], expected \['num_updates', 'shadow'\]"):
        plugin.load_state_dict(state)


# -- the update on the device, and over weights that lie in one buffer ---------------------


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
#: Devices and dtypes whose skip-aware update runs on the device (torch's fused SGD kernel).
ON_DEVICE = [pytest.param("cpu", torch.float32, id="cpu-float32"),
             pytest.param("cpu", torch.float64, id="cpu-float64"),
             *(pytest.param("cuda", dtype, id=f"cuda-{str(dtype)[6:]}", marks=cuda)
               for dtype in (torch.float32, torch.bfloat16, torch.float16))]


@pytest.mark.parametrize(("device", "dtype"), ON_DEVICE)
@pytest.mark.parametrize("weight", [1e-3, 0.3, 1.0])
def test_the_masked_lerp_is_torchs_lerp_unless_skipped(device, dtype, weight):
    gen = torch.Generator().manual_seed(int(weight * 1000))
    shapes = [(33, 7), (5,), (1000,), ()]
    averaged = [torch.randn(s, generator=gen).to(device, dtype) for s in shapes]
    current = [torch.randn(s, generator=gen).to(device, dtype) for s in shapes]
    before = [a.clone() for a in averaged]
    w = torch.tensor(weight, device=device)
    _masked_lerp_(averaged, current, w, torch.tensor(1.0, device=device))
    for got, want in zip(averaged, before, strict=True):
        assert torch.equal(got, want)
    _masked_lerp_(averaged, current, w, torch.tensor(0.0, device=device))
    for got, a, c in zip(averaged, before, current, strict=True):
        exact = torch.lerp(a.double(), c.double(), w.item())  # the weight is a float32
        # one rounding of the result (two where the kernel rounds a − c first)
        torch.testing.assert_close(got.double(), exact, rtol=2 * torch.finfo(dtype).eps,
                                   atol=2 * torch.finfo(dtype).eps * c.abs().max().item())
        torch.testing.assert_close(got, torch.lerp(a, c, w.item()), rtol=2 * torch.finfo(
            dtype).eps, atol=2 * torch.finfo(dtype).eps * c.abs().max().item())


def host_and_device_runs(config, model_fn, skip, steps=8):
    """The same trajectory averaged twice: the host knows the skips (plain updates), or
    hands the plugin the device-side flag."""
    host, device = EMA(config, id="host"), EMA(config, id="device")
    model = model_fn()
    pipe = steadytrain.Pipeline([host, device]).setup(model, total_steps=100)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for step in range(steps):
        gen = torch.Generator().manual_seed(step)
        loss = model(torch.randn(16, 4, generator=gen).to(next(model.parameters()))).square()
        loss.mean().backward()
        if step not in skip:
            opt.step()
            host.update()
        device.update(skip=torch.tensor(step in skip))
        opt.zero_grad()
    return host, device, pipe


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_shadows_on_the_cpu_read_the_flag_on_the_host(dtype):
    def model_fn():
        return make_model().to(dtype)

    host, device, _ = host_and_device_runs(EMA.Config(decay=0.8), model_fn, skip={0, 3})
    assert not isinstance(device._count, torch.Tensor)  # read: torch's CPU kernel skips them
    assert device.num_updates == host.num_updates == 6
    for got, want in zip(device.shadow, host.shadow, strict=True):
        assert torch.equal(got, want)
    assert not all(torch.equal(a, s) for a, s in zip(device.shadow, model_fn().parameters(),
                                                     strict=True))


@pytest.mark.parametrize("warmup", [False, True])
def test_the_device_count_continues_after_the_host_read_it(warmup):
    config = EMA.Config(decay=0.8, warmup=warmup)
    host, device, _ = host_and_device_runs(config, make_model, skip={0, 1, 4})
    assert isinstance(device._count, torch.Tensor)
    assert device.num_updates == host.num_updates == 5  # reads it: the count is the host's
    assert not isinstance(device._count, torch.Tensor)
    for got, want in zip(device.shadow, host.shadow, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)


def flatten_(model: torch.nn.Module) -> torch.Tensor:
    """Move the model's parameters into one buffer, back to back (a host's flat layout)."""
    params = list(model.parameters())
    flat = torch.cat([p.detach().reshape(-1) for p in params])
    offset = 0
    for p in params:
        p.data = flat[offset:offset + p.numel()].view_as(p)
        offset += p.numel()
    return flat


def flat_model() -> torch.nn.Module:
    model = make_model()
    flatten_(model)
    return model


@pytest.mark.parametrize("skip", [set(), {0, 3}], ids=["host decides", "device flag"])
def test_weights_in_one_buffer_are_averaged_as_one_buffer(skip):
    config = EMA.Config(decay=0.8)
    model = flat_model()
    plugin = EMA(config)
    pipe = steadytrain.Pipeline([SkipAt(skip), plugin])
    train(pipe, model, 8, skips=skip or None)
    reference_model = make_model()
    reference = EMA(config)
    train(steadytrain.Pipeline([SkipAt(skip), reference]), reference_model, 8,
          skips=skip or None)
    parameters = [plugin.shadow[plugin.names.index(n)] for n, _ in model.named_parameters()]
    assert _back_to_back(parameters) is not None  # the shadow mirrors the layout
    assert plugin._pairs[0]._flat is not None
    for got, want in zip(plugin.shadow, reference.shadow, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)
    with pipe.evaluating():
        for name, param in model.named_parameters():
            assert torch.equal(param, plugin.averaged_state_dict()[name])
    assert _back_to_back(list(model.parameters())) is not None


def test_a_parameter_moved_out_of_the_buffer_is_still_followed():
    config = EMA.Config(decay=0.8, warmup=False)
    model = flat_model()
    plugin = EMA(config)
    pipe = steadytrain.Pipeline([plugin])
    opt = train(pipe, model, 2)
    first = next(model.parameters())
    first.data = first.data.clone()  # the host re-points it: the buffer is not its own any more
    train(pipe, model, 1, opt=opt)
    assert plugin._pairs[0]._flat is None
    reference = AveragedModel(make_model(), multi_avg_fn=get_ema_multi_avg_fn(0.8))
    twin = make_model()
    train(steadytrain.Pipeline([SkipAt(())]), twin, 3,
          on_step=lambda step: reference.update_parameters(twin))
    assert_matches(plugin, reference)


@cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("warmup", [False, True])
def test_on_cuda_the_skip_aware_update_matches_the_plain_one_without_a_host_sync(
    dtype, warmup
):
    torch.manual_seed(0)
    model = torch.nn.Sequential(*(torch.nn.Linear(64, 64) for _ in range(3))).to("cuda", dtype)
    host, device = EMA(EMA.Config(decay=0.9, warmup=warmup), id="host"), EMA(
        EMA.Config(decay=0.9, warmup=warmup), id="device")
    steadytrain.Pipeline([host, device]).setup(model, total_steps=100)
    skip = {0, 3}
    flags = [torch.tensor(step in skip, device="cuda") for step in range(8)]
    for step, flag in enumerate(flags):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p), alpha=0.1)
        if step not in skip:
            host.update()
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            device.update(skip=flag)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    assert device.num_updates == host.num_updates == 6
    tolerance = {torch.float32: 1e-5, torch.bfloat16: 2e-2}[dtype]
    for got, want in zip(device.shadow, host.shadow, strict=True):
        torch.testing.assert_close(got, want, rtol=tolerance, atol=tolerance)


# -- the one-launch update (Triton, on CUDA) ---------------------------------------------

triton_cuda = pytest.mark.skipif(
    not (torch.cuda.is_available() and multi_tensor.available(torch.empty(0, device="cuda"))),
    reason="needs CUDA and Triton")


@triton_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("weight", [1e-3, 0.3, 0.5, 1.0])
def test_the_one_launch_update_is_torchs_lerp_unless_skipped(dtype, weight):
    gen = torch.Generator().manual_seed(int(weight * 1000))
    block = multi_tensor.BLOCK
    shapes = [(), (5,), (block,), (block + 1,), (3, block - 1), (2, 3 * block + 7)]
    averaged = [torch.randn(s, generator=gen).to("cuda", dtype) for s in shapes]
    current = [torch.randn(s, generator=gen).to("cuda", dtype) for s in shapes]
    lerp = multi_tensor.MultiTensorLerp(averaged, current)
    before = [a.clone() for a in averaged]
    lerp(torch.tensor(weight, device="cuda"), torch.tensor(1.0, device="cuda"))
    assert all(torch.equal(a, b) for a, b in zip(averaged, before, strict=True))
    lerp(torch.tensor(weight, device="cuda"), torch.tensor(0.0, device="cuda"))
    for got, a, c in zip(averaged, before, current, strict=True):
        torch.testing.assert_close(got, torch.lerp(a, c, weight), rtol=0, atol=0)
    again = [a.clone() for a in averaged]
    lerp(weight)  # the weight from the host
    for got, a, c in zip(averaged, again, current, strict=True):
        torch.testing.assert_close(got, torch.lerp(a, c, weight), rtol=0, atol=0)


@triton_cuda
def test_on_cuda_the_plugin_updates_in_one_launch_and_follows_re_pointed_weights():
    torch.manual_seed(0)
    model = torch.nn.Sequential(*(torch.nn.Linear(16, 16) for _ in range(3))).cuda()
    plugin = EMA(EMA.Config(decay=0.8, warmup=False))
    steadytrain.Pipeline([plugin]).setup(model)
    reference = [p.detach().clone() for p in model.parameters()]
    plugin.update()
    keep = torch.tensor(False, device="cuda")
    for step in range(4):
        if step == 2:
            middle = model[1].weight
            middle.data = middle.data.clone()  # a new address, mid-list
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p), alpha=0.1)
        if step % 2:
            plugin.update(skip=keep)
        else:
            plugin.update()
        assert plugin._pairs[0]._launcher() is not None
        torch._foreach_lerp_(reference, [p.detach() for p in model.parameters()], 0.2)
    for got, want in zip(plugin.shadow, reference, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


@triton_cuda
def test_on_cuda_a_weight_given_storage_the_launch_cannot_take_is_an_error_naming_the_instance():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 4)).cuda()
    plugin = EMA(EMA.Config(decay=0.5), id="avg")
    steadytrain.Pipeline([plugin]).setup(model)
    plugin.update()
    plugin.update()
    model[1].weight.data = torch.randn(8, 4, device="cuda")[::2]  # same shape, strided
    with pytest.raises(steadytrain.UsageError, match=r"avg: a weight .* not contiguous"):
        plugin.update()
    model[1].weight.data = torch.randn(4, 4, device="cuda")  # storage it can take again
    plugin.update()
    assert plugin.num_updates == 3
