"""End to end through a trainer: the steadytrain adapter against the same trainer with the
techniques written by hand in its own callbacks.

    python benchmarks/bench_adapters_end_to_end.py --trainer lightning
    python benchmarks/bench_adapters_end_to_end.py --trainer transformers --check
    python benchmarks/bench_adapters_end_to_end.py --trainer lightning --device cpu \\
        --layers 2 --dim 64 --heads 2 --vocab 512 --batch 2 --seq 32 --rounds 2 --steps 3

The model, the data and the techniques are those of ``bench_end_to_end.py`` (a
GPT-2-small-sized decoder on random tokens, fused AdamW, bf16 autocast on CUDA; the guard,
label smoothing ε = 0.1, clipping in two groups and an EMA of the weights). Two variants
train one shared model, each with its own optimizer:

* ``adapter``: the trainer with steadytrain's adapter and the techniques from the config
  (Lightning: ``PipelineCallback`` and ``PipelineLossMixin``; transformers:
  ``SteadytrainTrainer``);
* ``hand``: the same trainer with the techniques in its own extension points, written
  with ``bench_end_to_end.HandTechniques``: a Lightning ``Callback``
  (``on_before_optimizer_step``, ``on_train_batch_end``) and the label-smoothed
  cross-entropy in ``training_step``; a transformers ``TrainerCallback``
  (``on_pre_optimizer_step``, ``on_optimizer_step``) and the label-smoothed cross-entropy
  in the model's loss. Both hand the skip flag to the fused AdamW as ``found_inf``.

For transformers both variants pass ``logging_nan_inf_filter=False`` unless
``--logging-nan-inf-filter true``: the Trainer's default filter reads every step's loss
on the host (``torch.isnan``, ``torch.isinf``), two syncs per step in either variant.
Through the transformers adapter the label-smoothing term reads the logits from the
model's head (``logits_module = "gpt.lm_head"``, docs/transformers.md);
``--logits-from outputs`` has it read the Trainer's outputs instead (Accelerate's float32
copy of the logits).

The variants alternate: every round trains ``--steps`` steps of each (a fresh
``Trainer.fit`` or ``Trainer.train`` per round, which keeps the optimizer; the Lightning
callbacks keep their state across fits; a ``SteadytrainTrainer`` needs a pipeline of its
own per ``train()``, so that variant's techniques restart each round), the order
swapped every round, after one round of warm-up each. Each optimizer step is timed from
the trainer's step-begin hook to the next one by CUDA events (the GPU time of everything
the trainer does for the step) and host clocks; the table gives medians over the measured
steps. Host syncs per step are counted with ``torch.cuda.set_sync_debug_mode("warn")``
from the second step of one more round to its last step's end. ``--check`` first trains
two copies of one initialization for a round, by hand and through the adapter, and
prints the largest relative difference of their weights and EMA averages.
``--profile`` runs one more round of each variant under ``torch.profiler`` and prints
each one's kernels and kernel time per step, how long the GPU idled per step, and the
kernels whose time differs most between the variants.
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import os
import platform
import statistics
import tempfile
import time
import warnings
from collections import Counter
from collections.abc import Callable
from datetime import date
from typing import Any

import structlog
import torch
import torch.nn.functional as F
from bench_end_to_end import (
    CONFIG,
    GPT,
    SMOOTHING,
    HandTechniques,
    add_model_arguments,
    fused_adamw,
    gpu_intervals,
    sync_sites,
)
from torch import nn

import steadytrain

VARIANTS = ("hand", "adapter")


class StepClock:
    """CUDA events and host clocks at the begin and the end of every optimizer step.

    A step lasts from its begin to the next step's begin (the last one: to its end). With
    ``count_syncs``, synchronizing calls are reported as warnings from the second step's
    begin to the last step's end.
    """

    def __init__(self, device: torch.device, steps: int, *, count_syncs: bool = False) -> None:
        self.cuda = device.type == "cuda"
        self.steps, self.count_syncs = steps, count_syncs
        self.begins: list[tuple[Any, float]] = []
        self.end: tuple[Any, float] | None = None

    def _mark(self) -> tuple[Any, float]:
        event = None
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
        return event, time.perf_counter()

    def begin(self) -> None:
        self.begins.append(self._mark())
        if self.count_syncs and self.cuda and len(self.begins) == 2:
            torch.cuda.set_sync_debug_mode("warn")

    def finish(self) -> None:
        """The end of a step: marks the run's end after its last step."""
        if len(self.begins) == self.steps and self.end is None:
            self.end = self._mark()
            if self.count_syncs and self.cuda:
                torch.cuda.set_sync_debug_mode("default")

    def times(self) -> tuple[list[float], list[float]]:
        """GPU and host milliseconds of every step (GPU: host times without CUDA)."""
        marks = [*self.begins, self.end]
        host = [(b[1] - a[1]) * 1e3 for a, b in itertools.pairwise(marks)]
        if not self.cuda:
            return host, host
        gpu = [a[0].elapsed_time(b[0]) for a, b in itertools.pairwise(marks)]
        return gpu, host


