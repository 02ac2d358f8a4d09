"""Adaptive gradient clipping in one pass: Triton kernels.

Each output unit (a row of a weight ``W`` and of its gradient ``G``, or the whole of a
vector) is one program: it takes both norms, the factor
``min(1, clipping · max(‖W_unit‖, eps) / max(‖G_unit‖, 1e-6))``, and scales the
gradient's unit in place, reading ``W`` and ``G`` once and writing ``G`` once (a unit of
up to ``MAX_BLOCK`` elements stays in registers between the two). torch needs a norm
kernel for each of ``W`` and ``G`` and a broadcasting multiplication that does not use
vector loads, per tensor. :class:`UnitwiseClipper` clips a fixed list of parameters in
one launch per dtype and size class of their units, from a table of the units built
once and the addresses of the weights and gradients sent with each call.
:func:`available` says whether a parameter and its gradient can take this path.
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Sequence

import torch

import steadytrain

#: The longest row a program keeps in registers; longer ones are read twice.
MAX_BLOCK = 8192
_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def available(weight: torch.Tensor, grad: torch.Tensor) -> bool:
    """Whether *weight* and *grad* can be clipped here (viewed as a matrix of one unit a
    row): contiguous tensors of one shape and floating dtype on a device where Triton
    kernels run (``steadytrain.kernels.triton_runs_on``)."""
    return (weight.dtype in _DTYPES and grad.dtype == weight.dtype
            and grad.shape == weight.shape and weight.is_contiguous() and grad.is_contiguous()
            and steadytrain.kernels.triton_runs_on(weight.device))


@functools.cache
def _table_kernel():
    """The Triton kernel of :class:`UnitwiseClipper`, defined on first use."""
    import triton
    import triton.language as tl

    @triton.jit
    def clip_units(addresses, count, lengths, unit_tensors, unit_starts, grad_norms,
                   factors, clipping, eps, DTYPE: tl.constexpr, BLOCK: tl.constexpr,
                   ONE_BLOCK: tl.constexpr, VECTOR: tl.constexpr):
        unit = tl.program_id(0)
        tensor = tl.load(unit_tensors + unit)
        grad_address = tl.load(addresses + count + tensor)
        if grad_address == 0:  # no gradient this step
            tl.store(grad_norms + unit, 0.0)
            tl.store(factors + unit, 1.0)
        else:
            weight = tl.load(addresses + tensor).to(tl.pointer_type(DTYPE))
            grad = grad_address.to(tl.pointer_type(DTYPE))
            start = tl.load(unit_starts + unit)
            length = tl.load(lengths + tensor)
            if VECTOR > 1:
                # Addresses 16-byte aligned and lengths multiples of VECTOR (checked on the
                # host): the masked loads can be vector loads.
                weight = tl.multiple_of(weight, 16)
                grad = tl.multiple_of(grad, 16)
                start = tl.multiple_of(start, VECTOR)
                length = tl.multiple_of(length, VECTOR)
            lanes = tl.arange(0, BLOCK)
            if ONE_BLOCK:
                mask = lanes < length
                w = tl.load(weight + start + lanes, mask=mask, other=0.0).to(tl.float32)
                g = tl.load(grad + start + lanes, mask=mask, other=0.0).to(tl.float32)
                weight_norm = tl.sqrt(tl.sum(w * w))
                grad_norm = tl.sqrt(tl.sum(g * g))
            else:
                w_squares = tl.zeros([BLOCK], tl.float32)
                g_squares = tl.zeros([BLOCK], tl.float32)
                for offset in range(0, length, BLOCK):
                    mask = offset + lanes < length
                    w = tl.load(weight + start + offset + lanes, mask=mask, other=0.0)
                    g = tl.load(grad + start + offset + lanes, mask=mask, other=0.0)
                    w_squares += w.to(tl.float32) * w.to(tl.float32)
                    g_squares += g.to(tl.float32) * g.to(tl.float32)
                weight_norm = tl.sqrt(tl.sum(w_squares))
                grad_norm = tl.sqrt(tl.sum(g_squares))
            factor = tl.minimum(clipping * tl.maximum(weight_norm, eps)
                                / tl.maximum(grad_norm, 1e-6), 1.0)
            tl.store(grad_norms + unit, grad_norm)
            tl.store(factors + unit, factor)
            if ONE_BLOCK:
                tl.store(grad + start + lanes, (g * factor).to(DTYPE), mask=lanes < length)
            else:
                for offset in range(0, length, BLOCK):
                    mask = offset + lanes < length
                    g = tl.load(grad + start + offset + lanes, mask=mask)
                    tl.store(grad + start + offset + lanes,
                             (g.to(tl.float32) * factor).to(DTYPE), mask=mask)

    return clip_units


def _unit_length(shape: torch.Size) -> int:
    """Elements of one output unit of a tensor of *shape*: a row along dimension 0, or
    the whole tensor when it has at most one dimension."""
    return math.prod(shape[1:]) if len(shape) > 1 else math.prod(shape)


def _to_device(values: torch.Tensor, device: torch.device) -> torch.Tensor:
    """*values* on *device*, from pinned memory and without waiting for the device (a
    copy from pageable memory would); torch keeps the pinned block until the copy is done."""
    if device.type != "cuda":
        return values.to(device)
    return values.pin_memory().to(device, non_blocking=True)


class _Table:
    """The units of parameters of one dtype, and their launch's constants."""

    def __init__(self, params: Sequence[torch.Tensor]) -> None:
        import triton
        import triton.language as tl

        self.params = list(params)
        self.shapes = [p.shape for p in self.params]
        device = self.params[0].device
        lengths = torch.tensor([_unit_length(p.shape) for p in self.params], dtype=torch.int64)
        units = torch.tensor([p.numel() // n if n else 0
                              for p, n in zip(self.params, lengths.tolist(), strict=True)])
        unit_tensors = torch.repeat_interleave(torch.arange(len(self.params)), units)
        first = torch.cumsum(units, 0) - units
        unit_starts = (torch.arange(int(units.sum())) - first[unit_tensors]) * lengths[
            unit_tensors]
        self.units = len(unit_starts)
        self.lengths = _to_device(lengths, device)
        self.unit_tensors = _to_device(unit_tensors.int(), device)
        self.unit_starts = _to_device(unit_starts, device)
        dtype = self.params[0].dtype
        self.dtype = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16,
                      torch.float16: tl.float16}[dtype]
        longest = int(lengths.max()) if len(lengths) else 1
        self.block = min(triton.next_power_of_2(max(longest, 1)), MAX_BLOCK)
        self.one_block = longest <= self.block
        vector = 16 // dtype.itemsize
        self.vector = vector if all(n % vector == 0 for n in lengths.tolist()) else 1
        self.device = device


