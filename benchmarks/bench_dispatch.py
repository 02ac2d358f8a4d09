"""Per-step cost of the pipeline: hook dispatch with 0, 1, 10 and 50 no-op plugins, and the
overhead of the pipeline around a small model's training step compared with a bare loop.

    python benchmarks/bench_dispatch.py            # prints a Markdown table

Each no-op plugin implements all four step hooks. The dispatch time is one optimizer step
through the pipeline (before_step, compute_loss, after_backward, consolidate) with a
scalar task loss and no model work; the median of several repeats is reported.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from collections.abc import Callable

import structlog
import torch

import steadytrain
from steadytrain import Pipeline, hookimpl


class NoOp(steadytrain.Plugin):
    """Implements every step hook and does nothing."""

    name = "noop"

    @hookimpl
    def before_step(self, ctx):
        pass

    @hookimpl
    def compute_regularizers(self, ctx):
        return None

    @hookimpl
    def after_backward(self, ctx):
        pass

    @hookimpl
    def consolidate(self, ctx):
        pass


def noop_pipeline(n: int, model: torch.nn.Module | None = None) -> Pipeline:
    return Pipeline([NoOp(id=f"noop{i}") for i in range(n)]).setup(model, None)


def time_per_step(step, steps: int, repeats: int) -> float:
    """Median seconds per call of ``step`` over ``repeats`` runs of ``steps`` calls."""
    for _ in range(min(steps, 200)):
        step()
    runs = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(steps):
            step()
        runs.append((time.perf_counter() - start) / steps)
    return statistics.median(runs)


def dispatch_cost(n: int, steps: int, repeats: int) -> float:
    pipe = noop_pipeline(n)
    loss = torch.ones(())

    def step() -> None:
        pipe.before_step()
        pipe.compute_loss(loss)
        pipe.after_backward()
        pipe.consolidate()

    return time_per_step(step, steps, repeats)


def small_model_steps() -> dict[str, Callable[[], None]]:
    """One SGD step of a small MLP: bare, and through pipelines of 0 and 10 no-op plugins."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 1))
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    x, y = torch.randn(64, 32), torch.randn(64, 1)

    def bare() -> None:
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad()

    def piped(pipe: Pipeline) -> Callable[[], None]:
        def step() -> None:
            pipe.before_step()
            loss = pipe.compute_loss(torch.nn.functional.mse_loss(model(x), y))
            loss.backward()
            if not pipe.after_backward().skip:
                opt.step()
            pipe.consolidate()
            opt.zero_grad()

        return step

    return {"bare loop": bare,
            "pipeline, 0 no-op plugins": piped(noop_pipeline(0, model)),
            "pipeline, 10 no-op plugins": piped(noop_pipeline(10, model))}


def interleaved(steps: dict[str, Callable[[], None]], n: int, repeats: int) -> dict[str, float]:
    """Median seconds per call of each step, the variants timed in turn to share the noise."""
    runs: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(repeats):
        for name, step in steps.items():
            runs[name].append(time_per_step(step, n, 1))
    return {name: statistics.median(times) for name, times in runs.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    torch.set_num_threads(1)
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(30))
    print(f"machine: {platform.processor() or platform.machine()}, "
          f"{torch.get_num_threads()} torch thread, torch {torch.__version__}, "
          f"Python {platform.python_version()}, steadytrain {steadytrain.__version__}\n")
    print("| no-op plugins | pipeline step (µs) |")
    print("| ---: | ---: |")
    for n in (0, 1, 10, 50):
        print(f"| {n} | {dispatch_cost(n, args.steps, args.repeats) * 1e6:.1f} |")
    costs = interleaved(small_model_steps(), args.steps // 4, args.repeats * 3)
    bare = costs.pop("bare loop")
    print("\n| small MLP step (64×32 → 64 → 1, SGD) | µs | overhead vs bare |")
    print("| --- | ---: | ---: |")
    print(f"| bare loop | {bare * 1e6:.1f} | |")
    for name, cost in costs.items():
        print(f"| {name} | {cost * 1e6:.1f} | "
              f"{(cost - bare) * 1e6:+.1f} µs ({cost / bare - 1:+.1%}) |")

if __name__ == "__main__":
    main()
