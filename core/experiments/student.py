"""The student of the distillation demonstration: the GPT with one block's MLP made low-rank.

``gpt_student`` is the built-in :class:`~steadytrain.experiments.gpt.GPT` in which the MLP
of block ``block`` is replaced by a narrow one, ``width → rank → width`` (GELU) instead of
``width → mlp_ratio·width → width``: a modified model that should behave like the
original, as seed 002's student replaces the attention-output paths of its teacher.
Everything else has the teacher's shapes, and the run starts it from the teacher's
weights (:func:`copy_matching`: every tensor of the same name and shape, the new MLP's
output bias included); the new MLP's two weights and its first bias start from the GPT-2
initialisation.
"""

from __future__ import annotations

import attrs
import torch
from torch import nn

from .. import validators
from .gpt import GPT, GPTOptions, init_gpt2_


@attrs.frozen
class StudentOptions(GPTOptions):
    """The ``[model]`` options of ``gpt_student``: the teacher's GPT options, ``block``
    (which block's MLP is replaced, from 0) and ``rank`` (the new MLP's hidden units)."""

    block: int = attrs.field(default=0, validator=validators.non_negative_int)
    rank: int = attrs.field(default=16, validator=validators.positive_int)

    def __attrs_post_init__(self) -> None:
        super().__attrs_post_init__()
        if self.block >= self.layers:
            raise validators.OptionError(
                "block", f"must name one of the {self.layers} blocks (0 to {self.layers - 1}), "
                f"got {self.block}"
            )

    @property
    def teacher(self) -> GPTOptions:
        """The options of the unmodified GPT this student copies."""
        return GPTOptions(**{f.name: getattr(self, f.name) for f in attrs.fields(GPTOptions)})


def low_rank_mlp(width: int, rank: int) -> nn.Sequential:
    """``Linear(width, rank) → GELU → Linear(rank, width)``, GPT-2 initialised."""
    mlp = nn.Sequential(nn.Linear(width, rank), nn.GELU(), nn.Linear(rank, width))
    init_gpt2_(mlp)
    return mlp


class StudentGPT(GPT):
    """The GPT with a low-rank MLP in block ``options.block``."""

    def __init__(self, options: StudentOptions, *, vocab: int, context: int) -> None:
        super().__init__(options, vocab=vocab, context=context)
        self.blocks[options.block].mlp = low_rank_mlp(options.width, options.rank)


def copy_matching(student: nn.Module, teacher: nn.Module) -> list[str]:
    """Copy the teacher's tensors into the student's of the same name and shape; return the
    names of the student's tensors that kept their own values."""
    source = teacher.state_dict()
    kept = []
    with torch.no_grad():
        for name, tensor in student.state_dict().items():
            if name in source and source[name].shape == tensor.shape:
                tensor.copy_(source[name])
            else:
                kept.append(name)
    return kept
