"""Host syncs per step and per-step cost of the non-finite/spike guard and the stability monitor.

    python benchmarks/bench_guard.py sync  --device cuda   # syncs per step, by phase
    python benchmarks/bench_guard.py time                  # CPU time of the hooks

``sync`` trains a small MLP with a fused AdamW through a pipeline and counts the host-device
syncs that ``torch.cuda.set_sync_debug_mode("warn")`` reports, split by phase (forward,
backward and ``compute_loss``; ``after_backward``; the optimizer step; ``consolidate``),
for these loops:

* ``none``: an empty pipeline, ``optimizer.step()``;
* ``guard+skip``: the guard, ``if not outcome.skip: optimizer.step()``;
* ``guard+step_optimizer``: the guard, ``step_optimizer(optimizer, outcome)``;
* ``monitor``: the stability monitor alone, ``optimizer.step()``.

Every ``check_every`` (10) steps the guard copies its counters to pinned host memory and
reads them once they have arrived, without waiting; the monitor reads its own every 100
steps. Reads that sync are in the ``consolidate`` column. Warm-up steps (the first step
of a fused optimizer costs one sync in ``step_optimizer``) are not counted.

``time`` measures the hooks alone (no forward, backward or optimizer step; gradients set
once) on the CPU: median seconds per step of ``before_step`` … ``consolidate`` with an empty
pipeline, with the guard and with the monitor, for models of 1M and 10M parameters, next
to one foreach AdamW step of the same model for scale.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
import warnings
from collections import Counter
from collections.abc import Callable

import structlog
import torch

from steadytrain import Pipeline, step_optimizer
from steadytrain.plugins.guard import Guard
from steadytrain.plugins.stability_monitor import StabilityMonitor

PHASES = ("forward_backward", "after_backward", "optimizer_step", "consolidate")


def mlp(width: int, depth: int, device: str) -> torch.nn.Module:
    layers: list[torch.nn.Module] = []
    for _ in range(depth):
        layers += [torch.nn.Linear(width, width), torch.nn.GELU()]
    return torch.nn.Sequential(*layers).to(device)


def make_pipe(variant: str) -> Pipeline:
    if variant.startswith("guard"):
        return Pipeline([Guard()])
    if variant == "monitor":
        return Pipeline([StabilityMonitor()])
    return Pipeline([])


def count_syncs(variant: str, device: str, steps: int, warmup: int) -> dict[str, float]:
    torch.manual_seed(0)
    model = mlp(512, 4, device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    pipe = make_pipe(variant).setup(model, opt, total_steps=steps + warmup)
    x = torch.randn(64, 512, device=device)
    counts: Counter[str] = Counter()

    def phase(name: str, action: Callable[[], object], measured: bool) -> object:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            result = action()
        if measured:
            counts[name] += sum("synchroniz" in str(w.message) for w in caught)
        return result

    def forward_backward() -> None:
        pipe.before_step()
        pipe.compute_loss(model(x).pow(2).mean()).backward()

    def step(outcome) -> None:
        if variant == "guard+step_optimizer":
            step_optimizer(opt, outcome)
        elif variant == "guard+skip":
            if not outcome.skip:
                opt.step()
        else:
            opt.step()

    if device == "cuda":
        torch.cuda.set_sync_debug_mode("warn")
    try:
        for i in range(warmup + steps):
            measured = i >= warmup
            phase("forward_backward", forward_backward, measured)
            outcome = phase("after_backward", pipe.after_backward, measured)
            phase("optimizer_step", lambda o=outcome: step(o), measured)
            phase("consolidate", pipe.consolidate, measured)
            opt.zero_grad()
    finally:
        if device == "cuda":
            torch.cuda.set_sync_debug_mode("default")
    return {name: counts[name] / steps for name in PHASES}


def time_hooks(variant: str, params: int, repeats: int) -> float:
    width = 1024
    depth = max(1, round(params / (width * width + width)))
    model = mlp(width, depth, "cpu")
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    pipe = make_pipe(variant).setup(model, total_steps=None)
    loss = torch.tensor(2.0)

    def one() -> None:
        pipe.before_step()
        pipe.compute_loss(loss)
        pipe.after_backward()
        pipe.consolidate()

    return _median_time(one, repeats)


def time_adamw(params: int, repeats: int) -> float:
    width = 1024
    model = mlp(width, max(1, round(params / (width * width + width))), "cpu")
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-6, foreach=True)
    return _median_time(opt.step, repeats)


def _median_time(action: Callable[[], object], repeats: int) -> float:
    for _ in range(5):
        action()
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        action()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("what", choices=("sync", "time"))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args()
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(40))
    machine = (torch.cuda.get_device_name() if args.device == "cuda"
               else f"{platform.processor() or platform.machine()}, "
                    f"{torch.get_num_threads()} threads")
    print(f"torch {torch.__version__}, {args.device}: {machine}\n")
    results: dict[str, object] = {"device": args.device, "machine": machine,
                                  "torch": torch.__version__}
    if args.what == "sync":
        if args.device != "cuda":
            print("(no CUDA: sync debug mode reports nothing on the CPU; counts are 0)\n")
        print("| loop | " + " | ".join(PHASES) + " | total / step |")
        print("|---" * (len(PHASES) + 2) + "|")
        for variant in ("none", "guard+skip", "guard+step_optimizer", "monitor"):
            per_phase = count_syncs(variant, args.device, args.steps, warmup=3)
            results[variant] = per_phase
            cells = " | ".join(f"{per_phase[p]:.2f}" for p in PHASES)
            print(f"| {variant} | {cells} | {sum(per_phase.values()):.2f} |")
    else:
        print("| parameters | empty pipeline | guard | monitor | AdamW step (foreach) |")
        print("|---|---|---|---|---|")
        for params in (1_000_000, 10_000_000):
            row = {v: time_hooks(v, params, args.repeats) for v in ("none", "guard", "monitor")}
            row["adamw"] = time_adamw(params, args.repeats)
            results[str(params)] = row
            print(f"| {params:,} | " + " | ".join(
                f"{row[k] * 1e6:.0f} µs" for k in ("none", "guard", "monitor", "adamw")) + " |")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(results, handle, indent=2)


if __name__ == "__main__":
    main()
