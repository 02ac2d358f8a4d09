"""Small helpers shared by the test modules."""

import io
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
import torch

import steadytrain


def round_trip(state: Any) -> Any:
    """*state* after ``torch.save`` and ``torch.load(weights_only=True)``, as a checkpoint."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


@contextmanager
def no_host_sync() -> Iterator[None]:
    """Any host-device synchronization inside is an error (torch's sync debug mode)."""
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode("default")


def skip_unless_forkable() -> None:
    """Skip the calling test where this process sees a GPU: its ranks are forked, and a
    forked process can neither run a backward pass once its parent has (the autograd
    engine's threads for the GPU are not forked) nor use CUDA once its parent has."""
    if torch.cuda.is_available():
        pytest.skip("forks its ranks, which fails in a process that sees a GPU; run it "
                    "with the GPU hidden: CUDA_VISIBLE_DEVICES= python -m pytest <this "
                    "module>")


def regularize(pipe: steadytrain.Pipeline, outputs: dict, task_loss=None) -> torch.Tensor:
    """One whole step whose loss is made of the plugins' terms on *outputs*; its loss."""
    pipe.before_step()
    loss = pipe.compute_loss(task_loss, outputs=outputs)
    pipe.after_backward()
    pipe.consolidate()
    return loss


class L2Outputs(steadytrain.Plugin):
    """Mean squared model output, a regularizer that is linear in the batch."""

    name = "l2_outputs"

    @steadytrain.hookimpl
    def compute_regularizers(self, ctx):
        return {"l2": ctx.outputs["pred"].pow(2).mean()}
