"""A steadytrain pipeline on every rank of a torchrun job, with DDP or FSDP2, on data made here.

    torchrun --nproc-per-node 2 examples/distributed/train.py               # DDP, CPU (gloo)
    torchrun --nproc-per-node 2 examples/distributed/train.py --fsdp        # FSDP2 (fully_shard)
    torchrun --nproc-per-node 2 examples/distributed/train.py --device cuda # one GPU a rank (NCCL)
    torchrun --nproc-per-node 2 examples/distributed/train.py --fsdp --epochs 4 \\
        --resume runs/distributed/epoch-1                                   # continue a run

An MLP learns to tell three noisy rings apart. Each rank trains on its share of every
global batch (a ``DistributedSampler``), with gradients accumulated over two micro-batches;
the pipeline (``config.toml``: guard, label smoothing, two-group clipping, EMA) runs on
every rank. One batch of rank 1 is corrupted with a NaN (``--corrupt-step``): only that
rank's guard sees it, and every rank skips the step. Metrics are averaged over the ranks
and printed by rank 0, the only rank that logs. After each epoch the ranks validate with
the EMA average on their share of the validation set and save a checkpoint
(``torch.distributed.checkpoint``: model, optimizer and pipeline) under ``--out``.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.fsdp import fully_shard
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

import steadytrain
from steadytrain.adapters import distributed

HERE = Path(__file__).resolve().parent
ACCUMULATION = 2


def rings(n: int, seed: int) -> TensorDataset:
    """Points on three concentric rings of radius 1, 2 and 3 (the labels), with noise."""
    g = torch.Generator().manual_seed(seed)
    label = torch.randint(0, 3, (n,), generator=g)
    angle = torch.rand(n, generator=g) * 2 * math.pi
    radius = (label + 1).float() + 0.3 * torch.randn(n, generator=g)
    x = torch.stack([radius * torch.cos(angle), radius * torch.sin(angle)], dim=1) / 3
    return TensorDataset(x, label)


class Classifier(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = torch.nn.Sequential(
            torch.nn.Linear(2, 64), torch.nn.Tanh(), torch.nn.Linear(64, 64), torch.nn.Tanh(),
            torch.nn.Linear(64, 3),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def make_model(fsdp: bool, device: torch.device) -> torch.nn.Module:
    torch.manual_seed(0)  # the same initial weights on every rank
    model = Classifier().to(device)
    if not fsdp:
        return DistributedDataParallel(model, device_ids=[device] if device.type == "cuda"
                                       else None)
    for layer in model.net[::2]:  # the linear layers, then the rest
        fully_shard(layer)
    fully_shard(model)
    return model


def no_sync(model: torch.nn.Module, last: bool) -> contextlib.AbstractContextManager:
    """Reduce gradients across ranks only in the backward of the last micro-batch."""
    if isinstance(model, DistributedDataParallel):
        return contextlib.nullcontext() if last else model.no_sync()
    model.set_requires_gradient_sync(last)
    return contextlib.nullcontext()


def accuracy(model: torch.nn.Module, loader: DataLoader, device: torch.device) -> float:
    """Accuracy over every rank's share of the validation set."""
    counts = torch.zeros(2, device=device)
    with torch.no_grad():
        for x, y in loader:
            x, y = x.to(device), y.to(device)
            counts[0] += (model(x).argmax(1) == y).sum()
            counts[1] += len(y)
    dist.all_reduce(counts)
    return (counts[0] / counts[1]).item()


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config", nargs="?", default=HERE / "config.toml")
    parser.add_argument("--fsdp", action="store_true", help="shard with FSDP2 instead of DDP")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                        help="cpu: gloo; cuda: one GPU per rank (LOCAL_RANK), NCCL")
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--samples", type=int, default=4096, help="training points")
    parser.add_argument("--batch", type=int, default=64, help="global micro-batch size")
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--corrupt-step", type=int, default=10,
                        help="optimizer step whose batch on rank 1 gets a NaN (-1: none)")
    parser.add_argument("--log-every", type=int, default=16, help="steps between metrics")
    parser.add_argument("--out", type=Path, default=Path("runs/distributed"),
                        help="where the checkpoints go")
    parser.add_argument("--resume", type=Path, help="a checkpoint folder to continue from")
    args = parser.parse_args(argv)

    device = torch.device("cpu")
    if args.device == "cuda":
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    # torchrun sets RANK, WORLD_SIZE and the rendezvous
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    try:
        return train(args, device)
    finally:
        # DDP's reducer keeps the process group alive from inside a reference cycle;
        # collected after the group is destroyed, it can deadlock the exit (gloo)
        gc.collect()
        dist.destroy_process_group()


