import math
import tomllib

import pytest
import torch
from helpers import no_host_sync, round_trip

import steadytrain
from steadytrain.plugins.grad_clip import (
    ClipGroup,
    GradClip,
    adaptive_thresholds,
    clip_coefficients,
    clip_grad_groups_,
    coefficient_kernel,
    grad_group_norms,
    unitwise_clip_grad_,
    unitwise_kernel,
)


class Net(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.encoder = torch.nn.Linear(4, 8)
        self.memory = torch.nn.Linear(8, 8)
        self.head = torch.nn.Linear(8, 2)


def fill_grads(model, seed, scale=10.0):
    gen = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=gen) * scale


def grads_of(model):
    return {n: p.grad.clone() for n, p in model.named_parameters()}


def step(pipe, model, seed, scale=10.0):
    """One optimizer step of a host whose backward left random gradients."""
    pipe.before_step()
    fill_grads(model, seed, scale)
    pipe.after_backward()
    pipe.consolidate()
    return grads_of(model)


def reference_clip(seed, groups, scale=10.0):
    """clip_grad_norm_ applied to each group (name patterns by prefix) in turn."""
    model = Net()
    fill_grads(model, seed, scale)
    named = dict(model.named_parameters())
    norms = {}
    for name, prefixes, max_norm, norm_type in groups:
        params = [p for n, p in named.items() if n.startswith(prefixes)]
        norms[name] = torch.nn.utils.clip_grad_norm_(params, max_norm, norm_type)
    return grads_of(model), norms


