"""Gradient clipping per group: each group of parameters with its own norm threshold.

What it does
    Splits the selected parameters into groups by include/exclude patterns (the
    parameters no group claims form the group ``default``) and, after the backward of each
    optimizer step, scales the gradients of every group whose total norm exceeds its
    ``max_norm`` down to that norm, as ``torch.nn.utils.clip_grad_norm_`` would do for the
    group alone. Each group's norm is its total norm as torch's ``get_total_norm`` takes
    it, combined from the per-tensor norms the step's plugins share
    (``ctx.gradient_norm``: one fused pass over the gradients serves the guard, the
    clipping and the metrics alike), and its gradients are scaled by the coefficient of
    ``clip_grad_norm_``, ``min(1, max_norm / (norm + 1e-6))``, in one fused
    ``_foreach_mul_`` per group, the norm and the coefficient kept as device tensors: the
    host never waits for the device. On CUDA, where Triton kernels run
    (``steadytrain.kernels.triton_runs_on``), every group's threshold, coefficient and
    norm after clipping, and in adaptive mode the running mean, come from one launch
    (elsewhere 4 tiny kernels of torch, 10 in adaptive mode). Three modes:

    ``norm``
        The threshold is ``max_norm``.
    ``adaptive``
        The threshold tightens after a jump: it is ``min(max_norm, factor · m)``, where
        ``m`` is a bias-corrected running mean (``beta``) of the group's norm after
        clipping. A norm up to ``factor`` times its recent mean passes; a spike above it
        is cut back to ``factor · m``. Feeding the clipped norm into the mean keeps a
        spike from raising the threshold for the steps after it, while a slow rise of the
        norm still moves the mean (by at most a factor ``1 + (1 − beta)(factor − 1)`` per
        step). Until ``warmup`` steps have been seen only ``max_norm`` applies; non-finite
        norms never enter the mean.
    ``agc``
        Unit-wise adaptive clipping: every output unit (row of a weight, or the whole of a
        vector) keeps ``‖G‖ ≤ clipping · max(‖W‖, eps)``.

    Each group records ``<group>/pre_norm`` and ``<group>/post_norm`` (and, in adaptive
    mode, ``<group>/threshold``) as metrics.

When to use it
    When a part of the model needs a tighter cap than the rest: memory modules whose
    gradients spike, embeddings, gates. ``adaptive`` when occasional gradient spikes
    precede loss spikes but no fixed threshold fits the whole run; ``agc`` for
    normalizer-free networks and large batches.

Hyperparameters
    Default group: ``max_norm`` 1.0, ``norm_type`` 2.0. The memory-model document
    (seed 000) clips memory parameters at 0.5 and the rest at 1.0:

    ```toml
    [[plugins]]
    plugin = "grad_clip"
    max_norm = 1.0
    groups = [{name = "memory", include = ["*memory*"], max_norm = 0.5}]
    ```

    ``adaptive``: ``factor`` 2.0, ``beta`` 0.99, ``warmup`` 10 steps. ``agc``: ``clipping``
    0.01 (Brock et al.'s value for large batches; up to about 0.16 for small ones) and
    ``eps`` 1e-3.

Source
    Pascanu et al. (2013), "On the difficulty of training recurrent neural networks";
    Brock et al. (2021), "High-performance large-scale image recognition without
    normalization" (AGC); the per-group thresholds from the memory-model document.

Caveats
    Every parameter belongs to exactly one group: patterns of two groups that match the
    same parameter are a config error. Gradients of one instance must be on one device.
    Non-finite gradients make the coefficient NaN, as with ``clip_grad_norm_``: put a
    non-finite guard before the optimizer step. ``agc`` needs the unit norms of weights
    and gradients, which no fused kernel of torch computes over many tensors. On CUDA,
    where Triton kernels run (``steadytrain.kernels.triton_runs_on``), one Triton launch
    per group, dtype and size class of the units clips every unit of the group: each
    takes both norms and scales the gradient in the same pass, reading weight and
    gradient once, from a table of the units built at ``setup`` and the addresses of the
    weights and gradients sent with each step (a gradient that is not contiguous, or a
    weight given storage of another shape, sends that step down torch's path). Elsewhere
    torch's kernels do it: tensors of up to 2²⁰ elements are stacked (two norms, one
    scaling and a copy back per stack), larger ones take two norm kernels and a scaling
    each. With ``norm_type`` 2 its pre- and post-clip group norms come from the unit
    norms, without a pass over the gradients; other norm types take a fused pass before
    and after. See the benchmarks for what each path costs. Under gradient scaling
    (AMP), unscale before ``after_backward``. Sharded parameters (FSDP2's DTensors): a
    group's norm covers every rank's shard, so all ranks clip by the norm of the whole
    gradient, as one process would (one all-reduce per group); ``agc`` needs the rows of
    each weight whole on a rank (sharded along dimension 0, FSDP2's default) and refuses
    other layouts at ``setup``.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import attrs
import torch

import steadytrain
from steadytrain import validators

from . import coefficient_kernel, unitwise_kernel

MODES = ("norm", "adaptive", "agc")
DEFAULT_GROUP = "default"


def _dtensor_class() -> type | None:
    """``DTensor`` once something imported it: no tensor can be one before (and importing
    ``torch.distributed.tensor`` here would cost seconds)."""
    return getattr(sys.modules.get("torch.distributed.tensor"), "DTensor", None)


def _local(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a DTensor (sharing its storage), or the tensor itself."""
    dtensor = _dtensor_class()
    return tensor.to_local() if dtensor is not None and isinstance(tensor, dtensor) else tensor