def quiet() -> None:
    """Only warnings from the trainers and the pipeline: the table is the output."""
    logging.getLogger("lightning").setLevel(logging.WARNING)
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    warnings.filterwarnings(
        "ignore", message=r".*(does not have many workers|num_workers|LeafSpec)")


def random_batches(args: argparse.Namespace, device: torch.device, count: int = 4) -> list:
    generator = torch.Generator().manual_seed(2)
    return [tuple(torch.randint(0, args.vocab, (args.batch, args.seq), generator=generator)
                  .to(device) for _ in range(2)) for _ in range(count)]


# -- Lightning ------------------------------------------------------------------------


def lightning_runner(args: argparse.Namespace, device: torch.device) -> Callable:
    """A function that makes the Lightning variant *name* of a model and trains it."""
    import lightning.pytorch as pl

    from steadytrain.adapters.lightning import PipelineCallback, PipelineLossMixin

    class LitGPT(pl.LightningModule):
        """The GPT and the optimizer it keeps across fits; the loss is label-smoothed
        cross-entropy by hand (kept for the guard)."""

        def __init__(self, gpt: nn.Module, lr: float) -> None:
            super().__init__()
            self.gpt = gpt
            self.optimizer = fused_adamw(gpt, lr)
            self.last_loss: torch.Tensor | None = None

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return self.optimizer

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            x, y = batch
            logits = self.gpt(x)
            loss = F.cross_entropy(logits.flatten(0, 1), y.flatten(), label_smoothing=SMOOTHING)
            self.last_loss = loss.detach()
            return loss

    class LitPipelineGPT(PipelineLossMixin, LitGPT):
        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            x, y = batch
            logits = self.gpt(x)
            return self.pipeline_loss(F.cross_entropy(logits.flatten(0, 1), y.flatten()),
                                      outputs={"logits": logits})

    class HandCallback(pl.Callback):
        """The techniques in Lightning's hooks: clip and judge before the optimizer step,
        average after the batch."""

        def __init__(self, hand: HandTechniques) -> None:
            self.hand = hand
            self.skip: torch.Tensor | None = None
            self.handed: torch.optim.Optimizer | None = None

        def on_before_optimizer_step(self, trainer: pl.Trainer, module: LitGPT,
                                     optimizer: torch.optim.Optimizer) -> None:
            self.skip = self.hand.after_backward(module.last_loss)
            self.handed = optimizer if self.hand.hand_over(optimizer, self.skip) else None

        def on_train_batch_end(self, trainer: pl.Trainer, module: LitGPT, outputs: Any,
                               batch: Any, batch_idx: int) -> None:
            if self.handed is not None:
                del self.handed.found_inf
            self.hand.consolidate(self.skip)

    class Timing(pl.Callback):
        """Marks a step's begin before every other callback's batch-start hook; its
        ``last`` twin marks the end after every other batch-end hook."""

        def __init__(self, last: Timing | None = None) -> None:
            self.clock: StepClock | None = None
            self.first = last

        def on_train_batch_start(self, *_: Any) -> None:
            if self.first is None:
                self.clock.begin()

        def on_train_batch_end(self, *_: Any) -> None:
            if self.first is not None:
                self.first.clock.finish()

    folder = tempfile.mkdtemp()
    timing = Timing()
    timing_end = Timing(timing)
    made: dict[str, tuple[LitGPT, pl.Callback]] = {}

    def make(name: str, gpt: nn.Module) -> tuple[LitGPT, pl.Callback]:
        if name == "hand":
            module = LitGPT(gpt, args.lr)
            return module, HandCallback(HandTechniques(gpt, device))
        return LitPipelineGPT(gpt, args.lr), PipelineCallback(CONFIG)

    def train(name: str, gpt: nn.Module, batches: list, clock: StepClock) -> dict:
        key = (name, id(gpt))
        if key not in made:
            made[key] = make(name, gpt)
        module, technique = made[key]
        timing.clock = clock
        cuda = device.type == "cuda"
        trainer = pl.Trainer(
            accelerator="gpu" if cuda else "cpu", devices=1,
            precision="bf16-mixed" if cuda else "32-true", max_steps=len(batches),
            max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
            enable_model_summary=False, num_sanity_val_steps=0, default_root_dir=folder,
            callbacks=[timing, technique, timing_end])
        trainer.fit(module, torch.utils.data.DataLoader(batches, batch_size=None))
        if name == "hand":
            return {"shadow": technique.hand.shadow}
        return {"shadow": technique.pipeline.plugins["ema"].shadow}

    return train


