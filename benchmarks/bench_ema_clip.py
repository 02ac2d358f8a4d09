"""Speed of the ema and grad_clip plugins against torch's own foreach code and peers.

Times, per update, for models of 10M to 1B float32 parameters shaped like a transformer
(four h×h and two h×4h matrices a layer, plus biases and norms):

* EMA: the ``ema`` plugin's update, a bare ``torch._foreach_lerp_`` (the loop-free
  baseline), ``torch.optim.swa_utils.AveragedModel`` with ``get_ema_multi_avg_fn``,
  ``torch_ema.ExponentialMovingAverage`` and timm's ``ModelEmaV3`` (each where
  importable). Achieved bandwidth counts the fewest bytes an update must move: read the
  shadow and the weights, write the shadow (12 bytes a parameter).
  The skip-aware update (the skip decision left on the device, as in every sync-free
  loop) is timed too, with and without warmup, and given as a ratio to the plain update.
* Many small tensors (``--many``, 2000 tensors of 2100 parameters by default): the
  plugin's update against one ``lerp_`` over one flat buffer of the same bytes, a bare
  ``torch._foreach_lerp_``, and the plugin on the same weights moved into one buffer; on
  CUDA with Triton also where its time goes (kernel time, the host's check of the
  weights' addresses, the launch, the launch captured in a CUDA graph and replayed).
* Clipping: the ``grad_clip`` plugin's ``after_backward`` in each mode (two groups,
  metrics included) and the plain ``clip_grad_groups_``, against one
  ``clip_grad_norm_(foreach=True)`` per group and one over all parameters; on CUDA
  also the ratio of the kernels' GPU time (torch's profiler) to the per-group calls'.

Run: ``python benchmarks/bench_ema_clip.py --sizes 10 100 [--device cuda] [--json out.json]``.
On CUDA the script also measures a device-to-device copy (the practical bandwidth
ceiling), checks the CPU-shadow and evaluation-swap paths against the same-device one,
runs the plugins' step work under ``torch.cuda.set_sync_debug_mode("error")``, and
profiles one call of each clipping variant and of the plugin's EMA updates (torch's
profiler): the kernels it launches, their time by kernel, and the host's time to issue
it.
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

import steadytrain
from steadytrain.grad_norms import GradientNorms
from steadytrain.plugins.ema import EMA
from steadytrain.plugins.grad_clip import ClipGroup, GradClip, clip_grad_groups_

WIDTHS = {10: 256, 100: 768, 1000: 2048}


class Layer(torch.nn.Module):
    def __init__(self, h: int) -> None:
        super().__init__()
        self.attn = torch.nn.ModuleList(torch.nn.Linear(h, h) for _ in range(4))
        self.memory = torch.nn.Linear(h, 4 * h)
        self.out = torch.nn.Linear(4 * h, h)
        self.norms = torch.nn.ModuleList(torch.nn.LayerNorm(h) for _ in range(2))


def make_model(millions: int, device: str) -> torch.nn.Module:
    h = WIDTHS.get(millions) or max(64, int((millions * 1e6 / 12 / 16) ** 0.5))
    layers = max(1, round(millions * 1e6 / (12 * h * h)))
    with torch.device(device):
        model = torch.nn.Sequential(*(Layer(h) for _ in range(layers)))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_()
    return model


def many_small(count: int, device: str) -> torch.nn.Module:
    """*count* parameters of 30×70 = 2100 elements, each its own tensor."""
    with torch.device(device):
        return torch.nn.ParameterList(torch.nn.Parameter(torch.randn(30, 70))
                                      for _ in range(count))


def flatten_(model: torch.nn.Module) -> None:
    """Move the model's parameters into one buffer, back to back (a host's flat layout)."""
    params = list(model.parameters())
    flat = torch.cat([p.detach().reshape(-1) for p in params])
    offset = 0
    for p in params:
        p.data = flat[offset:offset + p.numel()].view_as(p)
        offset += p.numel()


def timed(fn: Callable[[], object], device: str, repeat: int, warmup: int = 3) -> float:
    """Median seconds per call.

    On CUDA, calls run back to back between two events, as in a training loop where the
    update is queued behind other work (five such batches of *repeat* calls, the median
    batch); timing each call alone would add the launch latency to every call.
    """
    for _ in range(warmup):
        fn()
    times = []
    if device == "cuda":
        for _ in range(5):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize()
            start.record()
            for _ in range(repeat):
                fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3 / repeat)
    else:
        for _ in range(repeat):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def load_timm_ema() -> type | None:
    """timm's ModelEmaV3; its module file alone when ``import timm`` fails (no torchvision)."""
    try:
        from timm.utils.model_ema import ModelEmaV3
        return ModelEmaV3
    except Exception:
        spec = importlib.util.find_spec("timm")
        if spec is None or not spec.submodule_search_locations:
            return None
        path = Path(spec.submodule_search_locations[0]) / "utils" / "model_ema.py"
        module_spec = importlib.util.spec_from_file_location("_timm_model_ema", path)
        module = importlib.util.module_from_spec(module_spec)
        module_spec.loader.exec_module(module)
        return module.ModelEmaV3


