"""Hook dispatch with tracing off and on: one optimizer step through no-op pipelines.

    python benchmarks/bench_trace.py            # tracing off
    python benchmarks/bench_trace.py --trace    # STEADYTRAIN_TRACE=1, events printed to /dev/null

N no-op plugins implement the four step hooks (``bench_dispatch.noop_pipeline``); one step
is ``before_step``, ``compute_loss``, ``after_backward``, ``consolidate``. After 300 warm-up
steps, 15 runs of 500 steps each are timed; the minimum and the median of the per-step
times are printed. Run it against two checkouts (``PYTHONPATH``) to compare their dispatch.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import structlog
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_dispatch

import steadytrain
from steadytrain.trace import TRACE_ENV


def per_step(n: int, runs: int = 15, steps: int = 500) -> list[float]:
    pipe = bench_dispatch.noop_pipeline(n)
    loss = torch.ones(())

    def step() -> None:
        pipe.before_step()
        pipe.compute_loss(loss)
        pipe.after_backward()
        pipe.consolidate()

    for _ in range(300):
        step()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        for _ in range(steps):
            step()
        times.append((time.perf_counter() - start) / steps)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trace", action="store_true", help="set STEADYTRAIN_TRACE=1")
    args = parser.parse_args()
    torch.set_num_threads(1)
    with open(os.devnull, "w") as sink:
        if args.trace:
            os.environ[TRACE_ENV] = "1"
            structlog.configure(logger_factory=structlog.PrintLoggerFactory(sink),
                                wrapper_class=structlog.make_filtering_bound_logger(20))
        else:
            os.environ.pop(TRACE_ENV, None)
            structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(30))
        cells = []
        for n in (1, 10, 50):
            times = per_step(n)
            cells.append(f"n={n}: min {min(times) * 1e6:.1f} µs, median "
                         f"{statistics.median(times) * 1e6:.1f} µs")
    label = "tracing on" if args.trace else "tracing off"
    print(f"{label} ({steadytrain.__file__})", " | ".join(cells), flush=True)


if __name__ == "__main__":
    main()
