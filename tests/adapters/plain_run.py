"""The plain steadytrain loop that the adapter tests compare the trainers against.

A tiny classifier returning ``{"loss", "logits"}`` (the shape a Hugging Face ``Trainer``
expects), samples as dicts, and the documented loop over them: the reference every
adapter must reproduce.
"""

from __future__ import annotations

import gc
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import attrs
import pytest
import torch
import torch.nn.functional as F

import steadytrain

#: ema, two-group grad_clip, guard and a regularizer; thresholds low enough to clip.
CONFIG = {
    "plugins": [
        {"plugin": "guard"},
        {"plugin": "label_smoothing", "smoothing": 0.1},
        {"plugin": "grad_clip", "max_norm": 0.3,
         "groups": [{"name": "enc", "include": ["enc.*"], "max_norm": 0.1}]},
        {"plugin": "ema", "decay": 0.9},
    ]
}
LR = 0.05
#: Read once: reading the installed distributions' entry points takes about a second.
REGISTRY = steadytrain.Registry.discover(autoload=False)


def pipeline(config: Mapping[str, Any] = CONFIG) -> steadytrain.Pipeline:
    return steadytrain.Pipeline.from_config(config, registry=REGISTRY)


@pytest.fixture(scope="module")
def frozen_heap() -> Iterator[None]:
    """Leave the objects alive before the module's tests out of garbage collection.

    Accelerate runs ``gc.collect()`` at the start of every training run; with transformers
    imported, a full collection takes about a second on the test machine.
    """
    gc.freeze()
    yield
    gc.unfreeze()


class Tiny(torch.nn.Module):
    """A two-layer classifier; the loss is the mean cross-entropy over the batch."""

    def __init__(self) -> None:
        super().__init__()
        self.enc = torch.nn.Linear(4, 8)
        self.head = torch.nn.Linear(8, 3)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.enc(x)))

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> dict[str, Any]:
        out = {"logits": self.logits(x)}
        if labels is not None:
            out["loss"] = F.cross_entropy(out["logits"], labels)
        return out


def make_model(cls: type[Tiny] = Tiny) -> Tiny:
    torch.manual_seed(0)
    return cls()


def make_optimizer(model: torch.nn.Module, *, fused: bool = True) -> torch.optim.Optimizer:
    return torch.optim.AdamW(model.parameters(), lr=LR, fused=fused)


def samples(n: int = 64, *, seed: int = 0, nan_at: int | None = None) -> list[dict]:
    """*n* samples ``{"x", "labels"}``; sample *nan_at* gets a NaN input."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, generator=g)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0.5).long()
    if nan_at is not None:
        x[nan_at, 0] = float("nan")
    return [{"x": x[i], "labels": y[i]} for i in range(n)]


def batches(data: Sequence[Mapping[str, torch.Tensor]], size: int) -> Iterator[dict]:
    """Consecutive batches of *size* samples, stacked as a data collator does."""
    for start in range(0, len(data), size):
        chunk = data[start:start + size]
        yield {key: torch.stack([s[key] for s in chunk]) for key in chunk[0]}


@attrs.define
class Result:
    weights: dict[str, torch.Tensor]
    averaged: dict[str, torch.Tensor]
    metrics: list[dict[str, float]]
    optimizer: dict[str, Any]
    skipped: int


def snapshot(pipe: steadytrain.Pipeline, model: torch.nn.Module,
             optimizer: torch.optim.Optimizer, metrics: list[dict[str, float]]) -> Result:
    """Training weights, the weights inside ``pipe.evaluating()``, metrics, optimizer."""
    weights = {k: v.detach().clone() for k, v in model.state_dict().items()}
    with pipe.evaluating():
        averaged = {k: v.detach().clone() for k, v in model.state_dict().items()}
    state = optimizer.state_dict()["state"]
    moments = {f"{i}.{k}": v.clone() for i, s in state.items() for k, v in s.items()}
    return Result(weights, averaged, metrics, moments, pipe.run.skipped_steps)


def train_plain(
    data: Sequence[Mapping[str, torch.Tensor]],
    *,
    steps: int,
    batch_size: int,
    accumulation: int = 1,
    bf16: bool = False,
    log_every: int = 1,
    config: Mapping[str, Any] = CONFIG,
    fused: bool = True,
) -> Result:
    """The documented loop, with the host dividing the loss by the micro-batch count."""
    model = make_model()
    optimizer = make_optimizer(model, fused=fused)
    pipe = pipeline(config)
    pipe.setup(model, optimizer, total_steps=steps)
    loader = batches(data, batch_size)
    k = accumulation
    metrics = []
    pipe.epoch_start()
    for step in range(steps):
        for index in range(k):
            batch = next(loader)
            pipe.before_step(batch=batch, targets=batch["labels"], micro_batch=index,
                             num_micro_batches=k, loss_scale=1.0)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                out = model(**batch)
            out = {name: value.float() for name, value in out.items()}
            loss = pipe.compute_loss(out["loss"], outputs=out)
            (loss / k).backward()
        steadytrain.step_optimizer(optimizer, pipe.after_backward())
        pipe.consolidate()
        optimizer.zero_grad()
        if (step + 1) % log_every == 0:
            metrics.append(pipe.metrics())
    return snapshot(pipe, model, optimizer, metrics)


def assert_same(actual: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Tensor]) -> None:
    assert actual.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(actual[name], expected[name], msg=name)


def assert_same_metrics(actual: Sequence[Mapping[str, float]],
                        expected: Sequence[Mapping[str, float]]) -> None:
    assert len(actual) == len(expected)
    for got, want in zip(actual, expected, strict=True):
        shared = {k: got[k] for k in want}
        assert shared == pytest.approx(want, rel=1e-5, abs=1e-6, nan_ok=True)
