"""What every rank runs for tests/adapters/test_distributed.py, and how the ranks start.

The ranks are forked from the test process (which has imported torch, FSDP and DCP
already), join a gloo process group through a file store, run every scenario in
:data:`SCENARIOS` in turn and write what each returned, or the error it raised, to
``<folder>/<scenario>.<rank>.pt``. The documented loop itself is :func:`train`: each rank
takes its share of the same global batch that ``plain_run.train_plain`` trains on.
"""

from __future__ import annotations

import contextlib
import datetime
import gc
import io
import os
import runpy
import socket
import time
import traceback
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import attrs
import structlog
import torch
import torch._dynamo  # fully_shard imports it on first use: here once, before the fork
import torch.distributed as dist
import torch.distributed.checkpoint
import torch.multiprocessing as mp
from helpers import skip_unless_forkable
from plain_run import CONFIG, Result, batches, make_model, make_optimizer, pipeline, samples
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor, Shard
from torch.nn.parallel import DistributedDataParallel

import steadytrain
from steadytrain.adapters import distributed

WORLD = 2
ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "distributed" / "train.py"
GUIDE = ROOT / "docs" / "distributed.md"
STEPS = 3
#: Samples per optimizer step over all ranks (per micro-batch with accumulation).
GLOBAL_BATCH = 8
#: CONFIG with a guard that checks the loss only, and an infinity-norm clipping group.
#: Checking the loss alone makes a NaN on one rank a skip request of that rank only.
LOSS_GUARD = {"plugin": "guard"}
SHARDED_CONFIG = {
    "plugins": [
        LOSS_GUARD,
        {"plugin": "label_smoothing", "smoothing": 0.1},
        {"plugin": "grad_clip", "max_norm": 0.3,
         "groups": [{"name": "enc", "include": ["enc.*"], "max_norm": 0.1,
                     "norm_type": float("inf")}]},
        {"plugin": "ema", "decay": 0.9},
    ]
}
AGC_CONFIG = {
    "plugins": [
        {"plugin": "grad_clip", "mode": "agc", "clipping": 0.02},
        {"plugin": "ema", "decay": 0.8},
    ]
}
NAN_CONFIG = {"plugins": [LOSS_GUARD, *CONFIG["plugins"][1:]]}
#: The NaN sample of the NaN runs: in the second step's batch, in rank 1's share.
NAN_AT = GLOBAL_BATCH + GLOBAL_BATCH // WORLD + 1
#: Where the resumed runs are saved and loaded: after this many steps.
RESUME_AT = 2
#: Whole runs (in seconds) before the test process gives up on the ranks.
DEADLINE = 300

SCENARIOS: dict[str, Callable[[int, Path], Any]] = {}


def scenario(function: Callable[[int, Path], Any]) -> Callable[[int, Path], Any]:
    SCENARIOS[function.__name__] = function
    return function


# -- the loop on every rank ---------------------------------------------------------------


def wrap(model: torch.nn.Module, kind: str, **shard_options: Any) -> torch.nn.Module:
    if kind == "ddp":
        return DistributedDataParallel(model)
    fully_shard(model, **shard_options)
    return model


def share(batch: Mapping[str, torch.Tensor], rank: int) -> dict[str, torch.Tensor]:
    """This rank's consecutive share of a global batch."""
    size = len(batch["x"]) // WORLD
    return {key: value[rank * size:(rank + 1) * size] for key, value in batch.items()}


