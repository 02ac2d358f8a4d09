"""A memory-augmented byte-level language model with the mechanisms of the memory-model document.

The document (seed 000) describes a GPT with a short-term and a long-term memory, a
softmax gate that mixes the current state with what the memories return, hard top-k
sparsity and random consolidation, and then the building blocks that replace them. This
model has both, chosen by its options, so that a config swaps one for the other:

* ``gate``: ``"softmax"`` is a plain softmax over a linear map of the three inputs;
  ``"stabilized"`` is :class:`steadytrain.nn.MemoryGate` (bias toward the current state,
  learnable temperature clamped at 0.1).
* ``sparsity``: ``"hard_topk"`` keeps the ``target_sparsity`` share of each token's
  features with the largest learned scores (the scores get no gradient);
  ``"soft_topk"`` is :class:`steadytrain.nn.SoftTopK` (Gumbel noise, a sigmoid around the
  k-th score).
* ``consolidation``: ``"random"`` consolidates short- into long-term memory with
  probability ``consolidation_rate`` at each training forward pass; ``"scheduled"``
  leaves it to the ``scheduled_consolidation`` plugin.
* ``memory_norm``: a LayerNorm on what the memories return.

The rest: the byte GPT of :mod:`~steadytrain.experiments.gpt` gives the current state
``h``; :class:`steadytrain.nn.DualMemory` holds states of earlier batches as keys with the
embedding of the byte that followed each as value (``writes`` random positions per
training step go into short-term memory); the gate mixes ``h`` with both memories; a
sparse MLP (``4 · width`` features) adds to the mix, and a LayerNorm and a linear head
give the logits. Parameter names that contain ``memory`` (``memory_gate.*``,
``memory_norm.*``) are the memory parameters of the document's per-group settings. The
gate weights on each memory are reported as ``memory_utilization``.
"""

from __future__ import annotations

import attrs
import torch
import torch.nn.functional as F
from torch import nn

from .. import validators
from ..context import report
from ..nn import DualMemory, MemoryGate, SoftTopK, hard_topk_mask, keep_count, mix_memories
from .gpt import GPT, GPTOptions

GATES = ("softmax", "stabilized")
SPARSITIES = ("hard_topk", "soft_topk")
CONSOLIDATIONS = ("random", "scheduled")


@attrs.frozen
class MemoryLMOptions:
    """The ``[model]`` options of ``memory_lm``."""

    layers: int = attrs.field(default=2, validator=validators.positive_int)
    width: int = attrs.field(default=64, validator=validators.positive_int)
    heads: int = attrs.field(default=4, validator=validators.positive_int)
    qk_layernorm: bool = attrs.field(default=False, validator=validators.boolean)
    gate: str = attrs.field(default="softmax", validator=validators.one_of(*GATES))
    sparsity: str = attrs.field(default="hard_topk", validator=validators.one_of(*SPARSITIES))
    target_sparsity: float = attrs.field(
        default=0.05, validator=validators.in_range(0.0, 1.0, include_high=True))
    consolidation: str = attrs.field(
        default="random", validator=validators.one_of(*CONSOLIDATIONS))
    consolidation_rate: float = attrs.field(
        default=0.02, validator=validators.in_range(0.0, 1.0, include_high=True))
    threshold: int = attrs.field(default=3, validator=validators.positive_int)
    memory_norm: bool = attrs.field(default=False, validator=validators.boolean)
    stm: int = attrs.field(default=128, validator=validators.positive_int)
    ltm: int = attrs.field(default=256, validator=validators.positive_int)
    writes: int = attrs.field(default=32, validator=validators.positive_int)

    def __attrs_post_init__(self) -> None:
        if self.width % self.heads:
            raise validators.OptionError(
                "width", f"must be a multiple of heads ({self.heads}), got {self.width}"
            )


class SoftmaxGate(nn.Module):
    """The document's gate before its fix: ``softmax(W·[current, stm, ltm] + b)``."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(3 * dim, 3)

    def forward(
        self, current: torch.Tensor, stm: torch.Tensor, ltm: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        gates = torch.softmax(self.gate_proj(torch.cat([current, stm, ltm], dim=-1)), dim=-1)
        report("gates", gates)
        return mix_memories(current, stm, ltm, gates), gates


class HardTopK(nn.Module):
    """Keep each token's k features with the largest learned scores; the rest are zero.

    The mask is a hard selection, so the scoring layer receives no gradient: the
    discontinuity the document replaces with :class:`steadytrain.nn.SoftTopK`.
    """

    def __init__(self, dim: int, target_sparsity: float) -> None:
        super().__init__()
        self.k = keep_count(dim, target_sparsity)
        self.importance = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mask = hard_topk_mask(self.importance(x).detach(), self.k)
        report("sparsity_mask", mask)
        return x * mask, mask


class MemoryLM(nn.Module):
    """``forward(ids)``: next-byte logits of a GPT whose state is mixed with its memories."""

    def __init__(self, options: MemoryLMOptions, *, vocab: int, context: int) -> None:
        super().__init__()
        self.options = options
        width = options.width
        self.backbone = GPT(GPTOptions(options.layers, width, options.heads,
                                       qk_layernorm=options.qk_layernorm),
                            vocab=vocab, context=context)
        # The backbone's own head and final norm are not used: this model has its own.
        del self.backbone.head, self.backbone.norm
        self.memory = DualMemory(width, options.stm, options.ltm, threshold=options.threshold)
        self.memory_norm = nn.LayerNorm(width) if options.memory_norm else nn.Identity()
        self.memory_gate = MemoryGate(width) if options.gate == "stabilized" \
            else SoftmaxGate(width)
        self.up = nn.Linear(width, 4 * width)
        self.sparse = SoftTopK(4 * width, options.target_sparsity) \
            if options.sparsity == "soft_topk" else HardTopK(4 * width, options.target_sparsity)
        self.down = nn.Linear(4 * width, width)
        self.output_norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, vocab)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        current = self.backbone.hidden(ids)
        stm, ltm = self.memory.retrieve(current)
        mixed, gates = self.memory_gate(current, self.memory_norm(stm), self.memory_norm(ltm))
        report("memory_utilization", {"stm": gates[..., 1], "ltm": gates[..., 2]})
        sparse, _ = self.sparse(F.gelu(self.up(mixed)))
        logits = self.head(self.output_norm(mixed + self.down(sparse)))
        if self.training:
            self._remember(ids, current)
        return logits

    @torch.no_grad()
    def _remember(self, ids: torch.Tensor, current: torch.Tensor) -> None:
        """Store random states with the embedding of the byte that followed each."""
        keys = current[:, :-1].flatten(0, 1)
        values = self.backbone.embed(ids[:, 1:].flatten())
        pick = torch.randperm(keys.shape[0], device=keys.device)[: self.options.writes]
        self.memory.store(keys[pick], values[pick])
        options = self.options
        if options.consolidation == "random" and float(torch.rand(())) < options.consolidation_rate:
            self.memory.consolidate()