def _splits_rows(tensor: torch.Tensor) -> bool:
    """Whether a DTensor has rows (slices along dimension 0) split across ranks."""
    placements = getattr(tensor, "placements", ())
    return tensor.ndim > 1 and any(
        not (p.is_replicate() or (p.is_shard() and p.dim == 0)) for p in placements)


def total_norm(grads: Sequence[torch.Tensor], norm_type: float = 2.0) -> torch.Tensor:
    """torch's ``get_total_norm`` of *grads* (in float32), over every rank's shard of
    sharded gradients.

    The gradients of a model sharded with FSDP2 (``fully_shard``) are DTensors; their
    norms are reduced across the device mesh
    (:func:`steadytrain.grad_norms.tensor_norms`), so every rank gets the norm of the
    whole gradient as a plain tensor.
    """
    norms = steadytrain.grad_norms.tensor_norms(list(grads), norm_type)
    return steadytrain.grad_norms.total_norm(norms, norm_type)


def grad_group_norms(
    grad_groups: Sequence[Sequence[torch.Tensor]],
    norm_types: float | Sequence[float] = 2.0,
    *,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """The total norm of each group of gradients, as one tensor of shape ``(groups,)``.

    Each group's norm is :func:`torch.nn.utils.get_total_norm` of its gradients (one
    fused ``foreach`` norm), over all ranks for sharded gradients (:func:`total_norm`); an
    empty group has norm 0. *device* is where the result lives when no group has a
    gradient.
    """
    count = len(grad_groups)
    types = [float(norm_types)] * count if isinstance(norm_types, (int, float)) else [
        float(t) for t in norm_types
    ]
    first = next((g[0] for g in grad_groups if g), None)
    device = first.device if first is not None else torch.device(device or "cpu")
    zero = torch.zeros((), device=device)
    return torch.stack([
        total_norm(grads, norm_type).float() if grads else zero
        for grads, norm_type in zip(grad_groups, types, strict=True)
    ])


def clip_coefficients(norms: torch.Tensor, max_norms: torch.Tensor | float) -> torch.Tensor:
    """``min(1, max_norm / (norm + 1e-6))``, the factor ``clip_grad_norm_`` scales by."""
    return (max_norms / (norms + 1e-6)).clamp(max=1.0)


def adaptive_thresholds(
    norms: torch.Tensor, mean: torch.Tensor, max_norms: torch.Tensor, *, scale: float | None,
    beta: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The adaptive mode's thresholds for *norms*, and its running mean after this step.

    The threshold is ``min(max_norms, scale · mean)``, or *max_norms* while *scale* is None
    (the warmup); *scale* is the factor over the mean's bias correction,
    ``factor / (1 − beta^seen)``. The mean moves towards the norm after clipping,
    ``mean + (1 − beta)·(min(norm, threshold) − mean)``, where that norm is finite, and
    stays where it is not.
    """
    limits = max_norms if scale is None else torch.minimum(max_norms, mean * scale)
    step = torch.nan_to_num(torch.minimum(norms, limits) - mean, nan=0.0, posinf=0.0,
                            neginf=0.0)
    return limits, torch.add(mean, step, alpha=1.0 - beta)


def _grads(parameters: Iterable[torch.Tensor]) -> list[torch.Tensor]:
    return [p.grad for p in parameters if p.grad is not None]


def clip_grad_groups_(
    groups: Sequence[Iterable[torch.Tensor]],
    max_norms: Sequence[float],
    norm_types: float | Sequence[float] = 2.0,
) -> torch.Tensor:
    """Clip the gradients of each group of parameters to its own total norm.

    Equivalent to ``torch.nn.utils.clip_grad_norm_(group, max_norm, norm_type)`` for each
    group in turn, with fused kernels and no host sync. Returns the pre-clip norms.
    """
    groups = [list(g) for g in groups]
    norms = grad_group_norms([_grads(g) for g in groups], norm_types)
    # Python-number thresholds: a tensor of them would be a host-to-device copy per call.
    for index, (params, limit) in enumerate(zip(groups, max_norms, strict=True)):
        torch.nn.utils.clip_grads_with_norm_(params, limit, norms[index], foreach=True)
    return norms


def _vector_norms(vectors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """The 2-norm of each 0- or 1-dimensional tensor, one fused kernel; a sharded vector's
    norm covers every rank's shard (one reduction for all of them)."""
    if not vectors:
        return []
    norms = list(torch._foreach_norm(list(vectors)))
    dtensor = _dtensor_class()
    sharded = [i for i, n in enumerate(norms) if dtensor is not None and isinstance(n, dtensor)]
    if sharded:
        reduced = torch.stack([norms[i] for i in sharded]).full_tensor().unbind()
        for index, norm in zip(sharded, reduced, strict=True):
            norms[index] = norm
    return norms


def _unit_norms(tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """The 2-norm of every output unit: of each row along dimension 0 (shaped to broadcast
    against the tensor), or of a whole 0- or 1-dimensional tensor (0-d).

    For a DTensor sharded along dimension 0 (FSDP2's layout) the rows of this rank's shard
    are whole, so its unit norms are those of the local rows.
    """
    # Whole-tensor units (biases, gains) share one fused kernel; rows of a matrix need a
    # reduction over dimensions, which no foreach kernel does: one kernel per matrix.
    fused = iter(_vector_norms([t for t in tensors if t.ndim <= 1]))
    return [
        next(fused) if t.ndim <= 1
        else torch.linalg.vector_norm(_local(t), dim=tuple(range(1, t.ndim)), keepdim=True)
        for t in tensors
    ]


#: Tensors of at most this many elements are clipped in stacks with others of their shape
#: (at most ``_STACK_BYTES`` a stack): stacking costs passes over their bytes, but their
#: time goes into launches, three a tensor otherwise (two norms and the scaling).
_STACK_NUMEL = 2**20
_STACK_BYTES = 2**26


def _stacks(tensors: Sequence[torch.Tensor]) -> tuple[list[int], list[list[int]]]:
    """Positions of the tensors clipped alone, and of those clipped in stacks.

    DTensors are clipped alone: a rank's shards of one shape may differ from another's,
    and the norm of a sharded vector needs every rank's shard.
    """
    dtensor = _dtensor_class()
    alone: list[int] = []
    by_kind: dict[tuple[Any, ...], list[int]] = {}
    for index, t in enumerate(tensors):
        if t.numel() > _STACK_NUMEL or (dtensor is not None and isinstance(t, dtensor)):
            alone.append(index)
        else:
            by_kind.setdefault((tuple(t.shape), t.dtype, t.device), []).append(index)
    stacks = []
    for indices in by_kind.values():
        size = max(1, _STACK_BYTES // max(1, tensors[indices[0]].nbytes))
        stacks.extend(indices[i:i + size] for i in range(0, len(indices), size))
    alone.extend(i for stack in stacks if len(stack) == 1 for i in stack)
    return alone, [stack for stack in stacks if len(stack) > 1]


def _stacked_unit_norms(stacked: torch.Tensor) -> torch.Tensor:
    """The unit norms of each tensor in *stacked* (tensors along dimension 0), shaped to
    broadcast against it: of each row of a matrix, of a whole vector, of a scalar."""
    if stacked.ndim == 1:
        return stacked.abs()
    first = 1 if stacked.ndim == 2 else 2
    return torch.linalg.vector_norm(stacked, dim=tuple(range(first, stacked.ndim)),
                                    keepdim=True)


@torch.no_grad()
def _unitwise_clip_(
    params: Sequence[torch.Tensor], clipping: float, eps: float
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """AGC of *params* (all with gradients); returns the unit norms of the gradients
    before clipping and the factors they were scaled by (as lists of like tensors)."""
    if _one_pass(params):
        clipped = unitwise_kernel.UnitwiseClipper(params)(clipping, eps)
        if clipped is not None:
            return clipped
    grads = [p.grad for p in params]
    alone, stacks = _stacks(params)
    stacked_grads = [torch.stack([grads[i] for i in stack]) for stack in stacks]
    factors = [*_unit_norms([params[i] for i in alone]),
               *(_stacked_unit_norms(torch.stack([params[i] for i in stack]))
                 for stack in stacks)]
    grad_norms = [*_unit_norms([grads[i] for i in alone]),
                  *(_stacked_unit_norms(g) for g in stacked_grads)]
    torch._foreach_clamp_min_(factors, eps)
    torch._foreach_mul_(factors, clipping)
    torch._foreach_div_(factors, torch._foreach_clamp_min(grad_norms, 1e-6))
    torch._foreach_clamp_max_(factors, 1.0)
    # Shapes differ within each pair: one launch a tensor, issued from one call.
    for scaled, by in (([_local(grads[i]) for i in alone], factors[:len(alone)]),
                       (stacked_grads, factors[len(alone):])):
        if scaled:
            torch._foreach_mul_(scaled, by)
    for stack, scaled in zip(stacks, stacked_grads, strict=True):
        torch._foreach_copy_([grads[i] for i in stack], list(scaled.unbind(0)))
    return grad_norms, factors


def _one_pass(params: Sequence[torch.Tensor]) -> bool:
    """Whether *params* (with their gradients) can be clipped by one Triton launch per
    dtype: all of them on one CUDA device and none sharded."""
    dtensor = _dtensor_class()
    return bool(params) and all(
        unitwise_kernel.available(p, p.grad if p.grad is not None else p)
        and not (dtensor is not None and isinstance(p, dtensor))
        and p.device == params[0].device for p in params)


def _check_rows_whole(params: Sequence[torch.Tensor]) -> None:
    split = [p for p in params if _splits_rows(p)]
    if split:
        raise steadytrain.ConfigError(
            f"unitwise_clip_grad_: a parameter of shape {tuple(split[0].shape)} has its rows "
            f"split across ranks (placements {split[0].placements}); AGC needs whole rows on "
            "each rank: shard along dimension 0 (FSDP2's default)"
        )


def unitwise_clip_grad_(
    parameters: Iterable[torch.Tensor], clipping: float = 0.01, eps: float = 1e-3
) -> None:
    """Adaptive gradient clipping (AGC) of Brock et al. (2021), unit by unit.

    Each output unit's gradient ``G`` (a row of a weight along dimension 0, or the whole
    of a 0- or 1-dimensional tensor) is scaled to keep
    ``‖G‖ ≤ clipping · max(‖W‖, eps)``. Sharded parameters (DTensors) must keep their
    rows whole on each rank, as FSDP2 does.
    """
    params = [p for p in parameters if p.grad is not None]
    _check_rows_whole(params)
    if params:
        _unitwise_clip_(params, clipping, eps)


@attrs.frozen
class ClipGroup:
    """One group of parameters with its own threshold."""

    name: str
    include: tuple[str, ...]
    exclude: tuple[str, ...] = ()
    max_norm: float = attrs.field(default=1.0, validator=validators.positive)
    norm_type: float = attrs.field(default=2.0, validator=validators.norm_order)
    clipping: float = attrs.field(default=0.01, validator=validators.positive)


def _check_groups(_inst: Any, _attr: attrs.Attribute, groups: tuple[ClipGroup, ...]) -> None:
    seen: set[str] = set()
    for index, group in enumerate(groups):
        if group.name == DEFAULT_GROUP or group.name in seen:
            why = "is reserved for the rest" if group.name == DEFAULT_GROUP else "is used twice"
            raise steadytrain.OptionError(
                f"groups[{index}].name", f"{group.name!r} {why}; give each group its own name"
            )
        if not group.include:
            raise steadytrain.OptionError(
                f"groups[{index}].include", "must list at least one pattern"
            )
        seen.add(group.name)


class GradClip(steadytrain.Plugin):
    """Clip gradients per group of parameters, each group with its own norm threshold."""

    name = "grad_clip"
    rescales_gradients = True

    @attrs.frozen
    class Config:
        max_norm: float = attrs.field(default=1.0, validator=validators.positive)
        norm_type: float = attrs.field(default=2.0, validator=validators.norm_order)
        clipping: float = attrs.field(default=0.01, validator=validators.positive)
        groups: tuple[ClipGroup, ...] = attrs.field(
            default=(), converter=tuple, validator=_check_groups
        )
        mode: str = attrs.field(default="norm", validator=validators.one_of(*MODES))
        factor: float = attrs.field(
            default=2.0, validator=validators.in_range(1.0, math.inf, include_low=True)
        )
        beta: float = attrs.field(default=0.99, validator=validators.in_range(0.0, 1.0))
        warmup: int = attrs.field(default=10, validator=validators.non_negative_int)
        eps: float = attrs.field(default=1e-3, validator=validators.positive)

    @steadytrain.hookimpl
    def setup(self, run: steadytrain.Run) -> None:
        named = dict(run.named_parameters())
        selected = self.filter.select(list(named), kind="parameter")
        config = self.config
        owner: dict[str, str] = {}
        members: dict[str, list[str]] = {}
        for group in config.groups:
            group_filter = steadytrain.VariableFilter(
                include=group.include, exclude=group.exclude,
                owner=f"{self.id}.groups.{group.name}",
                on_unmatched=self.filter.on_unmatched,
            )
            for name in group_filter.select(selected, kind="parameter"):
                if name in owner:
                    raise steadytrain.ConfigError(
                        f"{self.id}.groups: parameter {name!r} is in both group "
                        f"{owner[name]!r} and group {group.name!r}; a parameter's gradient "
                        "belongs to one group: narrow the include patterns or add an exclude"
                    )
                owner[name] = group.name
            members[group.name] = [n for n in selected if owner.get(n) == group.name]
        members[DEFAULT_GROUP] = [n for n in selected if n not in owner]
        specs = [*config.groups, ClipGroup(
            DEFAULT_GROUP, ("*",), max_norm=config.max_norm, norm_type=config.norm_type,
            clipping=config.clipping,
        )]
        self.groups = [g for g in specs if members[g.name]]
        self.params = [[named[n] for n in members[g.name]] for g in self.groups]
        if config.mode == "agc" and (split := [n for n in selected if _splits_rows(named[n])]):
            raise steadytrain.ConfigError(
                f"{self.id}.mode: 'agc' clips each row of a weight by the row's norm, but the "
                f"rows of {split[0]!r} are split across ranks (placements "
                f"{named[split[0]].placements}), and per-row norms across shards are not "
                "supported; shard it along dimension 0 (FSDP2's default, without a "
                "shard_placement_fn), exclude it, or use mode = 'norm'"
            )
        device = next((p[0].device for p in self.params), torch.device("cpu"))
        self._device = device
        dtensor = _dtensor_class()
        self._sharded = dtensor is not None and any(
            isinstance(p, dtensor) for params in self.params for p in params)
        self._zero = torch.zeros((), device=device)
        self._max_norms = torch.tensor([g.max_norm for g in self.groups], device=device)
        self._norm_types = [g.norm_type for g in self.groups]
        self.mean = torch.zeros(len(self.groups), device=device)
        self.seen = 0
        # AGC by one Triton launch per dtype and group where it can: the units tabled now.
        self._clippers = [
            unitwise_kernel.UnitwiseClipper(params)
            if config.mode == "agc" and _one_pass(params) else None for params in self.params]

    @steadytrain.hookimpl
    def after_backward(self, ctx: steadytrain.StepContext) -> None:
        grads = [_grads(params) for params in self.params]
        if self.config.mode == "agc":
            norms, after = self._clip_unitwise(grads)
        else:
            # The norms every plugin of the step shares (a guard before this one took them).
            norms = torch.stack([ctx.gradient_norm(params, norm_type=norm_type)
                                 for params, norm_type in zip(self.params, self._norm_types,
                                                              strict=True)])
            limits, coefficients, after = self._factors(norms)
            # Each group scaled by its coefficient, a device tensor, in one fused call (as
            # clip_grads_with_norm_ does, without its per-call regrouping).
            for group_grads, coefficient in zip(grads, coefficients, strict=True):
                if group_grads:
                    torch._foreach_mul_([_local(g) for g in group_grads] if self._sharded
                                        else group_grads, coefficient)
        for index, group in enumerate(self.groups):
            ctx.log(f"{group.name}/pre_norm", norms[index])
            ctx.log(f"{group.name}/post_norm", after[index])
            if self.config.mode == "adaptive":
                ctx.log(f"{group.name}/threshold", limits[index])

    def _clip_unitwise(
        self, grads: list[list[torch.Tensor]]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """AGC of every group; the groups' norms before and after it."""
        derived = all(t == 2.0 for t in self._norm_types) and not self._sharded
        if not derived:
            norms = grad_group_norms(grads, self._norm_types, device=self._device)
        before, after = [], []
        for group, params, clipper, group_grads in zip(self.groups, self.params,
                                                       self._clippers, grads, strict=True):
            if not group_grads:
                before.append(self._zero)
                after.append(self._zero)
                continue
            clipped = None if clipper is None else clipper(group.clipping, self.config.eps)
            grad_norms, factors = clipped or _unitwise_clip_(
                [p for p in params if p.grad is not None], group.clipping, self.config.eps)
            if derived:
                # The group's 2-norm is the 2-norm of its unit norms: no pass over the
                # gradients, before or after the scaling.
                before.append(total_norm(grad_norms).float())
                after.append(total_norm(torch._foreach_mul(factors, grad_norms)).float())
        if not derived:
            return norms, grad_group_norms(grads, self._norm_types, device=self._device)
        return torch.stack(before), torch.stack(after)

    def _factors(self, norms: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Each group's threshold, coefficient and norm after clipping, for *norms*; in
        adaptive mode the running mean moves on."""
        config = self.config
        adaptive = config.mode == "adaptive"
        scale = None
        if adaptive:
            if self.seen >= max(config.warmup, 1):
                scale = config.factor / (1.0 - config.beta**self.seen)
            self.seen += 1
        if coefficient_kernel.available(norms):
            # One launch in place of 4 tiny kernels (norm) or 10 (adaptive).
            factors = coefficient_kernel.clip_factors(
                norms, self._max_norms, self.mean if adaptive else None, scale=scale,
                weight=1.0 - config.beta)
            if adaptive:
                self.mean = factors[3]
            return factors[0], factors[1], factors[2]
        limits = self._max_norms
        if adaptive:
            limits, self.mean = adaptive_thresholds(norms, self.mean, self._max_norms,
                                                    scale=scale, beta=config.beta)
        coefficients = clip_coefficients(norms, limits)
        return limits, coefficients, norms * coefficients

    def state_dict(self) -> dict[str, Any]:
        if self.config.mode != "adaptive":
            return {}
        return {"mean": self.mean, "seen": self.seen, "groups": [g.name for g in self.groups]}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if self.config.mode != "adaptive":
            super().load_state_dict(state)
            return
        names = [g.name for g in self.groups]
        if list(state.get("groups", ())) != names:
            raise steadytrain.CheckpointError(
                f"{self.id}: the checkpoint has groups {list(state.get('groups', ()))} but "
                f"this run has {names}; load it with the groups it was saved with"
            )
        self.mean = state["mean"].to(self._device, torch.float32, copy=True)
        self.seen = int(state["seen"])