def full(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor (gathered from every rank if sharded), detached and copied."""
    if isinstance(tensor, DTensor):
        tensor = tensor.full_tensor()
    return tensor.detach().clone()


def inner(model: torch.nn.Module) -> torch.nn.Module:
    return model.module if isinstance(model, DistributedDataParallel) else model


def snapshot(pipe: steadytrain.Pipeline, model: torch.nn.Module,
             optimizer: torch.optim.Optimizer, metrics: list[dict[str, float]]) -> dict:
    """``plain_run.snapshot`` of a distributed run: whole tensors, on every rank."""
    weights = {k: full(v) for k, v in inner(model).state_dict().items()}
    with pipe.evaluating():
        averaged = {k: full(v) for k, v in inner(model).state_dict().items()}
    state = optimizer.state_dict()["state"]
    moments = {f"{i}.{k}": full(v) for i, s in state.items() for k, v in s.items()}
    return attrs.asdict(Result(weights, averaged, metrics, moments, pipe.run.skipped_steps),
                        recurse=False)


@attrs.define
class Run:
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    pipe: steadytrain.Pipeline
    kind: str
    rank: int
    metrics: list[dict[str, float]] = attrs.Factory(list)
    requests: list[list[bool]] = attrs.Factory(list)


def start(kind: str, config: Mapping[str, Any], rank: int, *, steps: int = STEPS,
          **shard_options: Any) -> Run:
    model = wrap(make_model(), kind, **shard_options)
    optimizer = make_optimizer(model)
    pipe = pipeline(config)
    distributed.setup(pipe, model, optimizer, total_steps=steps)
    return Run(model, optimizer, pipe, kind, rank)


def sync_gradients(run: Run, last: bool) -> contextlib.AbstractContextManager:
    """Gradients are reduced across ranks only in the last micro-batch's backward."""
    if run.kind == "ddp":
        return contextlib.nullcontext() if last else run.model.no_sync()
    run.model.set_requires_gradient_sync(last)
    return contextlib.nullcontext()


def train(run: Run, loader: Iterator[dict], steps: int, *, accumulation: int = 1,
          evaluate_after: int | None = None) -> None:
    """The documented loop on this rank's share of each global batch, for *steps* steps."""
    pipe, model = run.pipe, run.model
    for step in range(steps):
        for index in range(accumulation):
            batch = share(next(loader), run.rank)
            with sync_gradients(run, index == accumulation - 1):
                # as train_plain: the host divides by the micro-batch count itself
                pipe.before_step(batch=batch, targets=batch["labels"], micro_batch=index,
                                 num_micro_batches=accumulation, loss_scale=1.0)
                out = model(**batch)
                (pipe.compute_loss(out["loss"], outputs=out) / accumulation).backward()
        outcome = pipe.after_backward()
        run.requests.append([bool(r.when) for r in outcome.requests])
        steadytrain.step_optimizer(run.optimizer, outcome)
        pipe.consolidate()
        run.optimizer.zero_grad()
        run.metrics.append(pipe.metrics())
        if step == evaluate_after:
            with pipe.evaluating(), torch.no_grad():
                model(**batch)


def train_run(kind: str, config: Mapping[str, Any], rank: int, *, accumulation: int = 1,
              data: list[dict] | None = None, evaluate_after: int | None = None) -> dict:
    run = start(kind, config, rank)
    loader = batches(data or samples(), GLOBAL_BATCH)
    train(run, loader, STEPS, accumulation=accumulation, evaluate_after=evaluate_after)
    return {**snapshot(run.pipe, run.model, run.optimizer, run.metrics),
            "requests": run.requests}


# -- scenarios --------------------------------------------------------------------------


@scenario
def ddp_training(rank: int, folder: Path) -> dict:
    return train_run("ddp", CONFIG, rank, accumulation=2, evaluate_after=0)


@scenario
def fsdp2_training(rank: int, folder: Path) -> dict:
    return train_run("fsdp2", SHARDED_CONFIG, rank, accumulation=2, evaluate_after=0)


@scenario
def fsdp2_agc(rank: int, folder: Path) -> dict:
    return train_run("fsdp2", AGC_CONFIG, rank)


@scenario
def ddp_nan_on_rank_1(rank: int, folder: Path) -> dict:
    return train_run("ddp", NAN_CONFIG, rank, data=samples(nan_at=NAN_AT))


@scenario
def fsdp2_nan_on_rank_1(rank: int, folder: Path) -> dict:
    return train_run("fsdp2", NAN_CONFIG, rank, data=samples(nan_at=NAN_AT))


class StepLossRecorder:
    """Keeps the ``ctx.step_loss`` that ``after_backward`` hooks see."""

    def __init__(self) -> None:
        self.seen: list[float] = []

    @steadytrain.hookimpl
    def after_backward(self, ctx: steadytrain.StepContext) -> None:
        self.seen.append(ctx.step_loss.item())


@scenario
def step_loss_across_ranks(rank: int, folder: Path) -> dict:
    """Every task loss is 1, but rank 1's in step 1: 5 and 7 in its two micro-batches."""
    model = wrap(make_model(), "ddp")
    run = Run(model, make_optimizer(model), pipeline({"plugins": [{"plugin": "guard",
                                                                  "window": 1}]}), "ddp", rank)
    recorder = StepLossRecorder()
    run.pipe.register(recorder, name="recorder")
    distributed.setup(run.pipe, model, run.optimizer, total_steps=STEPS)
    for step in range(2):
        for index in range(2):
            batch = share(next(batches(samples(), GLOBAL_BATCH)), rank)
            run.pipe.before_step(batch=batch, micro_batch=index, num_micro_batches=2)
            out = run.model(**batch)
            task = out["loss"] * 0 + (5.0 + 2 * index if step and rank else 1.0)
            run.pipe.compute_loss(task, outputs=out).backward()
        steadytrain.step_optimizer(run.optimizer, run.pipe.after_backward())
        run.pipe.consolidate()
        run.optimizer.zero_grad()
    return {"seen": recorder.seen, "skipped": run.pipe.run.skipped_steps}


def resumed(kind: str, rank: int, folder: Path) -> dict:
    """The uninterrupted run, saved after RESUME_AT steps, and a fresh one loading that."""
    checkpoint = folder / f"checkpoint-{kind}"
    steps = 2 * RESUME_AT
    first = start(kind, SHARDED_CONFIG, rank, steps=steps)
    loader = batches(samples(), GLOBAL_BATCH)
    train(first, loader, RESUME_AT)
    distributed.save(checkpoint, first.pipe, model=first.model, optimizer=first.optimizer)
    train(first, loader, steps - RESUME_AT)
    second = start(kind, SHARDED_CONFIG, rank, steps=steps)
    distributed.load(checkpoint, second.pipe, model=second.model, optimizer=second.optimizer)
    loader = batches(samples()[RESUME_AT * GLOBAL_BATCH:], GLOBAL_BATCH)
    train(second, loader, steps - RESUME_AT)
    return {
        "uninterrupted": snapshot(first.pipe, first.model, first.optimizer,
                                  first.metrics[RESUME_AT:]),
        "resumed": snapshot(second.pipe, second.model, second.optimizer, second.metrics),
        "step": second.pipe.run.step,
    }


@scenario
def ddp_resume(rank: int, folder: Path) -> dict:
    return resumed("ddp", rank, folder)


@scenario
def fsdp2_resume(rank: int, folder: Path) -> dict:
    return resumed("fsdp2", rank, folder)


def error_of(call: Callable[[], Any]) -> str:
    """``"ErrorClass: message"`` of what *call* raised (``"no error"`` if nothing)."""
    try:
        call()
    except steadytrain.SteadytrainError as exc:
        return f"{type(exc).__name__}: {exc}"
    return "no error"


@scenario
def differing_configs(rank: int, folder: Path) -> dict:
    def setup_with(config: Mapping[str, Any], steps: int = STEPS) -> Callable[[], Any]:
        model = make_model()
        return lambda: distributed.setup(pipeline(config), DistributedDataParallel(model),
                                         make_optimizer(model), total_steps=steps)

    other_decay = {"plugins": [*CONFIG["plugins"][:3], {"plugin": "ema", "decay": 0.99}]}
    without_guard = {"plugins": CONFIG["plugins"][1:]}
    return {
        "same": error_of(setup_with(CONFIG)),
        "option": error_of(setup_with(other_decay if rank == 1 else CONFIG)),
        "instances": error_of(setup_with(without_guard if rank == 1 else CONFIG)),
        "total_steps": error_of(setup_with(CONFIG, STEPS + rank)),
    }


@scenario
def sharded_refusals(rank: int, folder: Path) -> dict:
    def setup_with(config: Mapping[str, Any], model: torch.nn.Module) -> Callable[[], Any]:
        return lambda: distributed.setup(pipeline(config), model, make_optimizer(model),
                                         total_steps=STEPS)

    ema_on_host = {"plugins": [{"plugin": "ema", "device": "cpu"}]}
    rows_split = wrap(make_model(), "fsdp2",
                      shard_placement_fn=lambda p: Shard(1 if p.ndim > 1 else 0))
    sharded = start("fsdp2", {"plugins": [{"plugin": "ema"}]}, rank)
    whole_state = pipeline({"plugins": [{"plugin": "ema"}]}).setup(
        make_model(), total_steps=STEPS).state_dict()
    return {
        "ema_on_host": error_of(setup_with(ema_on_host, wrap(make_model(), "fsdp2"))),
        "agc_split_rows": error_of(setup_with(AGC_CONFIG, rows_split)),
        "norm_split_rows": error_of(setup_with({"plugins": [{"plugin": "grad_clip"}]},
                                               rows_split)),
        "whole_into_sharded": error_of(lambda: sharded.pipe.load_state_dict(whole_state)),
        "state_of_other_rank": error_of(
            lambda: distributed.PipelineState(sharded.pipe).load_state_dict({})),
    }


@scenario
def logging_on_rank_zero(rank: int, folder: Path) -> dict:
    events: list[dict] = []

    def keep(_logger: Any, _method: str, event: dict) -> dict:
        events.append(dict(event))
        raise structlog.DropEvent

    structlog.configure(processors=[keep],
                        wrapper_class=structlog.make_filtering_bound_logger(0))
    distributed.log_on_rank_zero()
    distributed.log_on_rank_zero()
    start("ddp", CONFIG, rank)
    structlog.get_logger("app").info("app.event", rank=rank)
    processors = structlog.get_config()["processors"]
    quiet_logs()
    return {"events": [e["event"] for e in events], "processors": len(processors)}


# -- starting the ranks ------------------------------------------------------------------


def quiet_logs() -> None:
    """Errors only, as the test process logs (tests/conftest.py)."""
    structlog.reset_defaults()
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(40))