# -- Hugging Face transformers --------------------------------------------------------


class HFGPT(nn.Module):
    """The GPT as a transformers model: ``{"loss", "logits"}`` from input ids and labels.

    The loss is cross-entropy, label-smoothed by *smoothing*; the last one is kept (for the
    guard written by hand).
    """

    def __init__(self, gpt: nn.Module, smoothing: float) -> None:
        super().__init__()
        self.gpt, self.smoothing = gpt, smoothing
        self.last_loss: torch.Tensor | None = None

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        logits = self.gpt(input_ids)
        loss = F.cross_entropy(logits.flatten(0, 1), labels.flatten(),
                               label_smoothing=self.smoothing)
        self.last_loss = loss.detach()
        return {"loss": loss, "logits": logits}


def transformers_runner(args: argparse.Namespace, device: torch.device) -> Callable:
    from transformers import PrinterCallback, Trainer, TrainerCallback, TrainingArguments

    from steadytrain.adapters.transformers import SteadytrainTrainer

    class HandCallback(TrainerCallback):
        """The techniques in the Trainer's hooks: clip and judge before the optimizer
        step, average after it."""

        def __init__(self, hand: HandTechniques, model: HFGPT) -> None:
            self.hand, self.model = hand, model
            self.optimizer: torch.optim.Optimizer | None = None
            self.skip: torch.Tensor | None = None
            self.handed = False

        def on_train_begin(self, args: Any, state: Any, control: Any, optimizer: Any = None,
                           **kwargs: Any) -> None:
            self.optimizer = optimizer.optimizer  # the torch optimizer Accelerate wraps

        def on_pre_optimizer_step(self, *_: Any, **__: Any) -> None:
            self.skip = self.hand.after_backward(self.model.last_loss)
            self.handed = self.hand.hand_over(self.optimizer, self.skip)

        def on_optimizer_step(self, *_: Any, **__: Any) -> None:
            if self.handed:
                del self.optimizer.found_inf
            self.hand.consolidate(self.skip)

    class Timing(TrainerCallback):
        def __init__(self) -> None:
            self.clock: StepClock | None = None

        def on_step_begin(self, *_: Any, **__: Any) -> None:
            self.clock.begin()

        def on_step_end(self, *_: Any, **__: Any) -> None:
            self.clock.finish()

    class Samples(torch.utils.data.Dataset):
        def __init__(self, batches: list) -> None:
            self.rows = [{"input_ids": x[i], "labels": y[i]}
                         for x, y in batches for i in range(x.shape[0])]

        def __len__(self) -> int:
            return len(self.rows)

        def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
            return self.rows[index]

    folder = tempfile.mkdtemp()
    timing = Timing()
    # Accelerate hands the Trainer a float32 copy of the logits; the term reads the head's
    # own output unless --logits-from outputs (docs/transformers.md).
    config = CONFIG if args.logits_from == "outputs" else {"plugins": [
        {**p, "logits_module": "gpt.lm_head"} if p["plugin"] == "label_smoothing" else p
        for p in CONFIG["plugins"]]}
    made: dict[tuple[str, int], tuple[HFGPT, torch.optim.Optimizer, Any]] = {}

    def arguments(steps: int) -> TrainingArguments:
        cuda = device.type == "cuda"
        return TrainingArguments(
            output_dir=folder, max_steps=steps, per_device_train_batch_size=args.batch,
            max_grad_norm=0.0, lr_scheduler_type="constant", bf16=cuda, use_cpu=not cuda,
            logging_strategy="no", save_strategy="no", report_to="none", disable_tqdm=True,
            dataloader_pin_memory=False, dataloader_num_workers=0,
            train_sampling_strategy="sequential",
            logging_nan_inf_filter=args.logging_nan_inf_filter == "true")

    def train(name: str, gpt: nn.Module, batches: list, clock: StepClock) -> dict:
        key = (name, id(gpt))
        if key not in made:
            model = HFGPT(gpt, SMOOTHING if name == "hand" else 0.0)
            hand = HandCallback(HandTechniques(gpt, device), model) if name == "hand" else None
            made[key] = model, fused_adamw(gpt, args.lr), hand
        model, optimizer, hand = made[key]
        timing.clock = clock
        common = dict(model=model, args=arguments(len(batches)), train_dataset=Samples(batches),
                      optimizers=(optimizer, None))
        if name == "hand":
            trainer = Trainer(callbacks=[timing, hand], **common)
        else:
            trainer = SteadytrainTrainer(callbacks=[timing],
                                         pipeline=steadytrain.Pipeline.from_config(config),
                                         **common)
        trainer.remove_callback(PrinterCallback)  # it prints the run's summary
        trainer.train()
        if name == "hand":
            return {"shadow": hand.hand.shadow}
        return {"shadow": trainer.pipeline.plugins["ema"].shadow}

    return train