@pytest.mark.parametrize("norm_type", [2.0, 1.0, math.inf])
def test_plain_function_matches_clip_grad_norm_per_group(norm_type):
    model, reference = Net(), Net()
    fill_grads(model, 3)
    fill_grads(reference, 3)
    groups = [[model.memory.weight, model.memory.bias],
              [model.encoder.weight, model.encoder.bias, model.head.weight, model.head.bias]]
    norms = clip_grad_groups_(groups, [0.5, 1.0], norm_type)
    want_memory = torch.nn.utils.clip_grad_norm_(reference.memory.parameters(), 0.5, norm_type)
    rest = [*reference.encoder.parameters(), *reference.head.parameters()]
    want_rest = torch.nn.utils.clip_grad_norm_(rest, 1.0, norm_type)
    torch.testing.assert_close(norms, torch.stack([want_memory, want_rest]))
    for got, want in zip(model.parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(got.grad, want.grad)


def test_group_norms_of_empty_groups_are_zero():
    grad = torch.randn(3)
    norms = grad_group_norms([[], [grad]], [1.0, 2.0])
    torch.testing.assert_close(norms, torch.stack([torch.tensor(0.0), grad.norm()]))


def test_plugin_clips_each_group_like_clip_grad_norm():
    config = GradClip.Config(max_norm=1.0, groups=(ClipGroup("memory", ("memory.*",),
                                                             max_norm=0.5),))
    model = Net()
    pipe = steadytrain.Pipeline([GradClip(config)]).setup(model)
    got = step(pipe, model, seed=5)
    want, norms = reference_clip(5, [("memory", ("memory.",), 0.5, 2.0),
                                     ("default", ("encoder.", "head."), 1.0, 2.0)])
    assert all(n > 1.0 for n in norms.values())  # both groups were clipped
    for name in want:
        torch.testing.assert_close(got[name], want[name])
    metrics = pipe.metrics()
    for group, limit in (("memory", 0.5), ("default", 1.0)):
        assert metrics[f"grad_clip/{group}/pre_norm"] == pytest.approx(norms[group].item())
        assert metrics[f"grad_clip/{group}/post_norm"] == pytest.approx(limit, rel=1e-5)


def test_per_group_norm_types():
    config = GradClip.Config(max_norm=1.0, norm_type=1.0, groups=(
        ClipGroup("memory", ("memory.*",), max_norm=0.5, norm_type=math.inf),))
    model = Net()
    pipe = steadytrain.Pipeline([GradClip(config)]).setup(model)
    got = step(pipe, model, seed=6)
    want, _ = reference_clip(6, [("memory", ("memory.",), 0.5, math.inf),
                                 ("default", ("encoder.", "head."), 1.0, 1.0)])
    for name in want:
        torch.testing.assert_close(got[name], want[name])


def test_norms_below_the_threshold_leave_gradients_alone():
    model = Net()
    pipe = steadytrain.Pipeline([GradClip(GradClip.Config(max_norm=1e6))]).setup(model)
    pipe.before_step()
    fill_grads(model, 7)
    before = grads_of(model)
    pipe.after_backward()
    for name, grad in grads_of(model).items():
        torch.testing.assert_close(grad, before[name])


def test_parameters_without_gradients_are_skipped():
    model = Net()
    pipe = steadytrain.Pipeline([GradClip(GradClip.Config(max_norm=0.5))]).setup(model)
    pipe.before_step()
    fill_grads(model, 8)
    model.memory.weight.grad = None
    pipe.after_backward()
    reference = Net()
    fill_grads(reference, 8)
    reference.memory.weight.grad = None
    torch.nn.utils.clip_grad_norm_(reference.parameters(), 0.5)
    assert model.memory.weight.grad is None
    torch.testing.assert_close(model.head.weight.grad, reference.head.weight.grad)


def test_plugin_include_limits_the_clipped_parameters():
    model = Net()
    plugin = GradClip(GradClip.Config(max_norm=0.5), include=["head.*"])
    pipe = steadytrain.Pipeline([plugin]).setup(model)
    pipe.before_step()
    fill_grads(model, 9)
    before = grads_of(model)
    pipe.after_backward()
    assert torch.equal(model.encoder.weight.grad, before["encoder.weight"])
    head = [model.head.weight.grad, model.head.bias.grad]
    total = torch.linalg.vector_norm(torch.stack([g.norm() for g in head]))
    torch.testing.assert_close(total, torch.tensor(0.5), rtol=1e-5, atol=0)


def agc_reference(param, grad, clipping, eps):
    """AGC written out row by row."""
    out = grad.clone()
    rows = [(param, grad, out)] if param.ndim <= 1 else zip(param, grad, out, strict=True)
    for w, g, o in rows:
        limit = clipping * max(w.norm().item(), eps)
        norm = g.norm().item()
        if norm > limit:
            o.copy_(g * (limit / norm))
    return out


def test_unitwise_clipping_matches_the_formula():
    torch.manual_seed(1)
    params = [torch.randn(6, 3, 2), torch.randn(5), torch.zeros(4)]
    for p in params:
        p.grad = torch.randn(p.shape)
    params[0].grad[0] *= 1e-4  # a row that is not clipped
    expected = [agc_reference(p, p.grad, 0.1, 1e-3) for p in params]
    unitwise_clip_grad_(params, clipping=0.1, eps=1e-3)
    for p, want in zip(params, expected, strict=True):
        torch.testing.assert_close(p.grad, want)
    assert torch.equal(params[0].grad[0], expected[0][0])


def same_shaped(seed, device="cpu"):
    """Tensors that AGC clips in stacks (several of each shape, scalars too) and alone (a
    shape of its own, and one above the stacking size), with rows both clipped and not."""
    gen = torch.Generator().manual_seed(seed)
    shapes = [(6, 5)] * 4 + [(3, 2, 2, 2)] * 3 + [(7,)] * 5 + [()] * 3 + [(4, 9), (1100, 1000)]
    params = [torch.randn(shape, generator=gen).to(device) for shape in shapes]
    for index, p in enumerate(params):
        p.grad = (torch.randn(p.shape, generator=gen) * 10.0 ** (index % 3 - 1)).to(device)
    return params


on_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=on_cuda)])
@pytest.mark.parametrize("stack_bytes", [None, 300], ids=["one stack a shape", "small stacks"])
def test_unitwise_clipping_in_stacks_matches_the_formula(stack_bytes, device, monkeypatch):
    from steadytrain.plugins import grad_clip

    if stack_bytes is not None:  # stacks of a few tensors each
        monkeypatch.setattr(grad_clip, "_STACK_BYTES", stack_bytes)
    params = same_shaped(5, device)
    expected = [agc_reference(p.cpu(), p.grad.cpu(), 0.1, 1e-3) for p in params]
    if device == "cuda":  # and never waits for the device
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
    try:
        unitwise_clip_grad_(params, clipping=0.1, eps=1e-3)
    finally:
        if device == "cuda":
            torch.cuda.set_sync_debug_mode("default")
    for p, want in zip(params, expected, strict=True):
        torch.testing.assert_close(p.grad.cpu(), want)