def record(folder: Path, name: str, rank: int, call: Callable[[], Any]) -> None:
    began = time.perf_counter()
    try:
        result = {"value": call()}
    except Exception as exc:
        result = {"error": f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}"}
    result["seconds"] = time.perf_counter() - began
    torch.save(result, folder / f"{name}.{rank}.pt")


def as_torchrun(rank: int, port: int) -> None:
    """The environment ``torchrun --nproc-per-node 2`` gives rank *rank*."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD),
                      LOCAL_WORLD_SIZE=str(WORLD), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))


def guide_block() -> str:
    """The loop of docs/distributed.md: its first Python block."""
    text = GUIDE.read_text()
    return text.split("```python\n", 1)[1].split("```", 1)[0]


def guide_run(rank: int, folder: Path, port: int) -> dict:
    """The guide's loop on this rank, as torchrun would start it, in a folder of its own."""
    (folder / "guide").mkdir(exist_ok=True)
    os.chdir(folder / "guide")
    as_torchrun(rank, port)
    printed = io.StringIO()
    namespace: dict[str, Any] = {}
    with contextlib.redirect_stdout(printed):
        exec(compile(guide_block(), str(GUIDE), "exec"), namespace)
    pipe = namespace["pipe"]
    return {"printed": printed.getvalue(), "step": pipe.run.step,
            "loss": namespace["metrics"]["loss/task"]}