RUNNERS = {"lightning": lightning_runner, "transformers": transformers_runner}


def check(args: argparse.Namespace, device: torch.device, train: Callable, batches: list
          ) -> float:
    """Train two copies of one initialization for a round, by hand and through the
    adapter; the largest relative difference of their weights and EMA averages."""
    trained = {}
    for name in VARIANTS:
        torch.manual_seed(1)
        gpt = GPT(args.vocab, args.seq, args.layers, args.dim, args.heads).to(device)
        result = train(name, gpt, batches, StepClock(device, len(batches)))
        trained[name] = [p.detach() for p in gpt.parameters()] + list(result["shadow"])
    return max(((a - b).norm() / b.norm()).item()
               for a, b in zip(trained["hand"], trained["adapter"], strict=True))


def count_syncs(device: torch.device, train: Callable, name: str, gpt: nn.Module,
                batches: list) -> tuple[float, Counter]:
    """Host syncs per step from the second step of a round to its end, and where."""
    clock = StepClock(device, len(batches), count_syncs=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            train(name, gpt, batches, clock)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    sites = sync_sites(caught)
    return sum(sites.values()) / (len(batches) - 1), sites


def profile(device: torch.device, train: Callable, gpt: nn.Module, batches: list) -> dict:
    """One round of each variant under ``torch.profiler``: kernels and kernel time per
    step, GPU idle time per step (the steps' CUDA-event time minus the kernels' busy
    time), and the kernels whose time differs most between the variants."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    report = {}
    steps = len(batches)
    for name in VARIANTS:
        clock = StepClock(device, steps)
        torch.cuda.synchronize()
        with torch_profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            train(name, gpt, batches, clock)
            torch.cuda.synchronize()
        # The GPU time of the kernels each torch operator launched itself, by operator.
        by_op = {e.key: (e.count, e.self_device_time_total) for e in prof.key_averages()
                 if e.device_type == torch.autograd.DeviceType.CPU
                 and e.self_device_time_total > 0}
        path = os.path.join(tempfile.mkdtemp(), f"trace_{name}.json")
        prof.export_chrome_trace(path)
        intervals, calls, spent = gpu_intervals(path)
        os.remove(path)
        step_ms = sum(clock.times()[0])
        busy_ms = sum(e - b for b, e in intervals) / 1e3
        report[name] = {"kernels_per_step": sum(calls.values()) / steps,
                        "kernel_ms_per_step": sum(spent.values()) / steps / 1e3,
                        "idle_ms_per_step": (step_ms - busy_ms) / steps,
                        "calls": dict(calls), "spent_us": dict(spent), "by_op": by_op}
        print(f"profile {name}: {report[name]['kernels_per_step']:.0f} kernels/step, "
              f"{report[name]['kernel_ms_per_step']:.3f} ms of kernel time/step, GPU idle "
              f"{report[name]['idle_ms_per_step']:.3f} ms/step", flush=True)
    hand, adapter = report["hand"], report["adapter"]

    def extra(kernel: str) -> float:
        return adapter["spent_us"].get(kernel, 0.0) - hand["spent_us"].get(kernel, 0.0)

    ordered = sorted(set(hand["spent_us"]) | set(adapter["spent_us"]), key=extra)
    print("kernels with the most more (+) or less (-) time per step through the adapter:")
    for kernel in [*ordered[::-1][:12], *ordered[:6]]:
        more = adapter["calls"].get(kernel, 0) - hand["calls"].get(kernel, 0)
        print(f"  {extra(kernel) / steps / 1e3:+.3f} ms  {more / steps:+.1f} calls  {kernel[:100]}")

    def extra_op(op: str) -> float:
        return adapter["by_op"].get(op, (0, 0.0))[1] - hand["by_op"].get(op, (0, 0.0))[1]

    ordered = sorted(set(hand["by_op"]) | set(adapter["by_op"]), key=extra_op)
    print("operators whose kernels take the most more (+) or less (-) time per step there:")
    for op in [*ordered[::-1][:10], *ordered[:5]]:
        more = adapter["by_op"].get(op, (0, 0.0))[0] - hand["by_op"].get(op, (0, 0.0))[0]
        print(f"  {extra_op(op) / steps / 1e3:+.3f} ms  {more / steps:+.1f} calls  {op}")
    return report


def main(argv: list[str] | None = None, *, quiet_logs: bool = True) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--trainer", choices=sorted(RUNNERS), required=True)
    add_model_arguments(parser)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--steps", type=int, default=10, help="steps per variant per round")
    parser.add_argument("--check", action="store_true",
                        help="first check that hand and adapter train alike")
    parser.add_argument("--logging-nan-inf-filter", choices=("true", "false"), default="false",
                        help="transformers: the TrainingArguments option (true by default "
                             "there; it reads the loss on the host twice per step)")
    parser.add_argument("--logits-from", choices=("module", "outputs"), default="module",
                        help="transformers: where the label-smoothing term reads the logits: "
                             "the head's output (logits_module) or the Trainer's outputs")
    parser.add_argument("--profile", action="store_true",
                        help="one more round of each variant under torch.profiler (CUDA)")
    parser.add_argument("--json", help="write every step's times here")
    args = parser.parse_args(argv)
    if args.steps < 2:
        parser.error("--steps must be at least 2 (syncs are counted from the second step)")

    device = torch.device(args.device)
    train = RUNNERS[args.trainer](args, device)
    if quiet_logs:
        quiet()  # after the trainer's import, which sets its own log level
    pool = random_batches(args, device)
    batches = [pool[i % len(pool)] for i in range(args.steps)]
    torch.manual_seed(0)
    gpt = GPT(args.vocab, args.seq, args.layers, args.dim, args.heads).to(device)
    print(f"torch {torch.__version__}, {platform.python_version()}, "
          f"{torch.cuda.get_device_name() if device.type == 'cuda' else platform.processor()}, "
          f"{date.today()}; {args.trainer}; "
          f"{sum(p.numel() for p in gpt.parameters()) / 1e6:.1f}M parameters, "
          f"batch {args.batch}×{args.seq}", flush=True)
    if args.check:
        print(f"hand vs adapter after {args.steps} steps from one initialization: largest "
              f"relative difference of a weight or EMA tensor "
              f"{check(args, device, train, batches):.2e}", flush=True)

    gpu: dict[str, list[float]] = {name: [] for name in VARIANTS}
    host: dict[str, list[float]] = {name: [] for name in VARIANTS}
    for round_index in range(args.rounds + 1):
        order = VARIANTS if round_index % 2 == 0 else VARIANTS[::-1]
        for name in order:
            clock = StepClock(device, args.steps)
            train(name, gpt, batches, clock)
            if device.type == "cuda":
                torch.cuda.synchronize()
            if round_index:  # the first round warms up
                g, h = clock.times()
                gpu[name] += g
                host[name] += h
        print(f"round {round_index} done", flush=True)
    syncs, sites = dict.fromkeys(VARIANTS, float("nan")), {name: Counter() for name in VARIANTS}
    if device.type == "cuda":
        for name in VARIANTS:
            syncs[name], sites[name] = count_syncs(device, train, name, gpt, batches)

    profiled = profile(device, train, gpt, batches) if args.profile and device.type == "cuda" \
        else {}

    hand = statistics.median(gpu["hand"])
    print(f"\n{args.trainer}: median ms per optimizer step over {args.rounds}×{args.steps} "
          "steps (GPU: CUDA events from step begin to step begin), host time per step")
    print(f"{'variant':10}{'step':>9}{'ratio':>8}{'host':>9}{'syncs':>7}   by position in round")
    results = {}
    for name in VARIANTS:
        step = statistics.median(gpu[name])
        positions = [statistics.median(gpu[name][i::args.steps]) for i in range(args.steps)]
        results[name] = {"step_ms": step, "ratio": step / hand, "syncs": syncs[name],
                         "sync_sites": dict(sites[name]),
                         "host_ms": statistics.median(host[name]), "steps_gpu_ms": gpu[name],
                         "steps_host_ms": host[name], "by_position_ms": positions}
        print(f"{name:10}{step:9.3f}{step / hand:8.4f}{results[name]['host_ms']:9.3f}"
              f"{syncs[name]:7.2f}   " + " ".join(f"{p:.2f}" for p in positions))
    for name, where in sites.items():
        if where:
            print(f"syncs of {name}: " + ", ".join(f"{n} at {site}"
                                                 for site, n in where.most_common()))
    if args.json:
        with open(args.json, "w") as out:
            json.dump({"args": vars(args), "torch": torch.__version__, "results": results,
                       "profile": profiled}, out)


if __name__ == "__main__":
    main()