def bench_ema(model: torch.nn.Module, device: str, repeat: int) -> dict[str, float]:
    params = list(model.parameters())
    results: dict[str, float] = {}
    plugin = EMA(EMA.Config(decay=0.999, warmup=False))
    pipe = steadytrain.Pipeline([plugin]).setup(model)
    plugin.update()  # the first update copies; time the averaging ones
    results["steadytrain ema"] = timed(plugin.update, device, repeat)
    keep = torch.tensor(False, device=device)
    results["steadytrain ema, device-side skip flag"] = timed(
        lambda: plugin.update(skip=keep), device, repeat
    )
    assert plugin.num_updates > 0  # reads the device-side count: back to plain updates
    warm = EMA(EMA.Config(decay=0.999, warmup=True), id="warm")
    warm_pipe = steadytrain.Pipeline([warm]).setup(model)
    warm.update()
    results["steadytrain ema, warmup"] = timed(warm.update, device, repeat)
    results["steadytrain ema, warmup, device-side skip flag"] = timed(
        lambda: warm.update(skip=keep), device, repeat
    )
    warm_pipe.close()

    shadow = [p.detach().clone() for p in params]
    weights = [p.detach() for p in params]  # as every EMA does: no autograd bookkeeping
    results["torch._foreach_lerp_"] = timed(
        lambda: torch._foreach_lerp_(shadow, weights, 0.001), device, repeat
    )
    # The kernel of the skip-aware path alone, with a host weight and no flag; the same
    # without maximize (weight decay −1, learning rate −w); and the per-tensor lerp with a
    # device weight that the skip-aware path used before.
    results["torch._fused_sgd_ as a lerp"] = timed(
        lambda: torch._fused_sgd_(shadow, weights, [], weight_decay=1.0, momentum=0.0,
                                  lr=0.001, dampening=0.0, nesterov=False, maximize=True,
                                  is_first_step=False), device, repeat
    )
    results["torch._fused_sgd_ as a lerp, no maximize"] = timed(
        lambda: torch._fused_sgd_(shadow, weights, [], weight_decay=-1.0, momentum=0.0,
                                  lr=-0.001, dampening=0.0, nesterov=False, maximize=False,
                                  is_first_step=False), device, repeat
    )
    weight = torch.full((), 0.001, device=device)
    views = [weight.expand_as(t) for t in shadow]
    results["torch._foreach_lerp_, a device weight per tensor"] = timed(
        lambda: torch._foreach_lerp_(shadow, weights, views), device, repeat
    )
    # What one kernel over one contiguous buffer of the same size achieves: the ceiling
    # for any update of separate tensors.
    flat_shadow = torch.cat([t.flatten() for t in shadow])
    flat_weights = torch.cat([t.flatten() for t in weights])
    shadow = None
    results["one lerp_ over a flat buffer"] = timed(
        lambda: flat_shadow.lerp_(flat_weights, 0.001), device, repeat
    )
    flat_shadow = flat_weights = None
    if device == "cuda" and sum(w.numel() for w in weights) <= 2e8:
        on_host = EMA(EMA.Config(decay=0.999, warmup=False, device="cpu"))
        host_pipe = steadytrain.Pipeline([on_host]).setup(model)
        on_host.update()
        results["steadytrain ema, device=cpu"] = timed(on_host.update, device, max(3, repeat // 10))
        host_pipe.close()

    averaged = torch.optim.swa_utils.AveragedModel(
        model, multi_avg_fn=torch.optim.swa_utils.get_ema_multi_avg_fn(0.999)
    )
    averaged.update_parameters(model)
    results["AveragedModel(get_ema_multi_avg_fn)"] = timed(
        lambda: averaged.update_parameters(model), device, repeat
    )

    try:
        from torch_ema import ExponentialMovingAverage
    except ImportError:
        results["torch_ema"] = float("nan")
    else:
        ema = ExponentialMovingAverage(params, decay=0.999, use_num_updates=False)
        results["torch_ema"] = timed(ema.update, device, repeat)

    timm_ema = load_timm_ema()
    if timm_ema is None:
        results["timm ModelEmaV3"] = float("nan")
    else:
        ema = timm_ema(model, decay=0.999, exclude_buffers=True)
        results["timm ModelEmaV3"] = timed(lambda: ema.update(model), device, repeat)
    # The first variant once more, last: the spread between the two is the noise.
    results["steadytrain ema, timed again"] = timed(plugin.update, device, repeat)
    pipe.close()
    return results


def bench_many(count: int, device: str, repeat: int) -> dict[str, float]:
    model = many_small(count, device)
    params = list(model.parameters())
    shadow = [p.detach().clone() for p in params]
    weights = [p.detach() for p in params]
    flat_shadow = torch.cat([t.flatten() for t in shadow])
    flat_weights = torch.cat([t.flatten() for t in weights])
    keep = torch.tensor(False, device=device)
    results = {
        "one lerp_ over a flat buffer": timed(
            lambda: flat_shadow.lerp_(flat_weights, 0.001), device, repeat),
        "torch._foreach_lerp_": timed(
            lambda: torch._foreach_lerp_(shadow, weights, 0.001), device, repeat),
    }
    for layout in ("separate tensors", "weights in one buffer"):
        if layout != "separate tensors":
            flatten_(model)
        plugin = EMA(EMA.Config(decay=0.999, warmup=False))
        pipe = steadytrain.Pipeline([plugin]).setup(model)
        plugin.update()
        results[f"steadytrain ema, {layout}"] = timed(plugin.update, device, repeat)
        results[f"steadytrain ema, {layout}, device-side skip flag"] = timed(
            lambda plugin=plugin: plugin.update(skip=keep), device, repeat)
        pipe.close()
    return results


def host_us(fn: Callable[[], object], calls: int = 2000) -> float:
    """Microseconds of host time per call, the device's queue drained before and after."""
    for _ in range(20):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    spent = time.perf_counter() - t0
    torch.cuda.synchronize()
    return spent / calls * 1e6


def kernel_us(fn: Callable[[], object], calls: int = 10) -> float:
    """Microseconds of kernel time per call (torch's profiler)."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    return sum(e.device_time_total for e in prof.key_averages()
               if e.device_type == torch.autograd.DeviceType.CUDA) / calls


def many_costs(count: int) -> dict[str, float]:
    """Where the time of the one-launch update of *count* separate tensors goes, on CUDA
    with Triton: its kernel time against one flat ``lerp_``'s, the host time of the check
    of the weights' addresses (as the plugin takes it, and the alternatives), of the
    launch, and of replaying the launch captured in a CUDA graph; a fused AdamW step over
    the same tensors for scale."""
    from steadytrain.plugins.ema import multi_tensor

    weights = list(many_small(count, "cuda").parameters())
    shadow = [w.detach().clone() for w in weights]
    flat_shadow = torch.cat([t.flatten() for t in shadow])
    flat_weights = torch.cat([w.detach().flatten() for w in weights])
    detached = [w.detach() for w in weights]
    lerp = multi_tensor.MultiTensorLerp(shadow, detached)
    plugin_side = multi_tensor.MultiTensorLerp(shadow, weights)
    addresses = [w.data_ptr() for w in weights]
    slots, flag, static_flag = (torch.full((2,), 0.001, device="cuda"),
                                torch.tensor(False, device="cuda"),
                                torch.zeros((), dtype=torch.bool, device="cuda"))
    lerp(slots, static_flag)  # compiled before the capture
    graph, side = torch.cuda.CUDAGraph(), torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        graph.capture_begin(capture_error_mode="thread_local")
        lerp(slots, static_flag)
        graph.capture_end()
    torch.cuda.current_stream().wait_stream(side)

    def replay_with_flag() -> None:
        static_flag.copy_(flag)
        graph.replay()

    for w in weights:
        w.grad = torch.zeros_like(w)
    adamw = torch.optim.AdamW(weights, lr=1e-4, fused=True)
    costs = {
        "kernel us: one-launch update": kernel_us(lambda: lerp(0.001)),
        "kernel us: one lerp_ over a flat buffer": kernel_us(
            lambda: flat_shadow.lerp_(flat_weights, 0.001)),
        "kernel us: torch._foreach_lerp_": kernel_us(
            lambda: torch._foreach_lerp_(shadow, detached, 0.001)),
        "host us: address check, as the plugin takes it (map)": host_us(
            plugin_side.current_moved),
        "host us: address check, list comprehension": host_us(
            lambda: [w.data_ptr() for w in weights] != addresses),
        "host us: one-launch update, without the check": host_us(lambda: lerp(0.001)),
        "host us: same, skip-aware": host_us(lambda: lerp(slots, flag)),
        "host us: one lerp_ over a flat buffer": host_us(
            lambda: flat_shadow.lerp_(flat_weights, 0.001)),
        "host us: CUDA graph of the skip-aware launch, replayed": host_us(graph.replay),
        "host us: same, the flag copied in first": host_us(replay_with_flag),
        "elapsed us: CUDA graph replayed, back to back": 1e6 * timed(graph.replay, "cuda", 200),
        "elapsed us: one lerp_ over a flat buffer, back to back": 1e6 * timed(
            lambda: flat_shadow.lerp_(flat_weights, 0.001), "cuda", 200),
        "host us: fused AdamW step over the same tensors": host_us(adamw.step, 200),
    }
    check = getattr(torch._C, "_tensors_data_ptrs_at_indices_equal", None)
    if check is not None:  # CUDA builds of torch: the check of CUDA graph trees
        positions = list(range(count))
        costs["host us: address check, torch._C._tensors_data_ptrs_at_indices_equal"] = host_us(
            lambda: check(weights, addresses, positions))
    return costs


def multi_tensor_runs() -> bool:
    return steadytrain.kernels.triton_runs_on(torch.device("cuda"))


def bench_clip(model: torch.nn.Module, device: str, repeat: int) -> dict[str, float]:
    params = list(model.parameters())
    gen = torch.Generator(device=device).manual_seed(0)
    for p in params:
        p.grad = torch.randn(p.shape, device=device, generator=gen)
    # A threshold no norm reaches: every variant still scales every gradient (by 1), and
    # repeated runs do not shrink the gradients towards denormals.
    limit = 1e30
    results = {"clip_grad_norm_(foreach=True)": timed(
        lambda: torch.nn.utils.clip_grad_norm_(params, limit, foreach=True), device, repeat
    )}
    memory, rest = split_groups(model)
    results[PER_GROUP] = timed(clip_per_group(memory, rest, limit), device, repeat)
    results["clip_grad_groups_ (2 groups)"] = timed(
        lambda: clip_grad_groups_([memory, rest], [limit, limit]), device, repeat
    )
    for mode in ("norm", "adaptive", "agc"):
        plugin = GradClip(GradClip.Config(
            mode=mode, max_norm=limit, clipping=limit,
            groups=(ClipGroup("memory", ("*memory*",), max_norm=limit, clipping=limit),),
        ))
        pipe = steadytrain.Pipeline([plugin]).setup(model)
        results[f"grad_clip plugin, {mode} (2 groups)"] = timed(
            clipping_call(pipe, plugin), device, repeat
        )
        pipe.close()
    for p in params:
        p.grad = None
    return results


PER_GROUP = "clip_grad_norm_(foreach=True) per group (2 calls)"


def split_groups(model: torch.nn.Module) -> tuple[list, list]:
    """The two clipping groups: the ``*memory*`` matrices and the rest."""
    memory = [p for n, p in model.named_parameters() if "memory" in n]
    return memory, [p for n, p in model.named_parameters() if "memory" not in n]


def clip_per_group(memory: list, rest: list, limit: float) -> Callable[[], None]:
    """One ``clip_grad_norm_(foreach=True)`` per group: the baseline of the clipping goal."""
    def call() -> None:
        torch.nn.utils.clip_grad_norm_(memory, limit, foreach=True)
        torch.nn.utils.clip_grad_norm_(rest, limit, foreach=True)

    return call


def clipping_call(pipe: steadytrain.Pipeline, plugin: GradClip):
    """One ``after_backward`` of *plugin* as the pipeline makes it: in a step context with
    the step's shared gradient norms, new for every call (each call is a new step)."""
    ctx = steadytrain.StepContext(pipe.run, 0, 0, None, id=plugin.id)
    model_params = list(pipe.run.model.parameters())

    def call() -> None:
        ctx.norm_cache = GradientNorms(lambda: model_params)
        # The pipeline takes the step's metrics off the context after every step: kept
        # here, thousands of them would slow the host down (a growing heap to collect).
        ctx.staged.clear()
        plugin.after_backward(ctx)

    return call


def clip_variants(model: torch.nn.Module) -> tuple[dict[str, Callable[[], None]], list]:
    """One call of each clipping variant, keyed as in the timings, and their pipelines."""
    params = list(model.parameters())
    variants = {"clip_grad_norm_(foreach=True)": lambda: torch.nn.utils.clip_grad_norm_(
        params, 1e30, foreach=True), PER_GROUP: clip_per_group(*split_groups(model), 1e30)}
    pipes = []
    for mode in ("norm", "adaptive", "agc"):
        plugin = GradClip(GradClip.Config(
            mode=mode, max_norm=1e30, clipping=1e30,
            groups=(ClipGroup("memory", ("*memory*",), max_norm=1e30, clipping=1e30),)))
        pipe = steadytrain.Pipeline([plugin]).setup(model)
        variants[f"grad_clip plugin, {mode} (2 groups)"] = clipping_call(pipe, plugin)
        pipes.append(pipe)
    return variants, pipes


def ema_variants(model: torch.nn.Module) -> tuple[dict[str, Callable[[], None]], list]:
    """The plugin's plain and skip-aware EMA updates, and their pipelines."""
    plugin = EMA(EMA.Config(decay=0.999, warmup=False))
    pipe = steadytrain.Pipeline([plugin]).setup(model)
    plugin.update()
    keep = torch.tensor(False, device="cuda")
    return {"steadytrain ema": plugin.update,
            "steadytrain ema, device-side skip flag": lambda: plugin.update(skip=keep)}, [pipe]


def kernel_profiles(model: torch.nn.Module, calls: int = 5) -> dict[str, dict]:
    """What one call of each clipping and EMA variant costs, by torch's profiler: the
    kernels it launches and their time (by kernel name), and the host's time to issue it.
    """
    from torch.profiler import ProfilerActivity, profile

    params = list(model.parameters())
    for p in params:
        p.grad = torch.randn_like(p)
    clips, pipes = clip_variants(model)
    emas, more = ema_variants(model)
    report = {}
    for name, fn in {**clips, **emas}.items():
        fn()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        host = (time.perf_counter() - t0) / calls
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(calls):
                fn()
            torch.cuda.synchronize()
        kernels = {e.key: (e.count / calls, e.device_time_total / calls)
                   for e in prof.key_averages()
                   if e.device_type == torch.autograd.DeviceType.CUDA}
        report[name] = {"host_us": host * 1e6,
                        "kernels": round(sum(c for c, _ in kernels.values())),
                        "kernel_us": sum(t for _, t in kernels.values()),
                        "by_kernel": dict(sorted(kernels.items(), key=lambda kv: -kv[1][1]))}
    for pipe in pipes + more:
        pipe.close()
    for p in params:
        p.grad = None
    return report


def copy_bandwidth() -> float:
    """Bytes read plus written per second by a 2 GiB device-to-device copy."""
    src = torch.empty(2**29, device="cuda").normal_()
    dst = torch.empty_like(src)
    seconds = timed(lambda: dst.copy_(src), "cuda", 20)
    return 2 * src.numel() * 4 / seconds


def check_cuda_paths() -> str:
    """The CPU shadow and both evaluation swaps give the same-device results on CUDA."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Linear(64, 8)).cuda()
    plugins = [EMA(EMA.Config(decay=0.9, device=d, swap=s), id=f"{d}_{s}")
               for d, s in (("same", "auto"), ("same", "copy"), ("cpu", "auto"))]
    pipe = steadytrain.Pipeline(plugins).setup(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(5):
        pipe.before_step()
        pipe.compute_loss(model(torch.randn(4, 64, device="cuda")).pow(2).mean()).backward()
        pipe.after_backward()
        opt.step()
        pipe.consolidate()
        opt.zero_grad()
    reference = plugins[0].averaged_state_dict()
    for plugin in plugins[1:]:
        for name, tensor in plugin.averaged_state_dict().items():
            assert torch.allclose(tensor.cuda(), reference[name], rtol=1e-6, atol=1e-7), name
    training = [p.detach().clone() for p in model.parameters()]
    for plugin in plugins:
        plugin.on_eval_start()
        for name, param in model.named_parameters():
            assert torch.allclose(param, reference[name], rtol=1e-6, atol=1e-7), name
        plugin.on_eval_end()
        assert all(torch.equal(a, b) for a, b in zip(model.parameters(), training, strict=True))
    pipe.close()
    return "ok"


def check_no_host_sync() -> str:
    """Run the plugins' step work with CUDA's sync debug mode set to raise on a sync."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Linear(64, 8)).cuda()
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    ema = EMA(EMA.Config(decay=0.9))
    clips = [GradClip(GradClip.Config(mode=m, warmup=1, groups=(ClipGroup("first", ("0.*",)),)),
                      id=m) for m in ("norm", "adaptive", "agc")]
    pipe = steadytrain.Pipeline([ema, *clips]).setup(model)
    ctx = steadytrain.StepContext(pipe.run, 0, 0, None)
    keep = torch.zeros((), dtype=torch.bool, device="cuda")  # made before: a copy syncs
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(3):
            for clip in clips:
                ctx.id = clip.id
                ctx.norm_cache = GradientNorms(model.parameters)
                clip.after_backward(ctx)
            ema.update()
            clip_grad_groups_([list(model[0].parameters()), list(model[1].parameters())],
                              [0.5, 1.0])
        ema.on_eval_start()
        ema.on_eval_end()
        # Last: after a masked update the update count lives on the device, and the next
        # evaluation swap reads it once (documented).
        for _ in range(3):
            ema.update(skip=keep)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    pipe.close()
    return "ok"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10, 100],
                        help="model sizes in millions of parameters")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeat", type=int, default=20)
    parser.add_argument("--many", type=int, default=2000,
                        help="tensors of 2100 parameters in the many-tensor case (0: skip it)")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--threads", type=int,
                        help="CPU threads for torch; 1 gives steadier numbers on a busy machine")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = args.device
    report: dict[str, object] = {
        "machine": torch.cuda.get_device_name() if device == "cuda" else
        f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads",
        "torch": torch.__version__, "python": sys.version.split()[0], "runs": [],
    }
    if device == "cuda":
        report["copy_bandwidth_TBps"] = copy_bandwidth() / 1e12
        report["cuda_paths"] = check_cuda_paths()
        report["no_host_sync"] = check_no_host_sync()
    print(json.dumps({k: v for k, v in report.items() if k != "runs"}), flush=True)
    if args.many:
        many = bench_many(args.many, device, args.repeat)
        base = many["one lerp_ over a flat buffer"]
        report["many"] = {"tensors": args.many, "params": 2100 * args.many, "ema_s": many,
                          "ratio": {k: v / base for k, v in many.items()}}
        if device == "cuda" and multi_tensor_runs():
            report["many"]["costs"] = many_costs(args.many)
        print(json.dumps(report["many"]), flush=True)
    for millions in args.sizes:
        model = make_model(millions, device)
        count = sum(p.numel() for p in model.parameters())
        run = {"params": count, "tensors": len(list(model.parameters())),
               "ema_s": bench_ema(model, device, args.repeat),
               "clip_s": bench_clip(model, device, args.repeat)}
        if device == "cuda":
            run["profile"] = kernel_profiles(model)
            run["clip_kernels"] = {k: v["kernels"] for k, v in run["profile"].items()
                                   if k in run["clip_s"]}
        run["ema_GBps"] = {k: 12 * count / v / 1e9 for k, v in run["ema_s"].items()}
        ema = run["ema_s"]
        run["skip_aware_ratio"] = {
            "warmup off": ema["steadytrain ema, device-side skip flag"] / ema["steadytrain ema"],
            "warmup on": ema["steadytrain ema, warmup, device-side skip flag"]
            / ema["steadytrain ema, warmup"]}
        base = run["clip_s"]["clip_grad_norm_(foreach=True)"]
        run["clip_ratio"] = {k: v / base for k, v in run["clip_s"].items()}
        per_group = run["clip_s"][PER_GROUP]
        run["clip_ratio_per_group"] = {k: v / per_group for k, v in run["clip_s"].items()}
        if "profile" in run:
            kernel = run["profile"][PER_GROUP]["kernel_us"]
            run["clip_kernel_ratio_per_group"] = {
                k: run["profile"][k]["kernel_us"] / kernel for k in run["clip_s"]
                if k in run["profile"]}
        report["runs"].append(run)
        print(json.dumps(run), flush=True)
        del model
        gc.collect()  # the plugins and their pipelines refer to each other
        if device == "cuda":
            torch.cuda.empty_cache()
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))
    print_table(report)