def example_runs(rank: int, folder: Path, ports: list[int]) -> dict:
    """The example's ``main`` as torchrun would start it: DDP and FSDP2 for two epochs, and
    FSDP2 resumed from its checkpoint after the first epoch."""
    main = runpy.run_path(str(EXAMPLE))["main"]
    common = ["--epochs", "2", "--samples", "512", "--corrupt-step", "1", "--log-every", "2"]
    runs = {"ddp": [], "fsdp2": ["--fsdp"],
            "fsdp2_resumed": ["--fsdp", "--resume", str(folder / "fsdp2" / "epoch-0")]}
    summaries = {}
    for (name, options), port in zip(runs.items(), ports, strict=True):
        out = folder / name.removesuffix("_resumed")
        as_torchrun(rank, port)
        summaries[name] = main([*common, *options, "--out", str(out)])
    return summaries


def rank_main(rank: int, folder: Path, ports: list[int]) -> None:
    torch.set_num_threads(1)  # two ranks on two cores; and no OpenMP pool after the fork
    quiet_logs()
    dist.init_process_group("gloo", init_method=f"file://{folder}/rendezvous", rank=rank,
                            world_size=WORLD, timeout=datetime.timedelta(seconds=60))
    for name, function in SCENARIOS.items():
        record(folder, name, rank, lambda function=function: function(rank, folder))
    gc.collect()  # the DDP models first: see examples/distributed/train.py
    dist.destroy_process_group()
    record(folder, "example", rank, lambda: example_runs(rank, folder, ports[:3]))
    record(folder, "guide", rank, lambda: guide_run(rank, folder, ports[3]))


def free_ports(count: int) -> list[int]:
    """*count* distinct ports that nothing listens on (all held open while choosing)."""
    with contextlib.ExitStack() as stack:
        probes = [stack.enter_context(socket.socket()) for _ in range(count)]
        for probe in probes:
            probe.bind(("127.0.0.1", 0))
        return [probe.getsockname()[1] for probe in probes]


def launch(folder: Path) -> None:
    """Fork the ranks, wait for them (at most :data:`DEADLINE` seconds), and return."""
    skip_unless_forkable()
    ports = free_ports(4)
    context = mp.start_processes(rank_main, args=(folder, ports), nprocs=WORLD,
                                 start_method="fork", join=False)
    deadline = time.monotonic() + DEADLINE
    while not context.join(timeout=5):
        if time.monotonic() > deadline:
            for process in context.processes:
                if process.is_alive():
                    process.kill()
            raise TimeoutError(f"the ranks ran longer than {DEADLINE} s")


def results(folder: Path, name: str) -> list[Any]:
    """What each rank's scenario *name* returned; its error, raised, if it failed."""
    outcomes = [torch.load(folder / f"{name}.{rank}.pt", weights_only=False)
                for rank in range(WORLD)]
    errors = [f"rank {r}: {o['error']}" for r, o in enumerate(outcomes) if "error" in o]
    if errors:
        raise AssertionError("\n".join(errors))
    return [o["value"] for o in outcomes]

