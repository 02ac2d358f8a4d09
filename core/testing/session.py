"""The plain training loop the kit drives a plugin through, with checkpoints to resume from."""

from __future__ import annotations

import contextlib
import io
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import attrs
import torch

from ..optimizer_step import step_optimizer
from ..pipeline import Pipeline
from ..registry import Registry
from .fixture import Fixture

#: A context manager factory wrapped around each pipeline call, given the call's name.
Watch = Callable[[str], contextlib.AbstractContextManager]


def _unwatched(_call: str) -> contextlib.AbstractContextManager:
    return contextlib.nullcontext()


def to_device(value: Any, device: torch.device) -> Any:
    """*value* with every tensor in it (tuples, lists, dicts) moved to *device*."""
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, Mapping):
        return {k: to_device(v, device) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(to_device(v, device) for v in value)
    return value


def batches(fixture: Fixture, count: int, seed: int = 0) -> list[tuple[Any, Any]]:
    """*count* batches of *fixture*, the same for every run with the same *seed*."""
    generator = torch.Generator().manual_seed(seed)
    return [fixture.batch(generator) for _ in range(count)]


def round_trip(state: Any) -> Any:
    """*state* after ``torch.save`` and ``torch.load(weights_only=True)``."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


@attrs.define(eq=False)
class Session:
    """One pipeline with its model and optimizer, trained step by step in the plain loop."""

    pipe: Pipeline
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    fixture: Fixture
    device: torch.device
    watch: Watch = _unwatched

    @classmethod
    def start(
        cls,
        config: Mapping[str, Any],
        registry: Registry,
        fixture: Fixture,
        device: torch.device,
        watch: Watch = _unwatched,
    ) -> Session:
        """Build the pipeline of *config*, a fresh model (seed 0) and its SGD; set up."""
        pipe = Pipeline.from_config(config, registry=registry)
        torch.manual_seed(0)
        model = fixture.model().to(device)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        pipe.setup(model, optimizer, total_steps=fixture.steps)
        owned = list(pipe.parameters())
        if owned:
            optimizer.add_param_group({"params": owned})
        return cls(pipe, model, optimizer, fixture, device, watch)

    @property
    def instances(self) -> Sequence[Any]:
        return list(self.pipe.plugins.values())

    def step(self, inputs: Any, targets: Any) -> None:
        """One optimizer step of the documented loop."""
        pipe, watch = self.pipe, self.watch
        inputs, targets = to_device(inputs, self.device), to_device(targets, self.device)
        with watch("before_step"):
            pipe.before_step(batch=inputs, targets=targets)
        task_loss, outputs = self.fixture.forward(self.model, inputs, targets, self.instances)
        with watch("compute_loss"):
            loss = pipe.compute_loss(task_loss, outputs=outputs)
        loss.backward(create_graph=pipe.needs_create_graph)
        with watch("after_backward"):
            outcome = pipe.after_backward()
        step_optimizer(self.optimizer, outcome)
        with watch("consolidate"):
            pipe.consolidate()
        self.optimizer.zero_grad(set_to_none=True)

    def train(self, data: Sequence[tuple[Any, Any]]) -> None:
        for inputs, targets in data:
            self.step(inputs, targets)

    def evaluate(self, inputs: Any) -> None:
        """A forward pass inside ``pipe.evaluating()``, as a host's validation does."""
        with self.pipe.evaluating(), torch.no_grad():
            self.model.eval()
            try:
                self.model(to_device(inputs, self.device))
            finally:
                self.model.train()

    @contextlib.contextmanager
    def epoch(self) -> Iterator[None]:
        self.pipe.epoch_start()
        yield
        self.pipe.epoch_end()

    def checkpoint(self) -> dict[str, Any]:
        """Pipeline, model, optimizer and RNG state, after a weights-only save and load."""
        state = {
            "pipeline": self.pipe.state_dict(),
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "rng": torch.get_rng_state(),
        }
        if self.device.type == "cuda":
            state["cuda_rng"] = torch.cuda.get_rng_state(self.device)
        return round_trip(state)

    def resume(self, state: Mapping[str, Any]) -> None:
        """Load what :meth:`checkpoint` returned into this (set up) session."""
        self.pipe.load_state_dict(state["pipeline"])
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["rng"])
        if "cuda_rng" in state:
            torch.cuda.set_rng_state(state["cuda_rng"], self.device)

    def close(self) -> None:
        self.pipe.close()
