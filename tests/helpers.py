"""Small helpers shared by the test modules."""

import io
from typing import Any

import torch

import steadytrain


def round_trip(state: Any) -> Any:
    """*state* after ``torch.save`` and ``torch.load(weights_only=True)``, as a checkpoint."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


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
