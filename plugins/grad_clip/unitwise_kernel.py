"""Adaptive gradient clipping of one matrix in one pass: a Triton kernel per matrix.

Each row of the weight ``W`` and of its gradient ``G`` is one program: it takes both
rows' norms, the factor ``min(1, clipping · max(‖W_row‖, eps) / max(‖G_row‖, 1e-6))``,
and scales the gradient's row in place, reading ``W`` and ``G`` once and writing ``G``
once (a row of up to ``MAX_BLOCK`` elements stays in registers between the two). torch
needs a norm kernel for each of ``W`` and ``G`` and a broadcasting multiplication that
does not use vector loads. :func:`available` says whether a pair can take this path.
"""

from __future__ import annotations

import contextlib
import functools

import torch

#: The longest row a program keeps in registers; longer ones are read twice.
MAX_BLOCK = 8192
_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@functools.cache
def _triton() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def available(weight: torch.Tensor, grad: torch.Tensor) -> bool:
    """Whether *weight* and *grad* can be clipped here (viewed as a matrix of one unit a
    row): contiguous CUDA tensors of one shape and floating dtype, with Triton
    importable."""
    return (weight.device.type == "cuda" and weight.dtype in _DTYPES
            and grad.dtype == weight.dtype and grad.shape == weight.shape
            and weight.is_contiguous() and grad.is_contiguous() and _triton())


@functools.cache
def _kernel():
    """The Triton kernel, defined on first use (Triton is imported only then)."""
    import triton
    import triton.language as tl

    @triton.jit
    def clip_rows(weight, grad, grad_norms, factors, length, clipping, eps,
                  BLOCK: tl.constexpr, ONE_BLOCK: tl.constexpr):
        row = tl.program_id(0)
        start = row.to(tl.int64) * length
        lanes = tl.arange(0, BLOCK)
        if ONE_BLOCK:
            mask = lanes < length
            w = tl.load(weight + start + lanes, mask=mask, other=0.0).to(tl.float32)
            g = tl.load(grad + start + lanes, mask=mask, other=0.0)
            g32 = g.to(tl.float32)
            weight_norm = tl.sqrt(tl.sum(w * w))
            grad_norm = tl.sqrt(tl.sum(g32 * g32))
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
        tl.store(grad_norms + row, grad_norm)
        tl.store(factors + row, factor)
        if ONE_BLOCK:
            tl.store(grad + start + lanes, (g32 * factor).to(g.dtype), mask=lanes < length)
        else:
            for offset in range(0, length, BLOCK):
                mask = offset + lanes < length
                g = tl.load(grad + start + offset + lanes, mask=mask)
                tl.store(grad + start + offset + lanes,
                         (g.to(tl.float32) * factor).to(g.dtype), mask=mask)

    return clip_rows


def clip_rows_(
    weight: torch.Tensor, grad: torch.Tensor, clipping: float, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """AGC of *grad* row by row (rows along dimension 0), in place; returns the rows'
    gradient norms before clipping and the factors they were scaled by (float32, one a
    row). The pair must pass :func:`available`."""
    rows = weight.shape[0]
    length = weight.numel() // max(rows, 1)
    grad_norms = torch.empty(rows, dtype=torch.float32, device=weight.device)
    factors = torch.empty_like(grad_norms)
    if rows and length:
        import triton

        block = min(triton.next_power_of_2(length), MAX_BLOCK)
        cuda = weight.device.type == "cuda"  # else Triton's interpreter (TRITON_INTERPRET=1)
        with torch.cuda.device(weight.device) if cuda else contextlib.nullcontext():
            _kernel()[(rows,)](weight, grad, grad_norms, factors, length, float(clipping),
                               float(eps), BLOCK=block, ONE_BLOCK=length <= block,
                               num_warps=max(1, min(16, block // 256)))
    return grad_norms, factors
