"""What the gradient penalty costs: time of a critic's training step with and without it.

    python benchmarks/bench_gradient_penalty.py [--batch 256] [--width 512] [--repeat 30]
    python benchmarks/bench_gradient_penalty.py --device cuda

A critic (an MLP of three hidden layers of ``width`` units, GELU, on inputs of ``width``
features) takes one Wasserstein step per iteration, ``D(fake).mean() − D(real).mean()``,
through a pipeline with nothing, with ``gradient_penalty`` in mode ``"r1"`` (on the real
batch) and in mode ``"wgan_gp"`` (on interpolations), and an Adam step. The variants take
turns step by step. On the CPU each step is timed in CPU seconds of this process
(``process_time``, all its threads), which other processes on a shared machine do not
inflate; on CUDA in wall seconds, synchronized after each step. Prints the
median over ``repeat`` steps (after 5 warm-up steps) and the ratio to the plain step, as
JSON.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import structlog
import torch

from steadytrain import Pipeline, step_optimizer
from steadytrain.plugins.gradient_penalty import GradientPenalty

VARIANTS = ("plain", "r1", "wgan_gp")


def critic(width: int) -> torch.nn.Module:
    layers: list[torch.nn.Module] = []
    for _ in range(3):
        layers += [torch.nn.Linear(width, width), torch.nn.GELU()]
    return torch.nn.Sequential(*layers, torch.nn.Linear(width, 1))


def pipeline(variant: str, model: torch.nn.Module) -> Pipeline:
    if variant == "plain":
        return Pipeline([])
    plugin = GradientPenalty(GradientPenalty.Config(mode=variant), weight=10.0)
    if variant == "wgan_gp":
        plugin.bind(critic=model)
    return Pipeline([plugin])


class Loop:
    """One variant's critic, optimizer and pipeline; :meth:`step` times one training step."""

    def __init__(self, variant: str, batch: int, width: int, device: str) -> None:
        torch.manual_seed(0)
        self.variant, self.model, self.device = variant, critic(width).to(device), device
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=1e-4)
        self.pipe = pipeline(variant, self.model).setup(self.model, self.optimizer)
        self.real = torch.randn(batch, width, device=device)
        self.fake = torch.randn(batch, width, device=device) + 1.0
        self.clock = time.perf_counter if device == "cuda" else time.process_time

    def step(self) -> float:
        """Seconds of one step: CPU seconds of this process on the CPU, wall on CUDA."""
        start = self.clock()
        self.pipe.before_step()
        x = self.real.clone().requires_grad_(self.variant == "r1")
        real_scores = self.model(x)
        loss = self.model(self.fake).mean() - real_scores.mean()
        outputs = {"inputs": x, "scores": real_scores, "real": self.real, "fake": self.fake}
        self.pipe.compute_loss(loss, outputs=outputs).backward()
        step_optimizer(self.optimizer, self.pipe.after_backward())
        self.pipe.consolidate()
        self.optimizer.zero_grad()
        if self.device == "cuda":
            torch.cuda.synchronize()
        return self.clock() - start


def seconds_per_step(batch: int, width: int, repeat: int, device: str) -> dict[str, float]:
    """Median CPU seconds per step of each variant, the variants taking turns step by step
    so that a change of machine load touches them alike."""
    loops = {v: Loop(v, batch, width, device) for v in VARIANTS}
    times: dict[str, list[float]] = {v: [] for v in VARIANTS}
    for i in range(5 + repeat):
        for variant, loop in loops.items():
            elapsed = loop.step()
            if i >= 5:
                times[variant].append(elapsed)
    return {v: statistics.median(t) for v, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--width", type=int, default=512)
    parser.add_argument("--repeat", type=int, default=30)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    args = parser.parse_args()
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(40))
    results = seconds_per_step(args.batch, args.width, args.repeat, args.device)
    print(json.dumps({
        "machine": (torch.cuda.get_device_name() if args.device == "cuda" else
                    f"{platform.processor() or platform.machine()}, "
                    f"{torch.get_num_threads()} threads") + f", torch {torch.__version__}",
        "batch": args.batch, "width": args.width,
        "seconds_per_step": {k: round(v, 5) for k, v in results.items()},
        "ratio_to_plain": {k: round(v / results["plain"], 2) for k, v in results.items()},
    }, indent=2))


if __name__ == "__main__":
    main()
