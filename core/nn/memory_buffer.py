"""Bounded circular memory and short-term → long-term consolidation (seed 000, sections 3, 7).

:class:`MemoryBuffer` is a fixed-capacity ring of key/value entries with an importance,
an age, a valid flag and an access count, all registered buffers: they live in the
model's ``state_dict`` and follow ``.to(device)``. :class:`DualMemory` pairs a short-term
and a long-term buffer and implements the consolidation protocol
(:class:`~steadytrain.nn.Consolidating`) with :func:`consolidate_memories`.

Semantics, where the document's sketch is ambiguous or wrong:

* One call to :meth:`MemoryBuffer.store` is one write, whether it holds one entry or a
  batch. Entries already in the buffer age by one and their importance decays once by
  ``decay``; the new entries start at age 0 with the importance given (the document ages
  and decays the new entry in its own write). A batch larger than the capacity keeps its
  last ``capacity`` rows.
* After each write, entries older than ``max_age`` writes are invalidated. Because every
  write moves the ring on, an entry is overwritten after at most ``capacity`` writes:
  the document's limit of ``2·capacity`` (the default) never fires, and ``max_age`` only
  matters when set below the capacity.
* Stored keys and values are detached copies; gradients flow from :meth:`retrieve` to
  the query only. A retrieval that needs gradients keeps its own copy of the keys and
  values (``O(capacity·dim)``), so that storing later in the same forward pass does not
  break its backward.
* In training mode, :meth:`retrieve` counts an access for the entry each query attends
  to most; evaluation leaves the buffer unchanged.
* Consolidation copies every valid short-term entry with at least ``threshold`` accesses
  into the long-term buffer (one write, with the entry's importance), halves its
  short-term importance and resets its access count, so it moves again only after
  ``threshold`` new accesses (the document would copy it again at every consolidation).
  The document's learned transfer gate is left out: its hard ``p > 0.5`` decision gives
  it no gradient, so it would never learn.
"""

from __future__ import annotations

import torch
from torch import nn

from ..validators import check, positive_int
from ._checks import FRACTION, check_features, describe