class UnitwiseClipper:
    """AGC of a fixed list of parameters (those :func:`available` takes, on one device) in
    one kernel launch per dtype and size class of their units (powers of two up to
    ``MAX_BLOCK``).

    The units of every parameter are tabled once; each call sends the addresses of the
    weights and of their gradients (a parameter without a gradient is left out of that
    call), so gradients may be new tensors at every step.
    """

    def __init__(self, params: Sequence[torch.Tensor]) -> None:
        # One launch per dtype and size class of the units: a program's block fits its
        # units, so that short rows do not leave most of its threads idle.
        by_kind: dict[tuple[torch.dtype, int], list[torch.Tensor]] = {}
        for p in params:
            length = _unit_length(p.shape)
            size = min(1 << max(length - 1, 0).bit_length(), MAX_BLOCK)
            by_kind.setdefault((p.dtype, size), []).append(p)
        self._tables = [_Table(group) for group in by_kind.values()]

    def __call__(
        self, clipping: float, eps: float
    ) -> tuple[list[torch.Tensor], list[torch.Tensor]] | None:
        """Clip every gradient; the units' gradient norms before clipping and the factors
        they were scaled by (float32, one a unit, parameters without a gradient giving 0
        and 1), or None, having changed nothing, when a tensor no longer fits the table
        (not contiguous, or a parameter of another shape)."""
        # Every table's addresses first, in one pass over the parameters: a tensor that
        # does not fit must stop the call before any launch changed a gradient. torch
        # keeps a gradient's shape, dtype and device those of its parameter; a parameter
        # given storage of another shape since (param.data = ...) is not tabled.
        listings = []
        for table in self._tables:
            weights, grads = [], []
            for p, shape in zip(table.params, table.shapes, strict=True):
                grad = p.grad
                if p.shape != shape or not p.is_contiguous() or (
                        grad is not None and not grad.is_contiguous()):
                    return None
                weights.append(p.data_ptr())
                grads.append(0 if grad is None else grad.data_ptr())
            listings.append(weights + grads)
        norms, factors = [], []
        for table, listed in zip(self._tables, listings, strict=True):
            params = table.params
            aligned = all(address % 16 == 0 for address in listed)
            addresses = torch.tensor(listed, dtype=torch.int64)
            grad_norms = torch.empty(table.units, dtype=torch.float32, device=table.device)
            scaled_by = torch.empty_like(grad_norms)
            if table.units:
                with torch.cuda.device(table.device) if table.device.type == "cuda" else (
                        contextlib.nullcontext()):
                    _table_kernel()[(table.units,)](
                        _to_device(addresses, table.device), len(params), table.lengths,
                        table.unit_tensors, table.unit_starts, grad_norms, scaled_by,
                        float(clipping), float(eps), DTYPE=table.dtype, BLOCK=table.block,
                        ONE_BLOCK=table.one_block, VECTOR=table.vector if aligned else 1,
                        num_warps=max(1, min(16, table.block // 256)))
            norms.append(grad_norms)
            factors.append(scaled_by)
        return norms, factors