def train(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    """The run on this rank; its summary."""
    rank, world = dist.get_rank(), dist.get_world_size()
    distributed.log_on_rank_zero()
    say = print if rank == 0 else (lambda *_args, **_kwargs: None)

    train_set = rings(args.samples, seed=0)
    val_set = rings(1024, seed=1)
    sampler = DistributedSampler(train_set, shuffle=True, seed=0, drop_last=True)
    loader = DataLoader(train_set, batch_size=args.batch // world, sampler=sampler, drop_last=True)
    val_loader = DataLoader(val_set, batch_size=256,
                            sampler=DistributedSampler(val_set, shuffle=False))
    steps_per_epoch = len(loader) // ACCUMULATION

    model = make_model(args.fsdp, device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, fused=True)
    pipe = steadytrain.Pipeline.from_config(args.config)
    distributed.setup(pipe, model, optimizer, total_steps=args.epochs * steps_per_epoch)
    if args.resume:
        distributed.load(args.resume, pipe, model=model, optimizer=optimizer)
        say(f"resumed from {args.resume} at step {pipe.run.step}, epoch {pipe.run.epoch}")

    for epoch in range(pipe.run.epoch, args.epochs):
        sampler.set_epoch(epoch)
        pipe.epoch_start(epoch)
        batches = iter(loader)
        for _ in range(steps_per_epoch):
            for index in range(ACCUMULATION):
                x, y = (t.to(device, non_blocking=True) for t in next(batches))
                if pipe.run.step == args.corrupt_step and rank == 1 and index == 0:
                    x = x.clone()
                    x[0, 0] = math.nan  # a broken record, on one rank only
                with no_sync(model, index == ACCUMULATION - 1):
                    pipe.before_step(batch=x, targets=y, micro_batch=index,
                                     num_micro_batches=ACCUMULATION)
                    logits = model(x)
                    loss = pipe.compute_loss(F.cross_entropy(logits, y),
                                             outputs={"logits": logits})
                    loss.backward()
            steadytrain.step_optimizer(optimizer, pipe.after_backward())
            pipe.consolidate()
            optimizer.zero_grad()
            if pipe.run.step % args.log_every == 0:
                metrics = pipe.metrics()  # on every rank: an all-reduce
                say(f"step {pipe.run.step:4d}  loss {metrics['loss/task']:.4f}  "
                    f"head norm {metrics['grad_clip/head/pre_norm']:.3f}  "
                    f"skipped so far {pipe.run.skipped_steps}")
        pipe.epoch_end()
        with pipe.evaluating():
            averaged = accuracy(model, val_loader, device)
        say(f"epoch {epoch}: validation accuracy {averaged:.3f} (EMA weights)")
        checkpoint = args.out / f"epoch-{epoch}"
        distributed.save(checkpoint, pipe, model=model, optimizer=optimizer)

    trained = accuracy(model, val_loader, device)
    with pipe.evaluating():
        averaged = accuracy(model, val_loader, device)
    summary = {"steps": pipe.run.step, "skipped": pipe.run.skipped_steps,
               "accuracy": trained, "ema_accuracy": averaged}
    say(f"skipped steps: {summary['skipped']} of {summary['steps']}")
    say(f"validation accuracy: {averaged:.3f} (EMA weights), {trained:.3f} (training weights)")
    pipe.close()
    return summary


if __name__ == "__main__":
    main()
