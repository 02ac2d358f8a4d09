"""Causal multi-head self-attention with optional qk-layernorm, reporting its largest logit.

qk-layernorm applies a LayerNorm over the head dimension to the queries and the keys
before their dot product (Dehghani et al. 2023, "Scaling Vision Transformers to 22
Billion Parameters"). Wortsman et al. 2023 ("Small-scale proxies for large-scale
Transformer training instabilities") show that without it the attention logits of a
Transformer grow with the learning rate until the softmax collapses onto one key and the
loss diverges, and that with it the range of learning rates that train widens.

The logits are computed explicitly (not by ``F.scaled_dot_product_attention``) so that
their largest magnitude can be reported to the open pipeline step: growing attention
logits are the first sign of this instability.
"""

from __future__ import annotations

import torch
from torch import nn

from ..context import report
from ..validators import check, positive_int
from ._checks import check_features, describe


def causal_mask(length: int, device: torch.device | None = None) -> torch.Tensor:
    """``(length, length)`` booleans, True where a query may not see a key (the future)."""
    return torch.ones(length, length, dtype=torch.bool, device=device).triu(1)


class CausalSelfAttention(nn.Module):
    """Causal self-attention over ``(batch, length, dim)`` with ``heads`` heads.

    ``logits = q·kᵀ / √head_dim`` per head, with ``q`` and ``k`` passed through a
    LayerNorm over the head dimension first when ``qk_layernorm`` is set; future keys are
    masked, the softmax weights average ``v``, and a linear layer mixes the heads.
    ``forward`` returns the output, and reports the largest logit over the visible
    positions (a detached scalar; Wortsman et al.'s "max attention logit") to the open
    pipeline step as ``ctx.outputs[report_as]`` (``report_as=None`` reports nothing;
    several layers report a list).
    """

    def __init__(
        self,
        dim: int,
        heads: int,
        *,
        qk_layernorm: bool = False,
        report_as: str | None = "attention_logits_max",
    ) -> None:
        super().__init__()
        owner = type(self).__name__
        self.dim = check(dim, positive_int, f"{owner}.dim")
        self.heads = check(heads, positive_int, f"{owner}.heads")
        if dim % heads:
            raise ValueError(f"{owner}: dim ({dim}) must be a multiple of heads ({heads})")
        self.head_dim = dim // heads
        self.qk_layernorm = bool(qk_layernorm)
        self.report_as = report_as
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.q_norm = nn.LayerNorm(self.head_dim) if qk_layernorm else None
        self.k_norm = nn.LayerNorm(self.head_dim) if qk_layernorm else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_features(describe(self), "x", x, self.dim)
        if x.dim() != 3:
            raise ValueError(
                f"{describe(self)}: x must be (batch, length, dim), got shape {tuple(x.shape)}"
            )
        batch, length, _ = x.shape
        q, k, v = self.qkv(x).view(batch, length, 3, self.heads, self.head_dim).permute(
            2, 0, 3, 1, 4
        )
        if self.q_norm is not None and self.k_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        logits = (q @ k.transpose(-2, -1)) * self.head_dim**-0.5
        logits = logits.masked_fill(causal_mask(length, x.device), float("-inf"))
        if self.report_as is not None:
            report(self.report_as, logits.detach().amax())
        weights = torch.softmax(logits, dim=-1)
        out = (weights @ v).transpose(1, 2).reshape(batch, length, self.dim)
        return self.proj(out)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, heads={self.heads}, qk_layernorm={self.qk_layernorm}"
