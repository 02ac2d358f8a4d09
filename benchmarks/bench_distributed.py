"""Several processes: DDP and FSDP2 under torchrun, against one process and by hand.

    torchrun --nproc-per-node 2 benchmarks/bench_distributed.py --json dist.json  # 2 GPUs, NCCL
    torchrun --nproc-per-node 1 benchmarks/bench_distributed.py --device cuda      # a rehearsal
    torchrun --nproc-per-node 2 benchmarks/bench_distributed.py --device cpu --tiny  # gloo

The GPT-2-small-sized decoder of ``bench_end_to_end.py`` (its model, its phase clock and
its hand-written techniques, imported) trains on random tokens, one process a GPU (NCCL)
or a CPU process each (gloo), the model wrapped in ``DistributedDataParallel``
(``--mode ddp``) or sharded with ``fully_shard`` (``--mode fsdp2``; both by default, in
turn). Each rank takes its share of every global batch. The techniques: the guard, the
z-loss (coefficient 1e-4), clipping in two groups (``*attn*`` at 0.5, the rest at 1.0) and
an EMA of the weights (decay 0.999), from ``steadytrain.adapters.distributed``. The forward
runs under bf16 autocast on CUDA, in float32 on the CPU. Five checks per mode:

* (a) **one process**: before the process group exists, every rank trains the model
  alone on the whole global batch; then the ranks train it together. The clipping norm
  of each group (the metric ``grad_clip/<group>/pre_norm``), every metric of
  ``pipe.metrics()`` (averaged over the ranks), the final weights and the EMA average are
  compared, as relative differences, with a tolerance per precision (:data:`TOLERANCE`);
* (b) **a non-finite gradient on one rank**: after the backward of one step, the last
  rank alone gets an ``inf`` in its gradient (its shard, under FSDP2), through the
  pipeline and by hand; every rank must skip that step and no other (its weights are
  unchanged by that step), and the ranks' records must be identical;
* (c) **time**: the variants ``plain``, ``hand`` and ``pipeline`` of ``bench_end_to_end``
  on one model, interleaved in rounds (every other round in reverse order); each phase
  between CUDA events, medians per rank, pipeline ÷ hand; host syncs per step counted
  with ``torch.cuda.set_sync_debug_mode("warn")`` (CUDA only); the collectives of one
  step. By hand, the guard's loss takes one all-reduce (the global batch's mean, as the
  core's), the two groups' norms under FSDP2 one all-reduce of both squared local norms,
  and the skip flag one all-reduce (MAX), as one would write them;
* (d) **EMA of the shards**: the pipeline's EMA update, plain and with a device-side skip
  flag, as bandwidth per rank (read the average and the weights, write the average)
  against a copy of the same bytes in the same run; the collectives that run inside the
  updates, counted under ``torch.profiler`` (there must be none: no all-gather), against
  those of one forward and backward (which has them);
* (e) **a checkpoint**: a run saves with ``torch.distributed.checkpoint``
  (``distributed.save``) halfway, goes on to the end, and is dropped with its process
  group; a fresh process group and a model initialized otherwise load the checkpoint
  (``distributed.load``) and train the second half: weights, EMA and metrics must equal
  the uninterrupted run's (exactly with float32; within the tolerance of (a) in bf16).

Rank 0 prints a table and, with ``--json``, writes everything measured. The exit status
is 1 when a check fails. ``--checks`` runs some of the checks only.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import logging
import math
import os
import platform
import shutil
import statistics
import sys
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator, Sequence
from datetime import date
from pathlib import Path
from typing import Any

import structlog
import torch
import torch.distributed as dist
import torch.nn.functional as F
from bench_ema_clip import timed
from bench_end_to_end import CONFIG as END_TO_END_CONFIG
from bench_end_to_end import GPT, PHASES, Clock, HandTechniques, Variant, count_syncs
from torch import nn
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel

import steadytrain
from steadytrain.adapters import distributed

Z_COEFFICIENT = 1e-4
#: The techniques of bench_end_to_end with the z-loss in place of label smoothing.
CONFIG = {"plugins": [
    {"plugin": "z_loss", "coefficient": Z_COEFFICIENT} if p["plugin"] == "label_smoothing"
    else p for p in END_TO_END_CONFIG["plugins"]
]}
GROUPS = ("attention", "default")
MODES = ("ddp", "fsdp2")
CHECKS = ("equivalence", "skip", "timing", "ema", "checkpoint")
#: Relative differences allowed against one process: float32 differs in the order of
#: the sums only; under bf16 autocast the ranks' matrix products of half the rows round
#: otherwise, and Adam's first steps move each weight by about ±lr whatever the size of
#: its gradient, so a near-zero gradient that rounds to the other sign moves a weight
#: the other way (a zero-initialized bias then differs by a few percent).
TOLERANCE = {
    "float32": {"norms": 1e-4, "metrics": 1e-4, "weights": 1e-4, "ema": 1e-4},
    "bfloat16": {"norms": 2e-2, "metrics": 2e-2, "weights": 5e-2, "ema": 5e-2},
}
GPT2_SMALL = {"layers": 12, "dim": 768, "heads": 12, "vocab": 50257, "seq": 1024, "batch": 16}
TINY = {"layers": 2, "dim": 64, "heads": 2, "vocab": 512, "seq": 32, "batch": 2}
#: The mark of a Clock that closes the backward phase: marks[0] opens the forward and
#: marks[i + 1] closes PHASES[i].
END_OF_BACKWARD = PHASES.index("backward") + 2


def local(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a DTensor (sharing its storage), or the tensor itself."""
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def whole(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor, on the host: a DTensor is gathered from every rank (collective)."""
    return (tensor.full_tensor() if isinstance(tensor, DTensor) else tensor).detach().cpu()


def world() -> tuple[int, int]:
    """This process's rank and the number of ranks; (0, 1) without a process group."""
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class DistributedHand(HandTechniques):
    """``bench_end_to_end``'s hand-written techniques on every rank, with the reductions
    that several ranks need, as one would write them."""

    def __init__(self, model: nn.Module, device: torch.device) -> None:
        super().__init__(model, device)
        # The average is elementwise: each rank averages its own shards.
        with torch.no_grad():
            self.params = [local(p) for p in self.params]
            self.shadow = [local(s) for s in self.shadow]
        self.ema_weights = [self.ema_weight.expand_as(s) for s in self.shadow]

    def after_backward(self, loss: torch.Tensor) -> torch.Tensor:
        if dist.is_initialized():  # the guard judges the global batch's loss, as the core's
            loss = loss.detach().float().reshape(1).clone()
            dist.all_reduce(loss)
            loss = loss[0] / dist.get_world_size()
        return super().after_backward(loss)

    def group_norms(self, groups: list[list[nn.Parameter]]) -> torch.Tensor:
        if not any(isinstance(p, DTensor) for params in groups for p in params):
            return super().group_norms(groups)  # DDP: every rank holds the averaged gradient
        squares = torch.stack([
            torch.nn.utils.get_total_norm([local(p.grad) for p in params], foreach=True)
            for params in groups]).square()
        dist.all_reduce(squares)  # both groups' sums of squares over the shards, at once
        return squares.sqrt()

    def agree(self, skip: torch.Tensor) -> torch.Tensor:
        if not dist.is_initialized():
            return skip
        flag = skip.to(torch.float32).reshape(1)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return flag[0] > 0


class DistributedVariant(Variant):
    """``bench_end_to_end``'s variants on every rank: the z-loss in place of label
    smoothing, the pipeline set up by ``distributed.setup``, :class:`DistributedHand`."""

    config = CONFIG
    hand_techniques = DistributedHand

    def setup_pipeline(self, pipe: steadytrain.Pipeline, total_steps: int) -> steadytrain.Pipeline:
        return distributed.setup(pipe, self.model, self.optimizer, total_steps=total_steps)

    def hand_loss(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        log_z = torch.logsumexp(logits.float(), dim=-1)
        return (F.cross_entropy(logits.flatten(0, 1), y.flatten())
                + Z_COEFFICIENT * log_z.square().mean())


class CorruptingClock(Clock):
    """A :class:`Clock` that, at the end of the backward phase, writes ``inf`` into this
    rank's gradient of *param* (its shard under FSDP2): a non-finite gradient that no
    other rank sees, since the gradients were reduced already."""

    def __init__(self, device: torch.device, param: torch.Tensor) -> None:
        super().__init__(device)
        self.param = param

    def mark(self) -> None:
        super().mark()
        if len(self.marks) == END_OF_BACKWARD:
            with torch.no_grad():
                local(self.param.grad).view(-1)[0] = math.inf


# -- models and data --------------------------------------------------------------------


def build(mode: str | None, args: argparse.Namespace, device: torch.device,
          seed: int = 1) -> nn.Module:
    """The GPT (the same on every rank for one *seed*): wrapped in DDP, sharded block by
    block and at its root (FSDP2), or alone (*mode* None)."""
    torch.manual_seed(seed)
    model = GPT(args.vocab, args.seq, args.layers, args.dim, args.heads).to(device)
    if mode == "ddp":
        return DistributedDataParallel(model, device_ids=[device] if device.type == "cuda"
                                       else None)
    if mode == "fsdp2":
        for block in model.blocks:
            fully_shard(block)
        fully_shard(model)  # the embeddings, tied to the head, and the final norm
    return model


def unwrapped(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, DistributedDataParallel) else model


def global_batches(args: argparse.Namespace, ranks: int, device: torch.device,
                   count: int = 4) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """*count* global batches of random tokens, the same on every rank."""
    g = torch.Generator().manual_seed(0)
    shape = (args.batch * ranks, args.seq)
    return [tuple(torch.randint(0, args.vocab, shape, generator=g).to(device) for _ in "xy")
            for _ in range(count)]


def shares(batches: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> list[tuple[torch.Tensor, ...]]:
    """This rank's share of each global batch."""
    rank, ranks = world()
    return [tuple(t.chunk(ranks)[rank] for t in batch) for batch in batches]


def train(variant: Variant, batches: Sequence[tuple[torch.Tensor, ...]],
          steps: range) -> list[dict[str, float]]:
    """Run *steps* (indices into *batches*) of *variant*; the pipeline's metrics of each."""
    metrics = []
    for step in steps:
        variant.step(*batches[step % len(batches)], Clock(variant.device))
        metrics.append(variant.end_of_round())
    return metrics


def trained_state(variant: Variant) -> dict[str, torch.Tensor]:
    """The model's weights and the pipeline's EMA average, whole, on the host."""
    model = unwrapped(variant.model)
    state = {f"weight {n}": whole(p) for n, p in model.named_parameters()}
    ema = variant.pipe.plugins["ema"]
    state.update({f"ema {n}": whole(s) for n, s in zip(ema.names, ema.shadow, strict=True)})
    return state


def local_state(variant: Variant) -> dict[str, torch.Tensor]:
    """This rank's part of the weights and of the EMA average, on the host (no collective)."""
    model = unwrapped(variant.model)
    state = {f"weight {n}": local(p).detach().cpu().clone() for n, p in model.named_parameters()}
    ema = variant.pipe.plugins["ema"]
    state.update({f"ema {n}": local(s).cpu().clone()
                  for n, s in zip(ema.names, ema.shadow, strict=True)})
    return state


def relative(got: torch.Tensor | float, want: torch.Tensor | float) -> float:
    """``|got − want| / |want|`` (a norm for tensors); the difference itself where want is 0."""
    if isinstance(want, torch.Tensor):
        difference, size = (got - want).norm().item(), want.norm().item()
    else:
        difference, size = abs(got - want), abs(want)
    if math.isnan(difference):
        return math.inf
    return difference / size if size else difference


def largest(pairs: Iterator[tuple[Any, Any]]) -> float:
    return max((relative(got, want) for got, want in pairs), default=0.0)


def compare_runs(got_metrics: list[dict[str, float]], want_metrics: list[dict[str, float]],
                 got_state: dict[str, torch.Tensor], want_state: dict[str, torch.Tensor]
                 ) -> dict[str, float]:
    """The largest relative differences of the clipping norms, the metrics, the weights
    and the EMA average between two runs."""
    if [sorted(m) for m in got_metrics] != [sorted(m) for m in want_metrics]:
        raise RuntimeError("the two runs recorded different metrics")
    pairs = list(zip(got_metrics, want_metrics, strict=True))
    norms = [f"grad_clip/{group}/pre_norm" for group in GROUPS]
    return {
        "norms": largest((g[k], w[k]) for g, w in pairs for k in norms),
        "metrics": largest((g[k], w[k]) for g, w in pairs for k in w),
        "weights": largest((got_state[k], w) for k, w in want_state.items()
                           if k.startswith("weight")),
        "ema": largest((got_state[k], w) for k, w in want_state.items() if k.startswith("ema")),
    }


def collectives(work: Callable[[], object], device: torch.device) -> Counter:
    """The collectives (``c10d::`` operations) that *work* runs, by name."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda"
                                           else [])
    with profile(activities=activities) as prof:
        work()
        if device.type == "cuda":
            torch.cuda.synchronize()
    return Counter(e.name for e in prof.events() if e.name.startswith("c10d::"))


# -- (a) one process on the global batch --------------------------------------------------


def reference(args: argparse.Namespace, device: torch.device, ranks: int) -> dict[str, Any]:
    """The run of one process on the whole global batch (before any process group)."""
    model = build(None, args, device)
    variant = DistributedVariant("pipeline", model, model, device, args.check_steps, args.lr)
    metrics = train(variant, global_batches(args, ranks, device), range(args.check_steps))
    state = trained_state(variant)
    variant.pipe.close()
    return {"metrics": metrics, "state": state}


def check_equivalence(mode: str, args: argparse.Namespace, device: torch.device,
                      one_process: dict[str, Any]) -> dict[str, Any]:
    model = build(mode, args, device)
    variant = DistributedVariant("pipeline", model, model, device, args.check_steps, args.lr)
    batches = shares(global_batches(args, world()[1], device))
    metrics = train(variant, batches, range(args.check_steps))
    found = compare_runs(metrics, one_process["metrics"], trained_state(variant),
                         one_process["state"])
    variant.pipe.close()
    limits = TOLERANCE[precision(device)]
    return {"differences": found, "tolerance": limits,
            "passed": all(found[k] <= limits[k] for k in found)}


# -- (b) a non-finite gradient on one rank --------------------------------------------------


def check_skip(mode: str, args: argparse.Namespace, device: torch.device,
               at: int = 1, steps: int = 3) -> dict[str, Any]:
    """Per variant, which steps moved this rank's weights, gathered from every rank."""
    rank, ranks = world()
    batches = shares(global_batches(args, ranks, device))
    records: dict[str, Any] = {}
    for name in ("pipeline", "hand"):
        model = build(mode, args, device)
        variant = DistributedVariant(name, model, model, device, steps, args.lr)
        target = next(p for p in model.parameters() if local(p).numel())
        moved, guard = [], []
        for step in range(steps):
            before = [local(p).detach().clone() for p in model.parameters()]
            corrupt = step == at and rank == ranks - 1
            variant.step(*batches[step % len(batches)],
                         CorruptingClock(device, target) if corrupt else Clock(device))
            metrics = variant.end_of_round()
            moved.append(any(not torch.equal(b, local(p))
                             for b, p in zip(before, model.parameters(), strict=True)))
            guard.append(metrics.get("guard/nonfinite_grads"))
        records[name] = {"moved": moved}
        if variant.pipe is not None:
            records[name].update({"skipped_steps": variant.pipe.run.skipped_steps,
                                  "guard/nonfinite_grads": guard})
            variant.pipe.close()
    gathered: list[Any] = [None] * ranks
    dist.all_gather_object(gathered, records)
    want = [step != at for step in range(steps)]
    passed = all(r == gathered[0] for r in gathered) and all(
        gathered[0][name]["moved"] == want for name in records)
    return {"corrupted": {"rank": ranks - 1, "step": at}, "ranks": gathered, "passed": passed}


# -- (c) time per step --------------------------------------------------------------------


def check_timing(mode: str, args: argparse.Namespace, device: torch.device
                 ) -> tuple[dict[str, Any], Variant, nn.Module]:
    """Medians per rank of each variant's step and phases; host syncs per step on CUDA."""
    model = build(mode, args, device)
    total = args.warmup + args.rounds * args.steps + 20
    variants = [DistributedVariant(name, model, model, device, total, args.lr)
                for name in ("plain", "hand", "pipeline")]
    batches = shares(global_batches(args, world()[1], device))
    for variant in variants:
        train(variant, batches, range(args.warmup))
    gpu: dict[str, list[float]] = defaultdict(list)
    host: dict[str, list[float]] = defaultdict(list)
    phases: dict[str, list[list[float]]] = defaultdict(list)
    for round_index in range(args.rounds):
        # Every other round in reverse order: no variant always follows the same one.
        for variant in variants if round_index % 2 == 0 else variants[::-1]:
            clocks = [Clock(device) for _ in range(args.steps)]
            for i, clock in enumerate(clocks):
                variant.step(*batches[(round_index + i) % len(batches)], clock)
            if device.type == "cuda":
                torch.cuda.synchronize()
            for clock in clocks:
                g, h = clock.phases()
                gpu[variant.name].append(sum(g))
                host[variant.name].append(sum(h))
                phases[variant.name].append(g)
            variant.end_of_round()
    syncs = {v.name: count_syncs(v, batches, 10) if device.type == "cuda" else (None, {})
             for v in variants}
    found = {}
    for variant in variants:
        found[variant.name] = collectives(lambda v=variant: v.step(*batches[0], Clock(device)),
                                          device)
        variant.end_of_round()
    mine = {v.name: {
        "step_ms": statistics.median(gpu[v.name]), "host_ms": statistics.median(host[v.name]),
        "phases_ms": {p: statistics.median(s[i] for s in phases[v.name])
                      for i, p in enumerate(PHASES)},
        "syncs": syncs[v.name][0], "sync_sites": dict(syncs[v.name][1]),
        "collectives": dict(found[v.name])} for v in variants}
    mine["ratio"] = mine["pipeline"]["step_ms"] / mine["hand"]["step_ms"]
    gathered: list[Any] = [None] * world()[1]
    dist.all_gather_object(gathered, mine)
    return {"ranks": gathered}, variants[2], model


# -- (d) the EMA of the shards --------------------------------------------------------------


def copy_seconds(size: int, device: torch.device, repeat: int) -> float:
    """Seconds per copy of *size* bytes from one buffer to another on *device*."""
    source = torch.empty(size // 4, device=device)
    target = torch.empty_like(source)
    return timed(lambda: target.copy_(source), device.type, repeat)


def check_ema(variant: Variant, model: nn.Module, args: argparse.Namespace,
              device: torch.device) -> dict[str, Any]:
    """Bandwidth of the EMA update of this rank's shards against a copy of as many bytes."""
    ema = variant.pipe.plugins["ema"]
    shadow = [local(s) for s in ema.shadow]
    size = sum(s.numel() * s.element_size() for s in shadow)
    ema.num_updates  # noqa: B018  (reads a device-side count: back to the plain update)
    plain = timed(ema.update, device.type, args.ema_repeat)
    keep = torch.zeros((), dtype=torch.bool, device=device)
    skip_aware = timed(lambda: ema.update(skip=keep), device.type, args.ema_repeat)
    seconds = {"ema": plain, "ema, device-side skip flag": skip_aware,
               "copy": copy_seconds(size, device, args.ema_repeat)}
    # Bytes an update must move: read the average and the weights, write the average.
    moved = {"ema": 3 * size, "ema, device-side skip flag": 3 * size, "copy": 2 * size}
    bandwidth = {k: moved[k] / s / 1e9 for k, s in seconds.items()}
    x, y = shares(global_batches(args, world()[1], device, count=1))[0]

    def forward_backward() -> None:
        with variant.autocast:
            logits = model(x)
        F.cross_entropy(logits.flatten(0, 1), y.flatten()).backward()
        model.zero_grad()

    found = {
        "ema": collectives(ema.update, device),
        "ema, device-side skip flag": collectives(lambda: ema.update(skip=keep), device),
        "forward and backward": collectives(forward_backward, device),
    }
    mine = {"bytes": size, "seconds": seconds, "GBps": bandwidth,
            "of_copy": {k: bandwidth[k] / bandwidth["copy"] for k in seconds if k != "copy"},
            "collectives": {k: dict(c) for k, c in found.items()}}
    gathered: list[Any] = [None] * world()[1]
    dist.all_gather_object(gathered, mine)
    passed = all(not r["collectives"]["ema"] and not r["collectives"][
        "ema, device-side skip flag"] for r in gathered)
    return {"ranks": gathered, "passed": passed}


# -- (e) a checkpoint, resumed in a fresh process group ---------------------------------------


def check_checkpoint(mode: str, args: argparse.Namespace, device: torch.device,
                     folder: Path) -> dict[str, Any]:
    half = args.check_steps
    steps = 2 * half
    batches = shares(global_batches(args, world()[1], device))
    if world()[0] == 0:
        shutil.rmtree(folder, ignore_errors=True)  # a checkpoint of an earlier run
    dist.barrier()
    model = build(mode, args, device)
    variant = DistributedVariant("pipeline", model, model, device, steps, args.lr)
    train(variant, batches, range(half))
    distributed.save(folder, variant.pipe, model=model, optimizer=variant.optimizer)
    metrics = train(variant, batches, range(half, steps))
    uninterrupted = local_state(variant)
    variant.pipe.close()
    del variant, model
    restart_process_group(device)
    model = build(mode, args, device, seed=2)  # other weights: the checkpoint must replace them
    variant = DistributedVariant("pipeline", model, model, device, steps, args.lr)
    distributed.load(folder, variant.pipe, model=model, optimizer=variant.optimizer)
    resumed_at = variant.pipe.run.step
    resumed = train(variant, batches, range(half, steps))
    found = compare_runs(resumed, metrics, local_state(variant), uninterrupted)
    variant.pipe.close()
    exact = precision(device) == "float32"
    limits = TOLERANCE[precision(device)]
    limit = {k: 0.0 if exact else limits[k] for k in found}
    mine = {"resumed_at": resumed_at, "differences": found}
    gathered: list[Any] = [None] * world()[1]
    dist.all_gather_object(gathered, mine)
    passed = all(r["resumed_at"] == half and all(r["differences"][k] <= limit[k] for k in limit)
                 for r in gathered)
    return {"saved_at": half, "steps": steps, "ranks": gathered, "tolerance": limit,
            "passed": passed}


# -- the run ----------------------------------------------------------------------------------


def precision(device: torch.device) -> str:
    return "bfloat16" if device.type == "cuda" else "float32"


def start_process_group(device: torch.device, store: dist.Store | None = None) -> None:
    """The process group of all ranks: NCCL on CUDA, gloo on the CPU; through torchrun's
    rendezvous, or through *store*."""
    backend = "nccl" if device.type == "cuda" else "gloo"
    bound = {"device_id": device} if device.type == "cuda" else {}
    if store is None:
        dist.init_process_group(backend, **bound)
    else:
        rank, ranks = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        dist.init_process_group(backend, store=store, rank=rank, world_size=ranks, **bound)


def restart_process_group(device: torch.device) -> None:
    """Destroy the process group and start a fresh one, with a store of its own.

    Started again through torchrun's store, the ranks of a fresh gloo group at times wait
    for each other forever while they connect (torch 2.13); a store that no group used
    before avoids it. Rank 0 serves it on a free port, which the old group tells the others.
    """
    rank, ranks = world()
    host = os.environ["MASTER_ADDR"]
    store = (dist.TCPStore(host, 0, ranks, is_master=True, wait_for_workers=False)
             if rank == 0 else None)
    port = [store.port if store is not None else None]
    dist.broadcast_object_list(port)
    # DDP's reducer keeps the group alive from inside a reference cycle: collect it first.
    gc.collect()
    dist.destroy_process_group()
    if store is None:
        store = dist.TCPStore(host, port[0], ranks, is_master=False)
    start_process_group(device, store)


def run_mode(mode: str, args: argparse.Namespace, device: torch.device,
             one_process: dict[str, Any] | None) -> dict[str, Any]:
    results: dict[str, Any] = {}
    if one_process is not None:
        results["equivalence"] = check_equivalence(mode, args, device, one_process)
    if "skip" in args.checks:
        results["skip"] = check_skip(mode, args, device)
    if "timing" in args.checks or "ema" in args.checks:
        timing, variant, model = check_timing(mode, args, device)
        if "timing" in args.checks:
            results["timing"] = timing
        if "ema" in args.checks:
            results["ema"] = check_ema(variant, model, args, device)
        variant.pipe.close()
        del variant, model
        gc.collect()
    if "checkpoint" in args.checks:
        results["checkpoint"] = check_checkpoint(mode, args, device,
                                                 args.out / f"checkpoint-{mode}")
    return results


def parse(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--mode", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument("--device", choices=("cuda", "cpu"),
                        default="cuda" if torch.cuda.is_available() else "cpu",
                        help="cuda: one GPU per rank (LOCAL_RANK), NCCL; cpu: gloo")
    parser.add_argument("--tiny", action="store_true",
                        help=f"the sizes of a smoke run ({TINY}) instead of GPT-2 small's")
    for name, value in GPT2_SMALL.items():
        parser.add_argument(f"--{name}", type=int,
                            help=f"default {value}" + (" (per rank)" if name == "batch" else ""))
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--checks", nargs="+", choices=CHECKS, default=list(CHECKS))
    parser.add_argument("--check-steps", type=int, default=5,
                        help="steps of (a); (e) saves after as many and runs twice as many")
    parser.add_argument("--rounds", type=int, default=5, help="(c): rounds of the variants")
    parser.add_argument("--steps", type=int, default=10, help="(c): steps a variant a round")
    parser.add_argument("--warmup", type=int, default=3, help="(c): steps before timing")
    parser.add_argument("--ema-repeat", type=int, default=20, help="(d): updates per timing")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/out/distributed"),
                        help="(e): where the checkpoints go")
    parser.add_argument("--json", type=Path, help="write everything measured here")
    args = parser.parse_args(argv)
    for name, value in (TINY if args.tiny else GPT2_SMALL).items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if "RANK" not in os.environ:
        parser.error("launch with torchrun: torchrun --nproc-per-node N "
                     "benchmarks/bench_distributed.py ...")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse(argv)
    device = torch.device("cpu")
    if args.device == "cuda":
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    ranks = int(os.environ["WORLD_SIZE"])
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    distributed.log_on_rank_zero()
    one_process = reference(args, device, ranks) if "equivalence" in args.checks else None
    start_process_group(device)
    try:
        results = {mode: run_mode(mode, args, device, one_process) for mode in args.mode}
        passed = all(check["passed"] for mode in results.values() for check in mode.values()
                     if "passed" in check)
        if dist.get_rank() == 0:
            report(args, device, ranks, results, passed)
    finally:
        gc.collect()
        dist.destroy_process_group()
    return 0 if passed else 1


# -- the report ---------------------------------------------------------------------------------


def cpu_name() -> str:
    """The processor's model name (Linux), else what ``platform`` knows; its core count."""
    name = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        models = [line.split(":", 1)[1].strip()
                  for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")]
        name = models[0] if models else name
    return f"{name} ({os.cpu_count()} cores)"


def describe(args: argparse.Namespace, device: torch.device, ranks: int) -> str:
    machine = (f"{ranks} × {torch.cuda.get_device_name(device)} (NCCL)" if device.type == "cuda"
               else f"{ranks} CPU processes on {cpu_name()} (gloo)")
    parameters = sum(p.numel() for p in GPT(args.vocab, args.seq, args.layers, args.dim,
                                             args.heads).parameters())
    return (f"torch {torch.__version__}, Python {platform.python_version()}, {machine}, "
            f"{date.today()}; GPT of {parameters / 1e6:.1f}M parameters "
            f"({args.layers} layers, width {args.dim}), batch {args.batch}×{args.seq} per rank, "
            f"{precision(device)}")


def verdict(passed: bool) -> str:
    return "ok" if passed else "FAILED"


def report(args: argparse.Namespace, device: torch.device, ranks: int,
           results: dict[str, dict[str, Any]], passed: bool) -> None:
    print(describe(args, device, ranks))
    rows = [(m, r) for m, r in results.items()]
    if any("equivalence" in r for _, r in rows):
        print(f"\n(a) against one process on the global batch ({args.batch * ranks}×{args.seq}), "
              f"{args.check_steps} steps: largest relative differences (tolerance)")
        print(f"{'mode':7}{'clip norms':>20}{'metrics':>20}{'weights':>20}{'EMA':>20}  result")
        for mode, r in rows:
            if "equivalence" in r:
                e = r["equivalence"]
                cells = "".join(f"{e['differences'][k]:>11.2e} ({e['tolerance'][k]:.0e})"
                                for k in ("norms", "metrics", "weights", "ema"))
                print(f"{mode:7}{cells}  {verdict(e['passed'])}")
    if any("skip" in r for _, r in rows):
        print("\n(b) an inf in the gradient of the last rank only: which steps moved each "
              "rank's weights")
        for mode, r in rows:
            if "skip" in r:
                s = r["skip"]
                at = s["corrupted"]
                for name in ("pipeline", "hand"):
                    moved = "; ".join(
                        f"rank {i}: " + " ".join("stepped" if m else "SKIPPED"
                                                 for m in rank[name]["moved"])
                        for i, rank in enumerate(s["ranks"]))
                    print(f"{mode:7}{name:10}inf on rank {at['rank']} at step {at['step']}: "
                          f"{moved}  {verdict(s['passed'])}")
                guard = s["ranks"][0]["pipeline"]["guard/nonfinite_grads"]
                print(f"{'':17}guard/nonfinite_grads (mean of the ranks' verdicts): {guard}")
    if any("timing" in r for _, r in rows):
        print(f"\n(c) median ms per step over {args.rounds}×{args.steps} steps, per rank "
              "(GPU time between CUDA events; host time on the CPU)")
        print(f"{'mode':7}{'rank':>5}{'variant':>10}{'step':>10}{'÷ hand':>8}{'host':>10}"
              + "".join(f"{p[:12]:>13}" for p in PHASES) + f"{'syncs':>7}")
        for mode, r in rows:
            for rank, t in enumerate(r.get("timing", {}).get("ranks", [])):
                for name in ("plain", "hand", "pipeline"):
                    v = t[name]
                    syncs = "n/a" if v["syncs"] is None else f"{v['syncs']:.2f}"
                    print(f"{mode:7}{rank:5}{name:>10}{v['step_ms']:10.3f}"
                          f"{v['step_ms'] / t['hand']['step_ms']:8.4f}{v['host_ms']:10.3f}"
                          + "".join(f"{v['phases_ms'][p]:13.3f}" for p in PHASES)
                          + f"{syncs:>7}")
                    if v["sync_sites"]:
                        print(f"{'':22}syncs at " + ", ".join(
                            f"{site} ×{n}" for site, n in v["sync_sites"].items()))
        for mode, r in rows:
            for rank, t in enumerate(r.get("timing", {}).get("ranks", [])[:1]):
                print(f"{mode:7}collectives in one step (rank {rank}): " + "; ".join(
                    f"{name} " + (", ".join(f"{c} ×{n}" for c, n in
                                            sorted(t[name]["collectives"].items())) or "none")
                    for name in ("plain", "hand", "pipeline")))
    if any("ema" in r for _, r in rows):
        print("\n(d) EMA of this rank's weights (its shards under FSDP2): GB/s, share of the "
              "copy; collectives inside")
        for mode, r in rows:
            for rank, e in enumerate(r.get("ema", {}).get("ranks", [])):
                inside = {k: sum(c.values()) for k, c in e["collectives"].items()}
                print(f"{mode:7}rank {rank}: {e['bytes'] / 1e6:.1f} MB; copy "
                      f"{e['GBps']['copy']:.1f} GB/s; ema {e['GBps']['ema']:.1f} GB/s "
                      f"({e['of_copy']['ema']:.1%}); with the skip flag "
                      f"{e['GBps']['ema, device-side skip flag']:.1f} GB/s "
                      f"({e['of_copy']['ema, device-side skip flag']:.1%}); collectives: "
                      f"ema {inside['ema']}, with the skip flag "
                      f"{inside['ema, device-side skip flag']}, one forward and backward "
                      f"{inside['forward and backward']} "
                      f"({', '.join(sorted(e['collectives']['forward and backward']))})")
            if "ema" in r:
                print(f"{mode:7}no collective in the EMA update: {verdict(r['ema']['passed'])}")
    if any("checkpoint" in r for _, r in rows):
        print("\n(e) saved with torch.distributed.checkpoint, resumed in a fresh process group: "
              "largest relative differences from the uninterrupted run")
        for mode, r in rows:
            if "checkpoint" in r:
                c = r["checkpoint"]
                worst = {k: max(rank["differences"][k] for rank in c["ranks"])
                         for k in ("norms", "metrics", "weights", "ema")}
                print(f"{mode:7}saved at step {c['saved_at']}, resumed to {c['steps']}: "
                      + ", ".join(f"{k} {v:.2e}" for k, v in worst.items())
                      + f" (tolerance {max(c['tolerance'].values()):.0e})  "
                      f"{verdict(c['passed'])}")
    print(f"\n{'all checks passed' if passed else 'SOME CHECKS FAILED'}")
    if args.json:
        args.json.write_text(json.dumps(
            {"args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
             "machine": describe(args, device, ranks), "torch": torch.__version__,
             "ranks": ranks, "results": results, "passed": passed}, indent=1))


if __name__ == "__main__":
    sys.exit(main())