@pytest.mark.skipif(not (torch.cuda.is_available() and unitwise_kernel.available(
    torch.empty(1, device="cuda"), torch.empty(1, device="cuda"))), reason="needs CUDA and Triton")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_on_cuda_the_one_pass_kernel_clips_like_torchs_kernels(dtype, monkeypatch):
    from steadytrain.plugins import grad_clip

    def made():
        params = same_shaped(7, "cuda")
        gen = torch.Generator().manual_seed(8)
        long_rows = torch.randn(2, 3, 20000, generator=gen).cuda()  # over MAX_BLOCK
        params.append(long_rows[0])
        params[-1].grad = long_rows[1] * 10
        for p in params:
            p.data, p.grad = p.data.to(dtype), p.grad.to(dtype)
        return params

    one_pass, by_torch = made(), made()
    norms, factors = grad_clip._unitwise_clip_(one_pass, 0.1, 1e-3)
    assert all(n.ndim == 1 for n in norms)  # one a row: the kernel's output
    monkeypatch.setattr(unitwise_kernel, "available", lambda weight, grad: False)
    want_norms, want_factors = grad_clip._unitwise_clip_(by_torch, 0.1, 1e-3)
    tolerance = {torch.float32: 1e-5, torch.bfloat16: 1e-2}[dtype]
    for got, want in zip(one_pass, by_torch, strict=True):
        torch.testing.assert_close(got.grad, want.grad, rtol=tolerance, atol=tolerance)

    def total(tensors):
        return torch.linalg.vector_norm(torch.cat([t.flatten().double() for t in tensors]))

    torch.testing.assert_close(total(norms), total(want_norms), rtol=tolerance, atol=0)
    torch.testing.assert_close(total([f * n for f, n in zip(factors, norms, strict=True)]),
                               total([f * n for f, n in zip(want_factors, want_norms,
                                                            strict=True)]),
                               rtol=tolerance, atol=0)


@pytest.mark.skipif(not (torch.cuda.is_available() and unitwise_kernel.available(
    torch.empty(1, device="cuda"), torch.empty(1, device="cuda"))), reason="needs CUDA and Triton")
def test_on_cuda_the_agc_plugin_clips_in_one_launch_like_torchs_kernels(monkeypatch):
    def run():
        params = same_shaped(9, "cuda")
        model = torch.nn.ParameterList(torch.nn.Parameter(p.detach()) for p in params)
        plugin = GradClip(GradClip.Config(mode="agc", clipping=0.1, groups=(
            ClipGroup("first", ("0", "1", "2")),)))
        pipe = steadytrain.Pipeline([plugin]).setup(model)
        pipe.before_step()
        for index, (mine, p) in enumerate(zip(model, params, strict=True)):
            mine.grad = None if index == 5 else p.grad.clone()  # one without a gradient
        with no_host_sync():
            pipe.after_backward()
        pipe.consolidate()
        metrics = pipe.metrics()
        pipe.close()
        return plugin, [p.grad for p in model], metrics

    plugin, grads, metrics = run()
    assert all(c is not None for c in plugin._clippers)
    monkeypatch.setattr(unitwise_kernel, "available", lambda weight, grad: False)
    plugin, want_grads, want_metrics = run()
    assert all(c is None for c in plugin._clippers)
    for got, want in zip(grads, want_grads, strict=True):
        assert (got is None) == (want is None)
        if got is not None:
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert metrics.keys() == want_metrics.keys()
    for name, value in want_metrics.items():
        assert metrics[name] == pytest.approx(value, rel=1e-5), name


