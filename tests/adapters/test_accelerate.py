"""The documented loop under Accelerate, in one process and in two (CPU, gloo)."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

pytest.importorskip("accelerate")

from accelerate import Accelerator, debug_launcher
from accelerate.optimizer import AcceleratedOptimizer
from accelerate.state import AcceleratorState, GradientState
from accelerate.utils import DataLoaderConfiguration
from helpers import skip_unless_forkable
from plain_run import (
    CONFIG,
    assert_same,
    assert_same_metrics,
    assert_same_run,
    batches,
    make_model,
    make_optimizer,
    pipeline,
    samples,
    snapshot,
    train_plain,
)
from torch.multiprocessing import start_processes

import steadytrain
from steadytrain.adapters.accelerate import step_optimizer

ROOT = Path(__file__).resolve().parents[2]
GLOBAL_BATCH = 8


def train(
    data: list[dict],
    out: Path,
    *,
    accumulation: int = 2,
    mixed_precision: str = "no",
    save_at: int | None = None,
    resume: Path | None = None,
) -> None:
    """One epoch of the loop of docs/accelerate.md over *data*, in global batches of
    ``GLOBAL_BATCH``; each rank saves what it trained next to *out*."""
    accelerator = Accelerator(
        cpu=True, gradient_accumulation_steps=accumulation, mixed_precision=mixed_precision,
        dataloader_config=DataLoaderConfiguration(split_batches=True),
    )
    model = make_model()
    optimizer = make_optimizer(model)
    loader = torch.utils.data.DataLoader(data, batch_size=GLOBAL_BATCH)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    k = accelerator.gradient_accumulation_steps
    pipe = pipeline(CONFIG)
    pipe.setup(accelerator.unwrap_model(model), optimizer, total_steps=math.ceil(len(loader) / k))
    accelerator.register_for_checkpointing(pipe)
    start = 0
    if resume is not None:
        accelerator.load_state(resume)
        start = pipe.run.step * k
    metrics = []
    for index, batch in enumerate(accelerator.skip_first_batches(loader, start), start):
        with accelerator.accumulate(model):
            window = index - index % k
            pipe.before_step(batch=batch, targets=batch["labels"], micro_batch=index - window,
                             num_micro_batches=min(k, len(loader) - window), loss_scale=1.0)
            outputs = model(**batch)
            loss = pipe.compute_loss(outputs["loss"], outputs=outputs)
            accelerator.backward(loss)
            if accelerator.sync_gradients:
                accelerator.unscale_gradients()
                outcome = pipe.after_backward()
                step_optimizer(optimizer, outcome)
                pipe.consolidate()
                optimizer.zero_grad()
                metrics.append(pipe.metrics())  # on every rank: the means are all-reduced
                if pipe.run.step == save_at:
                    accelerator.save_state(out.parent / "state")
    result = snapshot(pipe, accelerator.unwrap_model(model), optimizer.optimizer, metrics)
    torch.save(result, out.with_suffix(f".{accelerator.process_index}"))


def forked(function: Callable[[], None], processes: int = 1) -> None:
    """Run *function* in *processes* forked processes (two or more: a gloo process group)."""
    skip_unless_forkable()

    def run(*_index: int) -> None:
        # A forked child must not enter OpenMP's thread pool, which the parent may have
        # started: it would wait forever for threads it does not have.
        os.environ["OMP_NUM_THREADS"] = "1"
        torch.set_num_threads(1)
        # The state a Trainer of an earlier test left in this process is the parent's, not
        # this run's (transformers resets it the same way).
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()
        function()

    if processes == 1:
        start_processes(run, nprocs=1, start_method="fork")
    else:
        debug_launcher(run, num_processes=processes)


def launch(processes: int, data: list[dict], out: Path, **options: Any) -> list:
    """Run :func:`train` in *processes* forked processes; what each rank trained (a rank
    that is not part of the process group would overwrite rank 0's file and leave its own
    missing)."""
    forked(lambda: train(data, out, **options), processes)
    return [torch.load(out.with_suffix(f".{rank}"), weights_only=False)
            for rank in range(processes)]


@pytest.mark.parametrize("processes", [1, 2])
def test_same_weights_ema_and_metrics_as_the_plain_loop(tmp_path, processes):
    data = samples()
    ranks = launch(processes, data, tmp_path / "run")
    want = train_plain(data, steps=4, batch_size=GLOBAL_BATCH, accumulation=2)
    for got in ranks:
        assert_same_run(got, want)
    assert all(m["grad_clip/enc/pre_norm"] > 0.1 for m in want.metrics)


def test_bf16_autocast_gives_the_plain_loop_under_autocast(tmp_path):
    data = samples()
    (got,) = launch(1, data, tmp_path / "run", mixed_precision="bf16")
    want = train_plain(data, steps=4, batch_size=GLOBAL_BATCH, accumulation=2, bf16=True)
    fp32 = train_plain(data, steps=4, batch_size=GLOBAL_BATCH, accumulation=2)
    assert_same_run(got, want, without=["optimizer"])
    assert got.metrics[0]["loss/task"] != fp32.metrics[0]["loss/task"]


def test_a_nan_in_one_ranks_batch_is_skipped_on_both(tmp_path):
    # Batch 5: the second micro-batch of the third step; its second half goes to rank 1.
    data = samples(nan_at=5 * GLOBAL_BATCH + 6)
    ranks = launch(2, data, tmp_path / "run")
    want = train_plain(data, steps=4, batch_size=GLOBAL_BATCH, accumulation=2)
    assert want.skipped == 1
    for got in ranks:
        assert [m["guard/skipped"] for m in got.metrics] == [0.0, 0.0, 1.0, 0.0]
        assert_same_run(got, want, without=["metrics"])


def test_resume_from_accelerates_checkpoint_gives_the_uninterrupted_run(tmp_path):
    data = samples()
    (whole,) = launch(1, data, tmp_path / "whole", save_at=2)
    (resumed,) = launch(1, data, tmp_path / "resumed", resume=tmp_path / "state")
    assert_same_run(resumed, whole, without=["metrics"])
    assert_same_metrics(resumed.metrics, whole.metrics[2:])


def test_a_short_last_window_is_one_step_of_fewer_micro_batches(tmp_path):
    data = samples(5 * GLOBAL_BATCH)  # micro-batches 2, 2 and 1
    (got,) = launch(1, data, tmp_path / "run")
    assert len(got.metrics) == 3
    assert int(got.optimizer["0.step"]) == 3


class SkipSecondStep(steadytrain.Plugin):
    """Asks to skip step 1 although its gradients are finite."""

    name = "skip_second_step"

    @steadytrain.hookimpl
    def after_backward(self, ctx):
        ctx.request_skip("test", when=torch.tensor(ctx.step == 1))


def scaled_run(adapter: bool, fused: bool) -> tuple[list[dict], list[float], list[bool]]:
    """Four steps under a CPU GradScaler, a NaN in step 2: the weights, the scale and
    Accelerate's ``step_was_skipped`` after each step. Through this module's
    step_optimizer on Accelerate's optimizer wrapper, or through the core's with the
    scaler."""
    Accelerator(cpu=True)  # the state its optimizer wrapper reads; fp16 needs a GPU
    model = make_model()
    optimizer = make_optimizer(model, fused=fused)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8, growth_interval=1)
    stepped = AcceleratedOptimizer(optimizer, device_placement=False, scaler=scaler)
    pipe = pipeline({"plugins": [{"plugin": "guard"}]})
    pipe.register(SkipSecondStep())
    pipe.setup(model, optimizer, total_steps=4)
    weights, scales, reported = [], [], []
    for batch in batches(samples(16, nan_at=2 * 4), 4):
        pipe.before_step(batch=batch, targets=batch["labels"])
        scaler.scale(pipe.compute_loss(model(**batch)["loss"])).backward()
        scaler.unscale_(optimizer)
        outcome = pipe.after_backward()
        if adapter:
            step_optimizer(stepped, outcome)
        else:
            steadytrain.step_optimizer(optimizer, outcome, scaler=scaler)
            scaler.update()
        pipe.consolidate()
        optimizer.zero_grad()
        weights.append({k: v.clone() for k, v in model.state_dict().items()})
        scales.append(scaler.get_scale())
        reported.append(stepped.step_was_skipped)
    return weights, scales, reported


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "foreach"])
def test_under_a_grad_scaler_a_skip_is_the_core_loops_and_accelerate_reports_it(fused):
    def check() -> None:
        weights, scales, reported = scaled_run(adapter=True, fused=fused)
        want_weights, want_scales, _ = scaled_run(adapter=False, fused=fused)
        for got, want in zip(weights, want_weights, strict=True):
            assert_same(got, want)
        assert_same(weights[1], weights[0])  # the requested skip
        assert_same(weights[2], weights[1])  # the NaN
        assert not torch.equal(weights[3]["head.weight"], weights[2]["head.weight"])
        # Each skip backs the scale off, as an overflow does; otherwise it grows.
        assert scales == want_scales == [512.0, 256.0, 128.0, 256.0]
        # Accelerate tells a skipped step by the optimizer's step not being called; a
        # fused optimizer is called and skips on the device.
        assert reported == ([False] * 4 if fused else [False, True, True, False])

    forked(check)


@pytest.mark.slow
def test_the_example_runs_and_skips_the_broken_batch():
    result = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "accelerate" / "train.py"), "--epochs", "2"],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert "skipped steps: 1 of 32" in result.stdout
