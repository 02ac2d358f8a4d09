"""The plain steadytrain loop that the adapter tests compare the trainers against.

A tiny classifier returning ``{"loss", "logits"}`` (the shape a Hugging Face ``Trainer``
expects), samples as dicts, and the documented loop over them: the reference every
adapter must reproduce; and the comparisons of a trainer's run with it.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import attrs
import pytest
import torch
import torch.nn.functional as F

import steadytrain


def stabilizing(group: Mapping[str, Any]) -> dict[str, Any]:
    """The guard, label smoothing, grad_clip at 0.3 with *group* clipped on its own, and an
    EMA: the pipeline the adapter tests train with (thresholds low enough to clip)."""
    return {
        "plugins": [
            {"plugin": "guard"},
            {"plugin": "label_smoothing", "smoothing": 0.1},
            {"plugin": "grad_clip", "max_norm": 0.3, "groups": [dict(group)]},
            {"plugin": "ema", "decay": 0.9},
        ]
    }


CONFIG = stabilizing({"name": "enc", "include": ["enc.*"], "max_norm": 0.1})
LR = 0.05
#: Read once: reading the installed distributions' entry points takes about a second.
REGISTRY = steadytrain.Registry.discover(autoload=False)


def pipeline(config: Mapping[str, Any] = CONFIG) -> steadytrain.Pipeline:
    return steadytrain.Pipeline.from_config(config, registry=REGISTRY)


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
    """What a run trained: its weights, inside ``pipe.evaluating()`` too, the metrics it
    read, its optimizer's moments and its skipped steps."""

    weights: dict[str, torch.Tensor]
    averaged: dict[str, torch.Tensor]
    metrics: list[dict[str, float]]
    optimizer: dict[str, Any]
    skipped: int

    @classmethod
    def of(cls, parts: Mapping[str, Any]) -> Result:
        """The result among *parts* (a rank's report, which may hold more)."""
        return cls(**{field.name: parts[field.name] for field in attrs.fields(cls)})


def snapshot(pipe: steadytrain.Pipeline, model: torch.nn.Module,
             optimizer: torch.optim.Optimizer, metrics: list[dict[str, float]]) -> Result:
    """Training weights, the weights inside ``pipe.evaluating()``, metrics, optimizer."""
    weights = {k: v.detach().clone() for k, v in model.state_dict().items()}
    with pipe.evaluating():
        averaged = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return Result(weights, averaged, metrics, moments(optimizer), pipe.run.skipped_steps)


def moments(optimizer: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    """Every state tensor of *optimizer* (copied), under ``<parameter index>.<name>``."""
    state = optimizer.state_dict()["state"]
    return {f"{i}.{k}": v.clone() for i, s in state.items() for k, v in s.items()}


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


def assert_same(actual: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Tensor],
                **tolerance: float) -> None:
    """The same tensors under the same names (``torch.testing.assert_close``'s tolerance)."""
    assert actual.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(actual[name], expected[name], msg=name, **tolerance)


def assert_same_metrics(actual: Sequence[Mapping[str, float]],
                        expected: Sequence[Mapping[str, float]]) -> None:
    assert len(actual) == len(expected)
    for got, want in zip(actual, expected, strict=True):
        shared = {k: got[k] for k in want}
        assert shared == pytest.approx(want, rel=1e-5, abs=1e-6, nan_ok=True)


def assert_same_run(got: Result, want: Result, *, without: Sequence[str] = (),
                    metrics_but: str | None = None) -> None:
    """*got* trained as *want*: weights, averaged weights, optimizer moments, skipped steps
    and metrics, except the parts named in *without* and the metrics whose names start with
    *metrics_but*."""
    for part in ("weights", "averaged", "optimizer"):
        if part not in without:
            assert_same(getattr(got, part), getattr(want, part))
    if "skipped" not in without:
        assert got.skipped == want.skipped
    if "metrics" not in without:
        def kept(metrics: Sequence[Mapping[str, float]]) -> list[dict[str, float]]:
            return [{k: v for k, v in m.items()
                     if metrics_but is None or not k.startswith(metrics_but)} for m in metrics]

        assert_same_metrics(kept(got.metrics), kept(want.metrics))
