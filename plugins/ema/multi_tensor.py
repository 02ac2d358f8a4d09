"""The EMA update of many tensors in one kernel launch, its weight and skip flag read on
the device.

torch's multi-tensor kernels cover the update whose weight the host knows
(``torch._foreach_lerp_``), but none moves tensors towards others by a weight that lives
on the device, skipping itself on a device flag, at the speed of a copy; and each of
their launches costs host work for every tensor it covers. :class:`MultiTensorLerp`
keeps a table of the addresses of a list of shadow tensors and of the tensors they
average, built once, and updates all of them with one Triton kernel launch whose host
cost does not grow with the number of tensors. It needs CUDA tensors and Triton (which
comes with torch's CUDA builds); :func:`available` says whether it can run.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Sequence

import attrs
import torch

import steadytrain

#: Elements each program of the kernel updates: a chunk of one tensor.
BLOCK = 1024
_WARPS = 4
# The weight reaches the kernel as a float32: float64 pairs keep torch's update.
_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@functools.cache
def _kernel():
    """The Triton kernel, defined on first use (Triton is imported only then)."""
    import triton
    import triton.language as tl

    @triton.jit
    def lerp_chunks(shadow_addresses, current_addresses, numels, chunk_tensors,
                    chunk_starts, weight, weight_address, slot, skip_address, counts,
                    least_weight, DTYPE: tl.constexpr, BLOCK: tl.constexpr,
                    DEVICE_WEIGHT: tl.constexpr, SKIP: tl.constexpr,
                    ALIGNED: tl.constexpr, COUNT: tl.constexpr):
        chunk = tl.program_id(0)
        go = True
        if SKIP:
            go = tl.load(skip_address) == 0  # the flag in its own dtype (bool, float, int)
        w = tl.load(weight_address + slot).to(tl.float32) if DEVICE_WEIGHT else weight
        if go:
            tensor = tl.load(chunk_tensors + chunk)
            start = tl.load(chunk_starts + chunk)
            numel = tl.load(numels + tensor)
            shadow = tl.load(shadow_addresses + tensor).to(tl.pointer_type(DTYPE))
            current = tl.load(current_addresses + tensor).to(tl.pointer_type(DTYPE))
            if ALIGNED:
                # Every address is 16-byte aligned (checked on the host): vector loads.
                shadow = tl.multiple_of(shadow, 16)
                current = tl.multiple_of(current, 16)
            offsets = start + tl.arange(0, BLOCK)
            # torch.lerp's formula: exact at both ends (weight 0 keeps, 1 copies).
            if start + BLOCK <= numel:
                # A whole chunk: no mask, so that the loads can be vectorized.
                a = tl.load(shadow + offsets).to(tl.float32)
                b = tl.load(current + offsets).to(tl.float32)
                d = b - a
                out = tl.where(w < 0.5, a + w * d, b - d * (1.0 - w))
                tl.store(shadow + offsets, out.to(DTYPE))
            else:
                mask = offsets < numel
                a = tl.load(shadow + offsets, mask=mask).to(tl.float32)
                b = tl.load(current + offsets, mask=mask).to(tl.float32)
                d = b - a
                out = tl.where(w < 0.5, a + w * d, b - d * (1.0 - w))
                tl.store(shadow + offsets, out.to(DTYPE), mask=mask)
        # The count and the next update's weight, written by one program into the other
        # slot: every program of this launch reads this slot's weight. (Nested: a
        # compile-time test first, so that launches without a count compile none of it.)
        if COUNT > 0:  # noqa: SIM102
            if chunk == 0:
                following = w
                if go:
                    tl.store(counts, tl.load(counts) + 1.0)
                    following = least_weight
                    if COUNT == 2:  # warmup: max(1 − decay, 9 / (10 + count))
                        shifted = tl.load(counts + 1) + 1.0
                        tl.store(counts + 1, shifted)
                        following = tl.maximum((9.0 / shifted).to(tl.float32), least_weight)
                tl.store(weight_address + 1 - slot, following)

    return lerp_chunks


def available(tensor: torch.Tensor) -> bool:
    """Whether :class:`MultiTensorLerp` can update tensors like *tensor*: a floating
    tensor on a device where Triton kernels run (``steadytrain.kernels.triton_runs_on``)."""
    return tensor.dtype in _DTYPES and steadytrain.kernels.triton_runs_on(tensor.device)


class MultiTensorLerp:
    """``a ← a + w·(c − a)`` for every pair of *shadow* (``a``) and *current* (``c``)
    tensors, in one kernel launch.

    The pairs must be contiguous CUDA tensors of one dtype and device, equal in shape
    within a pair. The addresses of both lists are taken here: :meth:`current_moved`
    says whether the tensors of *current* still have them (a ``model.to()`` or a
    ``param.data =`` gives them new ones), and a table built before that must not be
    used after it.
    """

    def __init__(self, shadow: Sequence[torch.Tensor], current: Sequence[torch.Tensor]) -> None:
        import triton.language as tl

        first = shadow[0]
        self._current = list(current)
        self._addresses = [t.data_ptr() for t in self._current]
        device = first.device
        numels = torch.tensor([t.numel() for t in shadow], dtype=torch.int64)
        chunks = (numels + BLOCK - 1) // BLOCK
        # Chunk k of all: tensor i's chunk j, starting at element j·BLOCK of tensor i.
        chunk_tensors = torch.repeat_interleave(torch.arange(len(shadow)), chunks)
        first_chunk = torch.cumsum(chunks, 0) - chunks
        chunk_starts = (torch.arange(int(chunks.sum())) - first_chunk[chunk_tensors]) * BLOCK

        def table(values: torch.Tensor) -> torch.Tensor:
            # From pinned memory, asynchronously: a copy from pageable memory would wait
            # for the device (torch keeps the pinned block until the copy is done).
            if device.type != "cuda":
                return values.to(device)
            return values.pin_memory().to(device, non_blocking=True)

        self._shadow_addresses = table(torch.tensor([t.data_ptr() for t in shadow]))
        self._current_addresses = table(torch.tensor(self._addresses))
        self._numels = table(numels)
        self._chunk_tensors = table(chunk_tensors.int())
        self._chunk_starts = table(chunk_starts)
        self._grid = (len(chunk_starts),)
        self._dtype = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16,
                       torch.float16: tl.float16}[first.dtype]
        self._aligned = all(t.data_ptr() % 16 == 0 for t in (*shadow, *current))
        self._device = device
        # Kept alive with the table: the kernel reads these addresses.
        self._shadow = list(shadow)

    def current_moved(self) -> bool:
        """Whether a tensor of *current* no longer has the address in the table."""
        # About 0.1 µs a tensor of host time, every update: the bulk of an update of
        # many small tensors (docs/benchmarks.md), and what keeps a stale table unread.
        return list(map(torch.Tensor.data_ptr, self._current)) != self._addresses

    def __call__(
        self, weight: float | torch.Tensor, skip: torch.Tensor | None = None, *,
        slot: int = 0, count: Count | None = None,
    ) -> None:
        """Update every pair by *weight*, unless *skip* (a 0-d tensor on the pairs' device)
        is nonzero.

        *weight* is a float, or two float32 slots on the device of which the update takes
        ``weight[slot]``. With *count* the same launch also counts the update and writes
        the next update's weight into the other slot (see :class:`Count`).
        """
        on_device = isinstance(weight, torch.Tensor)
        cuda = self._device.type == "cuda"  # else Triton's interpreter (TRITON_INTERPRET=1)
        with torch.cuda.device(self._device) if cuda else contextlib.nullcontext():
            _kernel()[self._grid](
                self._shadow_addresses, self._current_addresses, self._numels,
                self._chunk_tensors, self._chunk_starts,
                0.0 if on_device else float(weight),
                weight if on_device else self._numels,
                slot,
                self._numels if skip is None else skip,
                self._numels if count is None else count.counts,
                0.0 if count is None else count.least_weight,
                DTYPE=self._dtype, BLOCK=BLOCK,
                DEVICE_WEIGHT=on_device, SKIP=skip is not None, ALIGNED=self._aligned,
                COUNT=0 if count is None else 1 + count.warmup,
                num_warps=_WARPS,
            )


@attrs.define
class Count:
    """What an update counts on the device, in its own launch.

    ``counts`` (float64) holds the update count and, with ``warmup``, 10 + the count; an
    update that is not skipped adds 1 to both and sets the next weight to
    ``least_weight`` (``1 − decay``), with ``warmup`` to ``max(least_weight, 9 / (10 +
    count))``; a skipped one carries its weight over. The next weight goes into the
    weight slot this update does not read.
    """

    counts: torch.Tensor
    least_weight: float
    warmup: bool
