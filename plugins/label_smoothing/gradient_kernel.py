"""The label-smoothing term's gradient written out in one pass: a Triton kernel.

Where the term is the only consumer of its logits (a float32 copy of a model's bf16
logits, as Accelerate hands a Hugging Face model's outputs over), the autograd engine has
no other gradient to add the term's broadcast to, and the gradient must be written out
whole: ``−ε·g/(n·C)`` for every class of a kept target's row, plus ``ε·g/n`` at the
target. torch writes a broadcast out with its generic strided copy, well below the
bandwidth of a plain write; this kernel writes the final gradient, the target's share
included, at about the speed of a copy. :func:`available` says whether it can.
"""

from __future__ import annotations

import contextlib
import functools

import torch

import steadytrain

BLOCK = 2048
_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def available(logits: torch.Tensor, class_dim: int) -> bool:
    """Whether :func:`smoothing_gradient` can write the gradient of *logits*: logits of a
    floating dtype with the classes last, on a device where Triton kernels run
    (``steadytrain.kernels.triton_runs_on``)."""
    return (logits.dtype in _DTYPES and logits.ndim >= 1
            and class_dim % logits.ndim == logits.ndim - 1
            and steadytrain.kernels.triton_runs_on(logits.device))


@functools.cache
def _kernel():
    """The Triton kernel, defined on first use (Triton is imported only then)."""
    import triton
    import triton.language as tl

    @triton.jit
    def write_gradient(out, shares, targets, classes, BLOCK: tl.constexpr):
        row = tl.program_id(0)
        columns = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        share = tl.load(shares + row)
        target = tl.load(targets + row)
        value = tl.where(columns == target, share - share / classes, -share / classes)
        tl.store(out + row.to(tl.int64) * classes + columns, value.to(out.dtype.element_ty),
                 mask=columns < classes)

    return write_gradient


def smoothing_gradient(
    shape: torch.Size, dtype: torch.dtype, shares: torch.Tensor, targets: torch.Tensor
) -> torch.Tensor:
    """The gradient of logits of *shape* (classes last): ``shares[r]·(onehot(targets[r])
    − 1/C)`` in row *r*, in *dtype*. *shares* (float32) and *targets* (integer class
    indices, any in range where the share is 0) hold one value a row."""
    classes = shape[-1]
    rows = shares.numel()
    out = torch.empty(shape, dtype=dtype, device=shares.device)
    if rows and classes:
        cuda = shares.device.type == "cuda"  # else Triton's interpreter (TRITON_INTERPRET=1)
        with torch.cuda.device(shares.device) if cuda else contextlib.nullcontext():
            _kernel()[(rows, -(-classes // BLOCK))](
                out, shares.reshape(-1).float().contiguous(), targets.reshape(-1).contiguous(),
                classes, BLOCK=BLOCK, num_warps=8)
    return out