@pytest.mark.parametrize("norm_type", [2.0, math.inf])
def test_agc_mode_reports_the_norms_before_and_after_clipping(norm_type):
    params = same_shaped(6)
    model = torch.nn.ParameterList(torch.nn.Parameter(p.detach()) for p in params)
    pipe = steadytrain.Pipeline([GradClip(GradClip.Config(
        mode="agc", clipping=0.1, norm_type=norm_type))]).setup(model)
    pipe.before_step()
    for mine, p in zip(model, params, strict=True):
        mine.grad = p.grad.clone()
    pipe.after_backward()
    pipe.consolidate()
    metrics = pipe.metrics()

    def total(tensors):  # in float64: a float32 norm of a million numbers is off by 1e-5
        return torch.linalg.vector_norm(torch.stack(
            [torch.linalg.vector_norm(t.double(), norm_type) for t in tensors]), norm_type).item()

    clipped = [agc_reference(p, p.grad, 0.1, 1e-3) for p in params]
    for p, want in zip(model, clipped, strict=True):  # scaled in place, outside autograd
        torch.testing.assert_close(p.grad, want)
        assert p.grad.grad_fn is None and not p.grad.requires_grad
    assert metrics["grad_clip/default/pre_norm"] == pytest.approx(
        total([p.grad for p in params]), rel=1e-5)
    assert metrics["grad_clip/default/post_norm"] == pytest.approx(total(clipped), rel=1e-5)
    assert metrics["grad_clip/default/post_norm"] < metrics["grad_clip/default/pre_norm"]


def test_agc_mode_uses_each_groups_clipping():
    config = GradClip.Config(mode="agc", clipping=0.05, groups=(
        ClipGroup("memory", ("memory.*",), clipping=0.2),))
    model = Net()
    pipe = steadytrain.Pipeline([GradClip(config)]).setup(model)
    got = step(pipe, model, seed=4)
    reference = Net()
    fill_grads(reference, 4)
    for name, p in reference.named_parameters():
        clipping = 0.2 if name.startswith("memory") else 0.05
        torch.testing.assert_close(got[name], agc_reference(p.detach(), p.grad, clipping, 1e-3))
    metrics = pipe.metrics()
    post = torch.linalg.vector_norm(torch.stack([got[n].norm() for n in got if "memory" in n]))
    assert metrics["grad_clip/memory/post_norm"] == pytest.approx(post.item(), rel=1e-5)


SCALES = [1.0, 1.2, 0.9, 1.1, 6.0, 1.0, 0.8, 5.0, 1.0, 1.3, float("inf"), 1.0]


def adaptive_reference(norms, max_norm, factor, beta, warmup):
    """Thresholds of the adaptive mode, written out with Python floats."""
    mean, limits = 0.0, []
    for seen, norm in enumerate(norms):
        limit = max_norm
        if seen >= max(warmup, 1):
            limit = min(max_norm, factor * mean / (1 - beta**seen))
        clipped = min(norm, limit)
        if math.isfinite(clipped):
            mean = beta * mean + (1 - beta) * clipped
        limits.append(limit)
    return limits


def adaptive_run(plugin, model, scales, first_seed=0):
    pipe = steadytrain.Pipeline([plugin]).setup(model)
    return pipe, [run_scaled(pipe, model, s, first_seed + i) for i, s in enumerate(scales)]


def run_scaled(pipe, model, scale, seed):
    pipe.before_step()
    fill_grads(model, seed, 1.0)
    with torch.no_grad():
        total = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in model.parameters()]))
        for p in model.parameters():
            p.grad.mul_(scale / total)
    pipe.after_backward()
    post = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in model.parameters()]))
    pipe.consolidate()
    return post.item()


def test_adaptive_mode_cuts_spikes_to_a_multiple_of_the_running_mean():
    config = GradClip.Config(mode="adaptive", max_norm=4.0, factor=2.0, beta=0.9, warmup=3)
    model = Net()
    _, post = adaptive_run(GradClip(config), model, SCALES)
    limits = adaptive_reference(SCALES, 4.0, 2.0, 0.9, 3)
    for got, scale, limit in zip(post, SCALES, limits, strict=True):
        if math.isfinite(scale):
            assert got == pytest.approx(min(scale, limit), rel=1e-5)
    # The spike at step 4 is cut to twice the running mean, well under max_norm.
    assert post[4] < 2.5
    assert limits[4] < 4.0


