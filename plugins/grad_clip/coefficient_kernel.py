"""The coefficients of every group, and the adaptive mode's thresholds and running mean,
in one Triton launch.

Once the groups' norms are known, the ``norm`` and ``adaptive`` modes do arithmetic on a
handful of numbers: the threshold, the coefficient ``min(1, threshold / (norm + 1e-6))``,
the norm after clipping and, in adaptive mode, the bias-corrected running mean and its
update. With torch's kernels that is one tiny kernel per operation, 4 in ``norm`` mode and
10 in ``adaptive`` mode, whose launches cost more GPU time than the arithmetic.
:func:`clip_factors` does it all in one program, with the formulas of
:func:`~steadytrain.plugins.grad_clip.clip_coefficients` and
:func:`~steadytrain.plugins.grad_clip.adaptive_thresholds`.
"""

from __future__ import annotations

import contextlib
import functools

import torch

import steadytrain


@functools.cache
def _kernel():
    """The Triton kernel, defined on first use (Triton is imported only then)."""
    import triton
    import triton.language as tl

    @triton.jit
    def factors(norms, max_norms, mean, out, groups, scale, weight,
                ADAPTIVE: tl.constexpr, WARM: tl.constexpr, BLOCK: tl.constexpr):
        group = tl.arange(0, BLOCK)
        mask = group < groups
        norm = tl.load(norms + group, mask=mask, other=0.0)
        limit = tl.load(max_norms + group, mask=mask, other=1.0)
        if ADAPTIVE:
            average = tl.load(mean + group, mask=mask, other=0.0)
            if WARM:
                limit = tl.minimum(limit, average * scale)  # both finite
        ratio = limit / (norm + 1e-6)
        # Comparisons written so that a NaN norm gives NaN, as torch's clamp and minimum do.
        coefficient = tl.where(ratio > 1.0, 1.0, ratio)
        tl.store(out + group, limit, mask=mask)
        tl.store(out + groups + group, coefficient, mask=mask)
        tl.store(out + 2 * groups + group, norm * coefficient, mask=mask)
        if ADAPTIVE:
            clipped = tl.where(norm > limit, limit, norm)
            finite = (clipped == clipped) & (tl.abs(clipped) < float("inf"))
            updated = average + weight * (clipped - average)
            tl.store(out + 3 * groups + group, tl.where(finite, updated, average), mask=mask)

    return factors


def available(norms: torch.Tensor) -> bool:
    """Whether :func:`clip_factors` can take *norms*: float32 on a device where Triton
    kernels run (``steadytrain.kernels.triton_runs_on``)."""
    return norms.dtype == torch.float32 and steadytrain.kernels.triton_runs_on(norms.device)


def clip_factors(
    norms: torch.Tensor, max_norms: torch.Tensor, mean: torch.Tensor | None = None, *,
    scale: float | None = None, weight: float = 0.0,
) -> torch.Tensor:
    """A ``(3, groups)`` tensor, or ``(4, groups)`` with *mean*: each group's threshold,
    coefficient and norm after clipping, then the running mean after this step.

    *norms*, *max_norms* and *mean* are float32 tensors of shape ``(groups,)`` on one
    device. Without *mean* the threshold is *max_norms*. With it the threshold is
    ``min(max_norms, scale · mean)`` once *scale* (the factor over the bias correction) is
    given, and the mean moves towards the clipped norm by *weight* (``1 − beta``) where
    that norm is finite.
    """
    groups = norms.numel()
    out = torch.empty((3 if mean is None else 4, groups), device=norms.device)
    cuda = norms.device.type == "cuda"  # else Triton's interpreter (TRITON_INTERPRET=1)
    with torch.cuda.device(norms.device) if cuda else contextlib.nullcontext():
        _kernel()[(1,)](
            norms, max_norms, norms if mean is None else mean, out, groups,
            0.0 if scale is None else scale, weight,
            ADAPTIVE=mean is not None, WARM=scale is not None,
            BLOCK=max(16, 1 << (groups - 1).bit_length()),
        )
    return out
