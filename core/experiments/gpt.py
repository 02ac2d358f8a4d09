"""A small pre-norm GPT over bytes, with qk-layernorm as an option.

Token and learned position embeddings, ``layers`` blocks of ``x + attn(LN(x))`` and
``x + MLP(LN(x))`` (GELU, ``mlp_ratio · width`` hidden units), a final LayerNorm and an
untied linear head over the 256 byte values. Weights start as in GPT-2: normal with
standard deviation 0.02, zero biases. The attention is :class:`steadytrain.nn.CausalSelfAttention`,
which reports its largest logit; ``qk_layernorm = true`` normalizes queries and keys.
"""

from __future__ import annotations

import attrs
import torch
import torch.nn.functional as F
from torch import nn

from .. import validators
from ..nn import CausalSelfAttention


@attrs.frozen
class GPTOptions:
    """The ``[model]`` options of ``gpt``."""

    layers: int = attrs.field(default=2, validator=validators.positive_int)
    width: int = attrs.field(default=64, validator=validators.positive_int)
    heads: int = attrs.field(default=4, validator=validators.positive_int)
    mlp_ratio: int = attrs.field(default=4, validator=validators.positive_int)
    qk_layernorm: bool = attrs.field(default=False, validator=validators.boolean)

    def __attrs_post_init__(self) -> None:
        if self.width % self.heads:
            raise validators.OptionError(
                "width", f"must be a multiple of heads ({self.heads}), got {self.width}"
            )


class Block(nn.Module):
    """One pre-norm Transformer block."""

    def __init__(self, width: int, heads: int, mlp_ratio: int, qk_layernorm: bool) -> None:
        super().__init__()
        self.attn_norm = nn.LayerNorm(width)
        self.attn = CausalSelfAttention(width, heads, qk_layernorm=qk_layernorm)
        self.mlp_norm = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, mlp_ratio * width), nn.GELU(),
                                 nn.Linear(mlp_ratio * width, width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x))
        return x + self.mlp(self.mlp_norm(x))


def init_gpt2_(module: nn.Module) -> None:
    """Normal(0, 0.02) weights and zero biases for every Linear and Embedding."""
    for sub in module.modules():
        if isinstance(sub, (nn.Linear, nn.Embedding)):
            nn.init.normal_(sub.weight, 0.0, 0.02)
        if isinstance(sub, nn.Linear) and sub.bias is not None:
            nn.init.zeros_(sub.bias)


class GPT(nn.Module):
    """Byte-level pre-norm GPT: ``forward(ids)`` maps ``(batch, length)`` to next-byte logits."""

    def __init__(self, options: GPTOptions, *, vocab: int, context: int) -> None:
        super().__init__()
        self.context = context
        self.embed = nn.Embedding(vocab, options.width)
        self.position = nn.Embedding(context, options.width)
        self.blocks = nn.ModuleList(
            Block(options.width, options.heads, options.mlp_ratio, options.qk_layernorm)
            for _ in range(options.layers)
        )
        self.norm = nn.LayerNorm(options.width)
        self.head = nn.Linear(options.width, vocab)
        init_gpt2_(self)

    def block_states(self, ids: torch.Tensor) -> list[torch.Tensor]:
        """Every block's output, first to last; the last one is :meth:`hidden`."""
        if ids.shape[-1] > self.context:
            raise ValueError(f"GPT: sequences of {ids.shape[-1]} tokens are longer than the "
                             f"context of {self.context}")
        x = self.embed(ids) + self.position(torch.arange(ids.shape[-1], device=ids.device))
        states = []
        for block in self.blocks:
            x = block(x)
            states.append(x)
        return states

    def hidden(self, ids: torch.Tensor) -> torch.Tensor:
        """The final block's output, before the last LayerNorm."""
        return self.block_states(ids)[-1]

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Next-byte logits of the final block's output."""
        return self.head(self.norm(hidden))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.logits(self.hidden(ids))


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy of ``(batch, length, vocab)`` logits."""
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())