def test_adaptive_thresholds_follow_the_formula_and_keep_non_finite_norms_out():
    norms = torch.tensor([0.5, 9.0, float("nan"), float("inf")])
    mean = torch.tensor([1.0, 1.0, 2.0, 3.0])
    max_norms = torch.tensor([4.0, 4.0, 4.0, 4.0])
    limits, updated = adaptive_thresholds(norms, mean, max_norms, scale=2.5, beta=0.9)
    want_limits = [min(4.0, 2.5 * m) for m in (1.0, 1.0, 2.0, 3.0)]
    assert limits.tolist() == pytest.approx(want_limits)
    # The clipped norm min(norm, limit) enters the mean; NaN does not; inf is clipped.
    want_mean = [1.0 + 0.1 * (0.5 - 1.0), 1.0 + 0.1 * (2.5 - 1.0), 2.0, 3.0 + 0.1 * (4.0 - 3.0)]
    assert updated.tolist() == pytest.approx(want_mean)
    # During the warmup the threshold is max_norm.
    limits, updated = adaptive_thresholds(norms, mean, max_norms, scale=None, beta=0.9)
    assert limits is max_norms
    assert updated[1].item() == pytest.approx(1.0 + 0.1 * (4.0 - 1.0))


triton_cuda = pytest.mark.skipif(
    not (torch.cuda.is_available() and coefficient_kernel.available(
        torch.empty(1, device="cuda"))), reason="needs CUDA and Triton")


@triton_cuda
@pytest.mark.parametrize("scale", [None, 2.5], ids=["warmup", "warm"])
def test_on_cuda_the_coefficient_kernel_matches_torchs_kernels(scale):
    norms = torch.tensor([0.5, 9.0, float("nan"), float("inf"), 3.9], device="cuda")
    mean = torch.tensor([1.0, 1.0, 2.0, 3.0, 0.5], device="cuda")
    max_norms = torch.tensor([4.0, 4.0, 4.0, 4.0, 1.0], device="cuda")
    plain = coefficient_kernel.clip_factors(norms, max_norms)
    want = clip_coefficients(norms, max_norms)
    torch.testing.assert_close(plain[0], max_norms)
    torch.testing.assert_close(plain[1], want, equal_nan=True)
    torch.testing.assert_close(plain[2], norms * want, equal_nan=True)
    adaptive = coefficient_kernel.clip_factors(norms, max_norms, mean, scale=scale, weight=0.1)
    limits, updated = adaptive_thresholds(norms, mean, max_norms, scale=scale, beta=0.9)
    want = clip_coefficients(norms, limits)
    for got, expected in zip(adaptive, (limits, want, norms * want, updated), strict=True):
        torch.testing.assert_close(got, expected, equal_nan=True)


@triton_cuda
def test_on_cuda_the_adaptive_plugin_in_one_launch_follows_the_formula_without_a_host_sync():
    config = GradClip.Config(mode="adaptive", max_norm=4.0, factor=2.0, beta=0.9, warmup=3)
    model = Net().cuda()
    pipe = steadytrain.Pipeline([GradClip(config)]).setup(model)
    post = []
    for seed, scale in enumerate(SCALES):
        pipe.before_step()
        gen = torch.Generator().manual_seed(seed)
        for p in model.parameters():
            p.grad = torch.randn(p.shape, generator=gen).cuda()
        grads = [p.grad for p in model.parameters()]
        total = torch.linalg.vector_norm(torch.stack([g.norm() for g in grads]))
        torch._foreach_mul_(grads, scale / total)
        with no_host_sync():
            pipe.after_backward()
        post.append(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads])).item())
        pipe.consolidate()
    limits = adaptive_reference(SCALES, 4.0, 2.0, 0.9, 3)
    for got, scale, limit in zip(post, SCALES, limits, strict=True):
        if math.isfinite(scale):
            assert got == pytest.approx(min(scale, limit), rel=1e-5)
    pipe.close()


def test_adaptive_state_resumes_bit_exact():
    config = GradClip.Config(mode="adaptive", max_norm=4.0, beta=0.9, warmup=2)
    _, whole = adaptive_run(GradClip(config), Net(), SCALES)
    pipe, first = adaptive_run(GradClip(config), Net(), SCALES[:6])
    buffer = round_trip(pipe.state_dict())
    resumed = steadytrain.Pipeline([GradClip(config)])
    resumed.load_state_dict(buffer)
    model = Net()
    resumed.setup(model)
    second = [run_scaled(resumed, model, s, 6 + i) for i, s in enumerate(SCALES[6:])]
    torch.testing.assert_close(torch.tensor(first + second), torch.tensor(whole),
                               rtol=0, atol=0, equal_nan=True)