def print_table(report: dict) -> None:
    print(f"\n{report['machine']}, torch {report['torch']}")
    if "many" in report:
        many = report["many"]
        print(f"\n{many['tensors']} tensors, {many['params'] / 1e6:.1f}M params")
        for name, seconds in many["ema_s"].items():
            print(f"  EMA  {name:56s} {seconds * 1e3:9.4f} ms  {many['ratio'][name]:7.2f}x flat")
        for name, value in many.get("costs", {}).items():
            print(f"  {name:78s} {value:9.2f}")
    for run in report["runs"]:
        print(f"\n{run['params'] / 1e6:.1f}M params, {run['tensors']} tensors")
        for name, seconds in run["ema_s"].items():
            print(f"  EMA  {name:48s} {seconds * 1e3:9.3f} ms  {run['ema_GBps'][name]:8.1f} GB/s")
        for which, ratio in run["skip_aware_ratio"].items():
            print(f"  EMA  skip-aware ÷ plain, {which:23s} {ratio:9.3f}x")
        kernels = run.get("clip_kernels", {})
        for name, seconds in run["clip_s"].items():
            launches = f"  {kernels[name]:5d} kernels" if name in kernels else ""
            kernel = run.get("clip_kernel_ratio_per_group", {})
            kernel = f"  kernel time {kernel[name]:6.3f}x per group" if name in kernel else ""
            print(f"  clip {name:38s} {seconds * 1e3:9.3f} ms  {run['clip_ratio'][name]:7.3f}x"
                  f"  {run['clip_ratio_per_group'][name]:7.3f}x per group{launches}{kernel}")
        for name, spent in run.get("profile", {}).items():
            print(f"  profile {name}: host {spent['host_us']:.0f} us to issue a call, "
                  f"{spent['kernels']} kernels, {spent['kernel_us']:.0f} us of kernel time")
            for kernel, (count, us) in list(spent["by_kernel"].items())[:6]:
                print(f"      {us:9.1f} us {count:5.0f}x  {kernel[:90]}")


if __name__ == "__main__":
    main()
