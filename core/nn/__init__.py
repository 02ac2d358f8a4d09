"""Building blocks for models: torch modules that report their gates and masks to the pipeline."""

from .attention import CausalSelfAttention, causal_mask
from .consolidation import Consolidating, consolidating_modules
from .memory_buffer import DualMemory, MemoryBuffer, consolidate_memories
from .memory_gate import GATE_BIAS, MemoryGate, mix_memories
from .soft_topk import SoftTopK, gumbel_noise, hard_topk_mask, keep_count, soft_topk_mask

__all__ = [
    "GATE_BIAS",
    "CausalSelfAttention",
    "Consolidating",
    "DualMemory",
    "MemoryBuffer",
    "MemoryGate",
    "SoftTopK",
    "causal_mask",
    "consolidate_memories",
    "consolidating_modules",
    "gumbel_noise",
    "hard_topk_mask",
    "keep_count",
    "mix_memories",
    "soft_topk_mask",
]