def test_adaptive_checkpoint_with_other_groups_is_refused():
    config = GradClip.Config(mode="adaptive")
    pipe, _ = adaptive_run(GradClip(config), Net(), [1.0])
    other = GradClip(GradClip.Config(mode="adaptive", groups=(ClipGroup("memory", ("memory.*",)),)))
    steadytrain.Pipeline([other]).setup(Net())
    with pytest.raises(steadytrain.CheckpointError, match="grad_clip: the checkpoint has groups"):
        other.load_state_dict(pipe.plugins["grad_clip"].state_dict())


def test_state_for_a_plugin_without_state_is_refused():
    plugin = GradClip()
    steadytrain.Pipeline([plugin]).setup(Net())
    assert plugin.state_dict() == {}
    with pytest.raises(steadytrain.CheckpointError, match=r"'grad_clip' .* keeps no state"):
        plugin.load_state_dict({"mean": torch.zeros(1), "seen": 3, "groups": ["default"]})


def test_configured_from_toml():
    text = """
    [[plugins]]
    plugin = "grad_clip"
    max_norm = 1.0
    groups = [{name = "memory", include = ["memory.*"], max_norm = 0.5}]
    """
    config = steadytrain.load_config(tomllib.loads(text))
    assert config.plugins[0].options.groups == (ClipGroup("memory", ("memory.*",), max_norm=0.5),)
    model = Net()
    pipe = steadytrain.Pipeline.from_config(tomllib.loads(text)).setup(model)
    got = step(pipe, model, seed=11)
    want, _ = reference_clip(11, [("memory", ("memory.",), 0.5, 2.0),
                                  ("default", ("encoder.", "head."), 1.0, 2.0)])
    for name in want:
        torch.testing.assert_close(got[name], want[name])


def test_listed_by_the_registry():
    assert steadytrain.Registry.discover().get("grad_clip") is GradClip


def test_overlapping_groups_are_an_error_naming_both():
    config = GradClip.Config(groups=(ClipGroup("memory", ("memory.*",)),
                                     ClipGroup("weights", ("*.weight",))))
    pipe = steadytrain.Pipeline([GradClip(config, id="clip")])
    with pytest.raises(steadytrain.ConfigError,
                       match=r"clip\.groups: parameter 'memory\.weight' is in both group "
                             r"'memory' and group 'weights'"):
        pipe.setup(Net())


def test_group_pattern_matching_nothing_is_an_error():
    config = GradClip.Config(groups=(ClipGroup("memory", ("*memroy*",)),))
    pipe = steadytrain.Pipeline([GradClip(config)])
    with pytest.raises(steadytrain.FilterError,
                       match=r"grad_clip\.groups\.memory\.include: pattern '\*memroy\*'"):
        pipe.setup(Net())


def test_plugin_pattern_matching_nothing_is_an_error():
    pipe = steadytrain.Pipeline([GradClip(exclude=["decoder.*"])])
    with pytest.raises(steadytrain.FilterError, match=r"grad_clip\.exclude: pattern"):
        pipe.setup(Net())


@pytest.mark.parametrize(("groups", "message"), [
    ([{"name": "a", "include": ["x"]}, {"name": "a", "include": ["y"]}],
     r"plugins\[0\]\.groups\[1\]\.name: 'a' is used twice"),
    ([{"name": "default", "include": ["x"]}],
     r"plugins\[0\]\.groups\[0\]\.name: 'default' is reserved"),
    ([{"name": "a", "include": []}], r"plugins\[0\]\.groups\[0\]\.include: must list"),
    ([{"name": "a", "include": ["x"], "max_norm": -1}], r"max_norm: must be a positive"),
    ([{"name": "a", "include": ["x"], "max_nrom": 1}], r"unknown key 'max_nrom'"),
])
def test_bad_groups_are_config_errors(groups, message):
    with pytest.raises(steadytrain.ConfigError, match=message):
        steadytrain.load_config({"plugins": [{"plugin": "grad_clip", "groups": groups}]})


@pytest.mark.parametrize(("option", "value"), [
    ("mode", "clip"), ("max_norm", 0), ("beta", 1.0), ("factor", 0.5), ("warmup", -1),
    ("norm_type", 0.0), ("norm_type", float("nan")),
])
def test_bad_options_are_config_errors(option, value):
    with pytest.raises(steadytrain.ConfigError, match=rf"plugins\[0\]\.{option}: "):
        steadytrain.load_config({"plugins": [{"plugin": "grad_clip", option: value}]})
