"""Differentiable top-k sparsity over the features of each token (seed 000, section 2).

A small linear layer scores every feature of every token. In training, Gumbel noise is
added to the scores and each token keeps a soft mask ``sigmoid(sharpness·(s − s_k))``
around its own k-th largest noisy score ``s_k``; in evaluation the mask is the hard
top-k of the clean scores, exactly k ones per token. ``k = max(1, round(target·dim))``.

The document takes k from the batch size and one threshold over the whole tensor, which
makes tokens compete with each other across the batch; here each token is sparse on
its own. Its noise ``-log(-log(U + 1e-8) + 1e-8)`` is ``±inf`` at ``U = 0`` and ``U = 1``
in float16, where ``1e-8`` rounds to 0; :func:`gumbel_noise` clamps ``U`` into the open
interval of the sample's own dtype instead of adding a constant.
"""

from __future__ import annotations

import torch
from torch import nn

from ..context import report
from ..validators import check, positive, positive_int
from ._checks import FRACTION, check_features, describe


def gumbel_noise(uniform: torch.Tensor) -> torch.Tensor:
    """Standard Gumbel samples ``-log(-log(U))`` from uniform samples, finite for U in [0, 1].

    ``U`` is clamped to ``[tiny, 1 − eps/2]``: the smallest normal number and the largest
    number below 1 of its dtype, so both logarithms stay finite.
    """
    info = torch.finfo(uniform.dtype)
    return -torch.log(-torch.log(uniform.clamp(info.tiny, 1.0 - info.eps / 2)))


def soft_topk_mask(scores: torch.Tensor, k: int, sharpness: float = 10.0) -> torch.Tensor:
    """``sigmoid(sharpness·(s − s_k))`` with ``s_k`` the k-th largest score of each row.

    Rows are the last dimension; the k-th largest score itself gets 0.5.
    """
    threshold = scores.topk(k, dim=-1).values[..., -1:]
    return torch.sigmoid(sharpness * (scores - threshold))


def hard_topk_mask(scores: torch.Tensor, k: int) -> torch.Tensor:
    """1 at the k largest scores of each row (the last dimension), 0 elsewhere."""
    return torch.zeros_like(scores).scatter_(-1, scores.topk(k, dim=-1).indices, 1.0)


def keep_count(dim: int, target_sparsity: float) -> int:
    """How many of *dim* features a token keeps: ``max(1, round(target_sparsity·dim))``."""
    return max(1, round(target_sparsity * dim))


class SoftTopK(nn.Module):
    """Keep about ``target_sparsity`` of each token's features; differentiable in training.

    ``forward(x)`` takes ``(..., dim)`` and returns ``(x · mask, mask)`` with a mask of the
    shape of ``x``, and reports the mask to the open pipeline step as
    ``ctx.outputs[report_as]`` (``report_as=None`` reports nothing). The noisy scores are
    divided by a learnable temperature clamped at ``min_temperature``, as in the gate.
    """

    def __init__(
        self,
        dim: int,
        target_sparsity: float = 0.15,
        *,
        sharpness: float = 10.0,
        min_temperature: float = 0.1,
        report_as: str | None = "sparsity_mask",
    ) -> None:
        super().__init__()
        owner = type(self).__name__
        self.dim = check(dim, positive_int, f"{owner}.dim")
        self.target_sparsity = check(
            target_sparsity, FRACTION, f"{owner}.target_sparsity"
        )
        self.sharpness = check(sharpness, positive, f"{owner}.sharpness")
        self.min_temperature = check(
            min_temperature, positive, f"{owner}.min_temperature"
        )
        self.k = keep_count(dim, target_sparsity)
        self.report_as = report_as
        self.importance = nn.Linear(dim, dim)
        self.temperature = nn.Parameter(torch.ones(1))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        check_features(describe(self), "x", x, self.dim)
        scores = self.importance(x)
        if self.training:
            noisy = (scores + gumbel_noise(torch.rand_like(scores))) / self.temperature.clamp(
                min=self.min_temperature
            )
            mask = soft_topk_mask(noisy, self.k, self.sharpness)
        else:
            mask = hard_topk_mask(scores, self.k)
        if self.report_as is not None:
            report(self.report_as, mask)
        return x * mask, mask

    def extra_repr(self) -> str:
        return f"dim={self.dim}, target_sparsity={self.target_sparsity}, k={self.k}"