class MemoryBuffer(nn.Module):
    """A ring of ``capacity`` key/value entries of ``dim`` features with importance and age."""

    keys: torch.Tensor
    values: torch.Tensor
    importance: torch.Tensor
    age: torch.Tensor
    valid: torch.Tensor
    access_counts: torch.Tensor
    write_ptr: torch.Tensor

    def __init__(
        self, capacity: int, dim: int, *, decay: float = 0.95, max_age: int | None = None
    ) -> None:
        super().__init__()
        owner = type(self).__name__
        self.capacity = check(capacity, positive_int, f"{owner}.capacity")
        self.dim = check(dim, positive_int, f"{owner}.dim")
        self.decay = check(decay, FRACTION, f"{owner}.decay")
        self.max_age = 2 * capacity if max_age is None else check(
            max_age, positive_int, f"{owner}.max_age"
        )
        self.register_buffer("keys", torch.zeros(capacity, dim))
        self.register_buffer("values", torch.zeros(capacity, dim))
        self.register_buffer("importance", torch.zeros(capacity))
        self.register_buffer("age", torch.zeros(capacity, dtype=torch.long))
        self.register_buffer("valid", torch.zeros(capacity, dtype=torch.bool))
        self.register_buffer("access_counts", torch.zeros(capacity, dtype=torch.long))
        self.register_buffer("write_ptr", torch.zeros((), dtype=torch.long))

    @torch.no_grad()
    def store(
        self, key: torch.Tensor, value: torch.Tensor, importance: float | torch.Tensor = 1.0
    ) -> None:
        """Write one entry (``(dim,)``) or a batch (``(n, dim)``) at the write pointer.

        *importance* is a number, or a tensor with one value per entry. Never syncs the
        host with the device.
        """
        owner = describe(self)
        check_features(owner, "key", key, self.dim)
        check_features(owner, "value", value, self.dim)
        if key.dim() > 2 or key.shape != value.shape:
            raise ValueError(
                f"{owner}: key and value must both be (dim,) or (n, dim), got shapes "
                f"{tuple(key.shape)} and {tuple(value.shape)}"
            )
        key, value = key.reshape(-1, self.dim), value.reshape(-1, self.dim)
        rows = key.shape[0]
        if isinstance(importance, torch.Tensor) and importance.numel() not in (1, rows):
            raise ValueError(
                f"{owner}: importance must be a number or have one value per entry ({rows}), "
                f"got shape {tuple(importance.shape)}"
            )
        if rows == 0:
            return
        self.age += self.valid
        self.importance *= self.decay
        kept = min(rows, self.capacity)
        slots = (self.write_ptr + (rows - kept) + torch.arange(kept, device=self.keys.device))
        slots %= self.capacity
        self.keys.index_copy_(0, slots, key[-kept:].to(self.keys))
        self.values.index_copy_(0, slots, value[-kept:].to(self.values))
        if isinstance(importance, torch.Tensor):
            importance = importance.detach().to(self.importance).reshape(-1).expand(rows)
            self.importance.index_copy_(0, slots, importance[-kept:])
        else:
            # A number is filled in rather than made a tensor: copying it to the device
            # would sync the host.
            self.importance.index_fill_(0, slots, float(importance))
        self.age.index_fill_(0, slots, 0)
        self.access_counts.index_fill_(0, slots, 0)
        self.valid.index_fill_(0, slots, True)
        self.valid &= self.age <= self.max_age
        self.write_ptr.add_(rows).remainder_(self.capacity)

    def retrieve(self, query: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Attend from *query* ``(..., dim)`` over the valid entries.

        Returns ``(value, weights)``: the attention-weighted value ``(..., dim)`` and the
        weights ``(..., capacity)`` (``softmax(q·kᵀ/√dim)`` over valid entries, 0 on
        invalid ones; all 0, and a zero value, when the buffer is empty).
        """
        check_features(describe(self), "query", query, self.dim)
        keys, values, valid = self.keys, self.values, self.valid
        if torch.is_grad_enabled() and query.requires_grad:
            # The backward needs them as they are now, and a store later in the same
            # forward pass (retrieve, then store) updates the buffers in place.
            keys, values, valid = keys.clone(), values.clone(), valid.clone()
        scores = (query @ keys.t()) * self.dim**-0.5
        # The lowest finite number rather than -inf: an empty buffer then gives uniform
        # weights that the mask zeroes, instead of NaN from a softmax over all -inf.
        scores = scores.masked_fill(~valid, torch.finfo(scores.dtype).min)
        weights = torch.softmax(scores, dim=-1) * valid
        if self.training:
            with torch.no_grad():
                top = weights.reshape(-1, self.capacity).argmax(dim=-1)
                self.access_counts.index_add_(0, top, valid[top].long())
        return weights @ values, weights

    def extra_repr(self) -> str:
        return f"capacity={self.capacity}, dim={self.dim}, decay={self.decay}"


@torch.no_grad()
def consolidate_memories(
    short_term: MemoryBuffer,
    long_term: MemoryBuffer,
    threshold: int,
    *,
    transfer_decay: float = 0.5,
) -> dict[str, torch.Tensor]:
    """Copy the well-used short-term entries into *long_term*; decay them where they were.

    Candidates are the valid entries of *short_term* with at least *threshold* accesses.
    They go into *long_term* as one write, oldest first, each with its short-term
    importance; in *short_term* their importance is multiplied by *transfer_decay* and
    their access count reset to 0. Returns ``moved`` (how many entries) and
    ``mean_importance`` (their mean importance before the decay, 0 when none moved) as
    tensors on the buffers' device. Finding the candidates syncs the host once.
    """
    check(threshold, positive_int, "consolidate_memories.threshold")
    if short_term.dim != long_term.dim:
        raise ValueError(
            f"consolidate_memories: {describe(short_term)} and {describe(long_term)} must "
            "have the same dim"
        )
    candidates = short_term.valid & (short_term.access_counts >= threshold)
    index = candidates.nonzero().squeeze(1)
    index = index[short_term.age[index].argsort(descending=True, stable=True)]
    importance = short_term.importance[index]
    long_term.store(short_term.keys[index], short_term.values[index], importance)
    short_term.importance[index] *= transfer_decay
    short_term.access_counts[index] = 0
    moved = candidates.sum()
    return {
        "moved": moved.to(importance.dtype),
        "mean_importance": importance.sum() / moved.clamp(min=1),
    }


class DualMemory(nn.Module):
    """Short-term and long-term memory buffers with scheduled consolidation between them.

    :meth:`store` writes to short-term memory, :meth:`retrieve` reads both (ready for a
    :class:`~steadytrain.nn.MemoryGate`), and :meth:`consolidate` moves entries accessed at
    least ``threshold`` times into long-term memory (see :func:`consolidate_memories`).
    The ``scheduled_consolidation`` plugin calls :meth:`consolidate` on a fixed schedule.
    """

    def __init__(
        self,
        dim: int,
        stm_capacity: int,
        ltm_capacity: int,
        *,
        threshold: int = 3,
        decay: float = 0.95,
        transfer_decay: float = 0.5,
    ) -> None:
        super().__init__()
        owner = type(self).__name__
        self.threshold = check(threshold, positive_int, f"{owner}.threshold")
        self.transfer_decay = check(
            transfer_decay, FRACTION, f"{owner}.transfer_decay"
        )
        self.stm = MemoryBuffer(stm_capacity, dim, decay=decay)
        self.ltm = MemoryBuffer(ltm_capacity, dim, decay=decay)

    def store(
        self, key: torch.Tensor, value: torch.Tensor, importance: float | torch.Tensor = 1.0
    ) -> None:
        """Write to short-term memory (see :meth:`MemoryBuffer.store`)."""
        self.stm.store(key, value, importance)

    def retrieve(self, query: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(stm_value, ltm_value)`` for *query*."""
        return self.stm.retrieve(query)[0], self.ltm.retrieve(query)[0]

    def consolidate(self) -> dict[str, torch.Tensor]:
        """Move well-used short-term entries to long-term memory; say what moved."""
        return consolidate_memories(
            self.stm, self.ltm, self.threshold, transfer_decay=self.transfer_decay
        )

    def extra_repr(self) -> str:
        return f"threshold={self.threshold}, transfer_decay={self.transfer_decay}"
