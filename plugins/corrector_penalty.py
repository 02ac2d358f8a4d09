"""Corrector penalty: penalize how much an output corrector had to change the model's prediction.

What it does
    Emulators pass their predictions through a physics corrector (clamp a fraction to
    [0, 1], clamp a field to be non-negative, rescale to conserve a global budget). The
    corrector makes every output valid, but the model can learn to lean on it. This
    plugin adds ``loss((post − pre) / std, 0)`` to the training loss, per corrected
    variable, where ``pre`` and ``post`` are the corrector's input and output and ``std``
    is the variable's loss-normalization scale. Since the target is zero, the
    normalizer's mean cancels: ``(post − μ)/σ − (pre − μ)/σ = (post − pre)/σ``.

    The term of one forward step is the mean over the selected variables that the
    corrector changed at that step, ``Σ_v w_v · loss_v / N`` (``w_v`` the optional
    per-variable weights): variables that are not selected, not present, or masked out
    in every cell do not dilute it. In a multi-step rollout, forward step ``i`` counts
    with ``(1 + α·i)^(−1/2)`` and the steps are summed (``step_reduction = "sum"``, as the
    task loss of a rollout is) or averaged.

    A model records its corrections with one call inside ``forward``::

        fields = apply_corrector(corrector, fields)          # or
        record_corrections(pre=fields, post=corrected)

    Each call adds one set (one forward step) to ``ctx.outputs["corrections"]``; a host
    may instead pass ``outputs={"corrections": [...]}`` to ``Pipeline.compute_loss``,
    with either :class:`Correction` objects or plain ``post − pre`` tensors as values.
    The same records drive ``pre_corrector_optimization`` (the task loss of selected
    variables on their values before the corrector); the two combine.

When to use it
    A model whose outputs pass through a corrector during training, when the corrector
    changes a lot (pre-corrector fields far outside their bounds, rollouts that drift
    and are pulled back every step) or when the pre-corrector fields matter downstream.

Hyperparameters
    ``weight`` (the instance weight) 1.0 puts equal importance on obeying the corrector
    and on skill; 0.05–0.2 already reduces the divergence strongly; sweep 0.2, 1.0,
    5.0. ``loss = "mse"`` (L2, the default) tolerates slightly negative values near zero
    with little penalty; ``"l1"``, ``"huber"``/``"smooth_l1"`` (transition ``delta``)
    and ``"area_mse"`` (per-cell area weights) are the alternatives. ``std``: a table of
    per-variable scales, a statistics file ``std_file`` (``.json`` or ``.pt``, a mapping
    variable → std) or a normalizer bound with :meth:`CorrectorPenalty.bind`, looked up
    in that order. ``variable_weights`` (patterns → weight), ``rollout_alpha`` (α,
    default 0), ``source`` (the outputs key; one instance per realm reads e.g.
    ``ocean_corrections``), ``on_detached`` (``"error"`` or ``"warn"``).

    Filters: ``include`` / ``exclude`` match the names of the recorded corrections. They
    are checked once, against every variable recorded in the first micro-batch that
    records any (all its forward steps): a pattern that matches none is an error, and so
    is a selection that is empty. Each distinct set of recorded names is then resolved
    the first time it appears and cached, so that a later step costs a lookup; a set
    first seen later (a corrector that changes some variables only on some steps) is
    resolved against the same patterns without the matching check. ``#`` matches
    digits: ``exclude = ["thetao_#"]`` drops ``thetao_0`` … ``thetao_N``;
    ``exclude = ["sea_ice_fraction"]`` keeps sea ice free to be clamped.

Source
    Seed 001: a climate emulator (ACE) pull request adding a corrector regularization,
    with L2 recommended, the 0.2/1.0/5.0 sweep, a request to exclude sea ice, and the fix
    that joins the task loss and the penalty in one backward under gradient accumulation.
    The published implementation is Ai2's ``fme`` (``ai2cm/ace``: ``fme/core/loss.py``,
    ``CorrectorRegularizationConfig`` and ``WeightedMappingLoss``); on the same
    corrections this plugin's term equals its ``weight · loss(corrections, 0).total()``
    in value and gradient (tested to a relative 1e-14 in float64, per-sample masks
    included), except that ``fme`` averages over every output variable, those the
    corrector left alone included (``N_out`` instead of ``N``).

Caveats
    The penalty shares the forward graph with the task loss: it must go through the same
    backward (the pipeline returns one combined loss). A straight-through corrector
    (``x + (clamp(x) − x).detach()``) gives corrections with no gradient to the model;
    the plugin checks each variable with one small autograd probe through the corrector
    on the first step that changes it (a host sync; at most a few steps) and raises, or
    warns with ``on_detached = "warn"``. Plain tensors passed by the host can only be
    checked for being detached altogether. NaN in the corrections (land points) must be
    marked by a mask (``mask=`` of the recording helpers); an unmasked NaN makes the term
    non-finite, which the core reports. A variable whose mask is false in every cell
    leaves the mean of that forward step; its ``var/<name>`` metric records 0 for that
    step (telling it apart would cost a host sync).
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

import attrs
import torch
import torch.nn.functional as F

import steadytrain
from steadytrain.validators import check, non_negative, one_of, positive

LOSSES = ("mse", "l1", "huber", "smooth_l1", "area_mse")
RELATIVE_LOSSES = ("relative_mse", "relative_l2", "relative_l1", "rel_l2", "rel_mse", "rel_l1")
DEFAULT_SOURCE = "corrections"
#: Steps on which an inconclusive straight-through probe (corrector changed nothing) is retried.
PROBE_STEPS = 8


class CorrectionError(steadytrain.SteadytrainError, ValueError):
    """Recorded corrections that cannot be used: the message names the instance (or the
    function), the outputs key and the variable, and says what to change."""


@attrs.frozen(eq=False)
class Correction:
    """One variable's corrector input and output at one forward step.

    ``mask`` (optional, boolean, broadcastable to ``pre``) is True where the data is
    valid; masked cells (land, missing data) are left out of the penalty even if they
    hold NaN.
    """

    pre: torch.Tensor
    post: torch.Tensor
    mask: torch.Tensor | None = None

    @property
    def delta(self) -> torch.Tensor:
        return self.post - self.pre


class Normalizer(Protocol):
    """What :meth:`CorrectorPenalty.bind` accepts: an object with a per-variable ``std``."""

    std: Mapping[str, float | torch.Tensor]


def record_corrections(
    pre: Mapping[str, torch.Tensor],
    post: Mapping[str, torch.Tensor],
    *,
    mask: torch.Tensor | Mapping[str, torch.Tensor] | None = None,
    source: str = DEFAULT_SOURCE,
) -> None:
    """Report one forward step's corrections to the open training step as ``outputs[source]``.

    Only variables that the corrector replaced (``post[v] is not pre[v]``) are recorded, so
    fields it passed through untouched cost nothing. *mask* is one boolean tensor for
    every variable or a mapping variable → mask. Outside a training step this does
    nothing.
    """
    for what, fields in (("pre", pre), ("post", post)):
        if not isinstance(fields, Mapping):
            raise CorrectionError(
                f"record_corrections: {what} must be a mapping of variable name → tensor, "
                f"got {type(fields).__name__}"
            )
    masks = mask if isinstance(mask, Mapping) else None
    steadytrain.report(
        source,
        {
            name: Correction(pre[name], value, masks.get(name) if masks is not None else mask)
            for name, value in post.items()
            if name in pre and value is not pre[name]
        },
    )


def apply_corrector(
    corrector: Callable[[dict[str, torch.Tensor]], Mapping[str, torch.Tensor]],
    fields: Mapping[str, torch.Tensor],
    *,
    mask: torch.Tensor | Mapping[str, torch.Tensor] | None = None,
    source: str = DEFAULT_SOURCE,
) -> dict[str, torch.Tensor]:
    """Run *corrector* on *fields*, record what it changed, and return the corrected fields."""
    corrected = corrector(dict(fields))
    if not isinstance(corrected, Mapping):
        raise CorrectionError(
            f"apply_corrector: the corrector {getattr(corrector, '__name__', corrector)!r} "
            f"must return a mapping of variable name → tensor, got {type(corrected).__name__}"
        )
    corrected = dict(corrected)
    record_corrections(fields, corrected, mask=mask, source=source)
    return corrected


def _float32(x: torch.Tensor) -> torch.Tensor:
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


ValidCount = int | torch.Tensor


def _losses(
    deltas: Sequence[torch.Tensor],
    std: Sequence[float],
    *,
    loss: str,
    masks: Sequence[torch.Tensor | None] | None,
    area_weights: torch.Tensor | None,
    delta: float,
) -> tuple[torch.Tensor, ValidCount]:
    """The per-variable losses and how many variables have a valid cell.

    The count is an int unless masks decide it; then it is a device tensor (no sync).
    """
    check(loss, one_of(*LOSSES), "correction_losses: loss")
    if len(std) != len(deltas):
        raise steadytrain.ConfigError(
            f"correction_losses: {len(deltas)} corrections but {len(std)} std values"
        )
    scaled = torch._foreach_div([_float32(d) for d in deltas], list(std))
    masks = list(masks) if masks is not None else [None] * len(scaled)
    # where() rather than a product: 0·NaN is NaN, and its gradient would be NaN too.
    scaled = [x if m is None else torch.where(m, x, 0.0)
              for x, m in zip(scaled, masks, strict=True)]
    if loss == "area_mse":
        if area_weights is None:
            raise steadytrain.ConfigError("correction_losses: loss 'area_mse' needs area_weights")
        cells = [area_weights.expand_as(x) if m is None else area_weights * m
                 for x, m in zip(scaled, masks, strict=True)]
        sums = [(c * x.square()).sum() for c, x in zip(cells, scaled, strict=True)]
        counts: list[Any] = [c.expand_as(x).sum() for c, x in zip(cells, scaled, strict=True)]
    else:
        if loss in ("mse", "l1"):
            sums = torch._foreach_norm(scaled, 2 if loss == "mse" else 1)
            if loss == "mse":
                sums = torch._foreach_mul(sums, sums)
        elif loss == "huber":
            sums = [F.huber_loss(x, torch.zeros_like(x), reduction="sum", delta=delta)
                    for x in scaled]
        else:
            sums = [F.smooth_l1_loss(x, torch.zeros_like(x), reduction="sum", beta=delta)
                    for x in scaled]
        counts = [x.numel() if m is None else m.expand_as(x).sum()
                  for x, m in zip(scaled, masks, strict=True)]
    # Unmasked variables are valid when they have cells (known on the host); masked ones
    # when the mask keeps a cell (known on the device).
    valid = [x.numel() > 0 if m is None else c > 0
             for x, m, c in zip(scaled, masks, counts, strict=True)]
    # A variable without valid cells has a sum of 0: divide it by 1, so that its value and
    # its gradient are 0 rather than 0/0.
    divisors = [torch.where(v, c, 1.0) if isinstance(v, torch.Tensor) else (c if v else 1)
                for c, v in zip(counts, valid, strict=True)]
    if all(isinstance(d, int) for d in divisors):
        losses = torch.stack(torch._foreach_div(list(sums), divisors))
    else:
        losses = torch.stack([s / d for s, d in zip(sums, divisors, strict=True)])
    on_device = [v for v in valid if isinstance(v, torch.Tensor)]
    on_host = sum(1 for v in valid if v is True)
    if not on_device:
        return losses, on_host
    return losses, torch.stack(on_device).sum() + on_host


def _mean_over_valid(values: torch.Tensor, valid: ValidCount) -> torch.Tensor:
    """The mean of *values* over the valid variables (0 when none is); invalid ones hold 0."""
    if isinstance(valid, torch.Tensor):
        return values.sum() / valid.clamp(min=1)
    return values.mean() if valid == len(values) else values.sum() / max(valid, 1)


def correction_losses(
    deltas: Sequence[torch.Tensor],
    std: Sequence[float],
    *,
    loss: str = "mse",
    masks: Sequence[torch.Tensor | None] | None = None,
    area_weights: torch.Tensor | None = None,
    delta: float = 1.0,
) -> torch.Tensor:
    """Per-variable ``loss(delta_v / std_v, 0)``, averaged over each variable's valid cells.

    Returns a tensor of shape ``(len(deltas),)``. ``masks[v]`` (True = valid) removes
    cells, NaN included; a variable without a valid cell gives 0, with no gradient.
    ``area_weights`` (broadcastable to every delta) weights the cells of ``"area_mse"``.
    16-bit corrections are evaluated in float32.
    """
    return _losses(deltas, std, loss=loss, masks=masks, area_weights=area_weights,
                   delta=delta)[0]


def corrector_penalty(
    corrections: Mapping[str, torch.Tensor | Correction],
    std: Mapping[str, float],
    *,
    loss: str = "mse",
    variable_weights: Mapping[str, float] | None = None,
    area_weights: torch.Tensor | None = None,
    delta: float = 1.0,
) -> torch.Tensor:
    """``Σ_v w_v · loss((post_v − pre_v) / std_v, 0) / N`` over the variables of *corrections*.

    Values are :class:`Correction` objects or ``post − pre`` tensors; ``w_v`` defaults to
    1. ``N`` counts the variables with at least one valid cell (a variable masked out
    everywhere leaves the mean; with none left the penalty is 0). For any training loop;
    the plugin adds filters, rollouts, metrics and checks.
    """
    names = list(corrections)
    entries = [corrections[n] for n in names]
    missing = [n for n in names if n not in std]
    if missing:
        raise steadytrain.ConfigError(f"corrector_penalty: no std for {', '.join(missing)}")
    losses, valid = _losses(
        [e.delta if isinstance(e, Correction) else e for e in entries],
        [std[n] for n in names],
        loss=loss,
        masks=[e.mask if isinstance(e, Correction) else None for e in entries],
        area_weights=area_weights,
        delta=delta,
    )
    weights = variable_weights or {}
    return _mean_over_valid(losses * losses.new_tensor([weights.get(n, 1.0) for n in names]),
                            valid)


class CorrectionSelection:
    """An instance's include/exclude patterns applied to the names of recorded corrections.

    The names are known only once a step records corrections, so :meth:`check` runs the
    filter's checks (patterns that match nothing, an empty selection) once, on every name
    of the first micro-batch that records any; calling the object selects from one set of
    names, resolved the first time that set appears and cached (a forward step whose
    variables are all excluded selects nothing, which is fine). Shared by the plugins that
    read corrections.
    """

    def __init__(self, filter: steadytrain.VariableFilter) -> None:
        self.filter = filter
        self._quiet = attrs.evolve(filter, on_unmatched="ignore", allow_empty=True)
        self._cache: dict[tuple[str, ...], tuple[str, ...]] = {}
        self.checked = False

    def check(self, sets: Iterable[Iterable[str]]) -> tuple[str, ...]:
        """Check every pattern against the union of *sets* and return the selected names.

        Does nothing (returns ``()``) once checked, or while no name was recorded yet.
        """
        if self.checked:
            return ()
        names = list(dict.fromkeys(n for names in sets for n in names))
        if not names:
            return ()
        selected = self.filter.select(names, kind="corrected variable")
        self.checked = True
        return selected

    def __call__(self, names: tuple[str, ...]) -> tuple[str, ...]:
        selected = self._cache.get(names)
        if selected is None:
            selected = self._cache[names] = self._quiet.select(names)
        return selected


def recorded_sets(ctx: steadytrain.StepContext, source: str) -> list[Mapping[str, Any]]:
    """The corrections of this micro-batch in ``ctx.outputs[source]``, one mapping per
    forward step; an error naming the running instance if there are none or they are not
    mappings."""
    sets = ctx.reports(source, option="source")
    for entry in sets:
        if not isinstance(entry, Mapping):
            raise CorrectionError(
                f"{ctx.id}: outputs[{source!r}] must hold one mapping of variable → "
                f"correction per forward step, got {type(entry).__name__}"
            )
    return sets


def _each_value(check: Callable[[Any, attrs.Attribute, Any], None]) -> Callable[..., None]:
    """Apply *check* to every value of a table option, naming the offending key."""

    def validate(_inst: Any, attr: attrs.Attribute, table: Any) -> None:
        for key, value in table.items():
            try:
                check(_inst, attr, value)
            except steadytrain.OptionError as exc:
                raise steadytrain.OptionError(attr.name, f"{key!r}: {exc.message}") from None

    return validate


def _loss_type(_inst: Any, attr: attrs.Attribute, value: Any) -> None:
    if value in RELATIVE_LOSSES:
        raise steadytrain.OptionError(
            attr.name,
            f"{value!r} is a relative norm ‖x−y‖/‖y‖, but the target of this penalty is zero "
            "(the correction post − pre is compared with 0), so it would divide by zero; "
            f"use one of {', '.join(map(repr, LOSSES))}",
        )
    one_of(*LOSSES)(_inst, attr, value)


def _load_table(path: str, owner: str) -> Any:
    try:
        if path.endswith(".json"):
            return json.loads(Path(path).read_text(encoding="utf-8"))
        if path.endswith(".pt"):
            return torch.load(path, weights_only=True)
    except (OSError, ValueError, RuntimeError) as exc:
        raise steadytrain.ConfigError(f"{owner}: cannot read {path!r}: {exc}") from None
    raise steadytrain.ConfigError(f"{owner}: {path!r} must be a .json or .pt file")


def _as_std(value: Any, where: str) -> float:
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise steadytrain.ConfigError(
                f"{where}: a std must be a scalar, got a tensor of shape {tuple(value.shape)}"
            )
        value = value.item()
    return float(check(value, positive, where))


def _broadcasts_to(shape: torch.Size, target: torch.Size) -> bool:
    try:
        return torch.broadcast_shapes(shape, target) == target
    except RuntimeError:
        return False


@attrs.frozen(eq=False)
class _Plan:
    """What one set of corrected variable names resolves to; computed once per set."""

    names: tuple[str, ...]
    std: tuple[float, ...]
    weights: torch.Tensor | None  # None when every variable weighs 1


class CorrectorPenalty(steadytrain.Plugin):
    """Penalize the normalized change that an output corrector makes to the prediction."""

    name = "corrector_penalty"

    @attrs.frozen
    class Config:
        loss: str = attrs.field(default="mse", validator=_loss_type)
        delta: float = attrs.field(default=1.0, validator=positive)
        std: dict[str, float] = attrs.field(factory=dict, validator=_each_value(positive))
        std_file: str | None = None
        area_weights_file: str | None = None
        variable_weights: dict[str, float] = attrs.field(
            factory=dict, validator=_each_value(non_negative)
        )
        rollout_alpha: float = attrs.field(default=0.0, validator=non_negative)
        step_reduction: str = attrs.field(default="sum", validator=one_of("sum", "mean"))
        source: str = DEFAULT_SOURCE
        on_detached: str = attrs.field(default="error", validator=one_of("error", "warn"))
        variable_metrics: bool = True

    def __init__(self, config: Any = None, **settings: Any) -> None:
        super().__init__(config, **settings)
        self._selection = CorrectionSelection(self.filter)
        self._normalizer: Normalizer | None = None
        self._file_std: dict[str, Any] = {}
        self._area_weights: torch.Tensor | None = None
        self._plans: dict[tuple[str, ...], _Plan] = {}
        self._unprobed: dict[str, int] = {}
        self._warned: set[str] = set()
        self._trainable = False
        self._epoch_sum: torch.Tensor | None = None
        self._epoch_count = 0

    def bind(
        self, *, normalizer: Normalizer | None = None, area_weights: torch.Tensor | None = None
    ) -> CorrectorPenalty:
        """Give the instance a normalizer (an object with a ``std`` mapping) and/or area weights.

        Call before the first step; the ``std`` table of the config still takes precedence.
        """
        if normalizer is not None:
            if not isinstance(getattr(normalizer, "std", None), Mapping):
                raise steadytrain.ConfigError(
                    f"{self.id}: bind(normalizer=...) needs an object whose 'std' is a mapping "
                    f"of variable names to scales, got {type(normalizer).__name__}"
                )
            self._normalizer = normalizer
        if area_weights is not None:
            if not isinstance(area_weights, torch.Tensor) or not area_weights.is_floating_point():
                raise steadytrain.ConfigError(
                    f"{self.id}: bind(area_weights=...) needs a floating-point tensor, got "
                    f"{getattr(area_weights, 'dtype', type(area_weights).__name__)}"
                )
            self._area_weights = area_weights
        self._plans.clear()
        return self

    @steadytrain.hookimpl
    def setup(self, run: steadytrain.Run) -> None:
        cfg = self.config
        self._trainable = any(p.requires_grad for _, p in run.named_parameters())
        if cfg.std_file is not None:
            table = _load_table(cfg.std_file, f"{self.id}.std_file")
            if not isinstance(table, Mapping):
                raise steadytrain.ConfigError(
                    f"{self.id}.std_file: {cfg.std_file!r} must hold a mapping of variable "
                    f"names to std, got {type(table).__name__}"
                )
            self._file_std = dict(table)
        if cfg.area_weights_file is not None:
            self._area_weights = torch.as_tensor(
                _load_table(cfg.area_weights_file, f"{self.id}.area_weights_file"),
                dtype=torch.float32,
            )

    # -- resolution, once per set of corrected names ------------------------------------

    def _std_of(self, name: str) -> float:
        for where, table in (
            (f"{self.id}.std[{name!r}]", self.config.std),
            (f"{self.id}: the bound normalizer's std[{name!r}]",
             self._normalizer.std if self._normalizer is not None else {}),
            (f"{self.id}.std_file[{name!r}]", self._file_std),
        ):
            if name in table:
                return _as_std(table[name], where)
        raise steadytrain.ConfigError(
            f"{self.id}.std: no std for the corrected variable {name!r}; add it to the std "
            f"table (std = {{ {name} = ... }}), to std_file, or to the normalizer given with "
            "bind(normalizer=...)"
        )

    def _check_patterns(self, sets: Sequence[Mapping[str, Any]]) -> None:
        """On the first micro-batch with corrections: the filters' and weights' patterns."""
        selected = self._selection.check(sets)
        if not selected:  # checked before, or nothing recorded yet
            return
        for pattern in self.config.variable_weights:
            steadytrain.VariableFilter(
                include=(pattern,), owner=f"{self.id}.variable_weights",
                on_unmatched=self.filter.on_unmatched,
            ).select(selected, kind="selected corrected variable")

    def _plan(self, names: tuple[str, ...], device: torch.device) -> _Plan:
        plan = self._plans.get(names)
        if plan is not None:
            return plan
        selected = self._selection(names)
        weights: dict[str, float] = {}
        for pattern, value in self.config.variable_weights.items():
            for name in selected:
                if steadytrain.VariableFilter.matches(pattern, name):
                    weights.setdefault(name, value)
        if self.config.loss == "area_mse" and self._area_weights is None:
            raise steadytrain.ConfigError(
                f"{self.id}.loss: 'area_mse' needs per-cell area weights; set "
                "area_weights_file or call bind(area_weights=...)"
            )
        if self.config.loss != "area_mse" and self._area_weights is not None:
            raise steadytrain.ConfigError(
                f"{self.id}.area_weights_file: area weights are only used by loss "
                f"'area_mse', not {self.config.loss!r}; drop them or set loss = 'area_mse'"
            )
        if self._area_weights is not None:
            self._area_weights = self._area_weights.to(device)
        per_variable = [weights.get(n, 1.0) for n in selected]
        plan = _Plan(
            selected,
            tuple(self._std_of(n) for n in selected),
            None if all(w == 1.0 for w in per_variable)
            else torch.tensor(per_variable, device=device),
        )
        self._plans[names] = plan
        self._unprobed.update({n: 0 for n in selected if n not in self._unprobed})
        return plan

    # -- checks --------------------------------------------------------------------------

    def _where(self, name: str) -> str:
        return f"{self.id}: corrections[{name!r}] (from outputs[{self.config.source!r}])"

    def _tensor_of(self, name: str, entry: Any) -> torch.Tensor:
        if isinstance(entry, Correction):
            for what in ("pre", "post"):
                if not isinstance(getattr(entry, what), torch.Tensor):
                    raise CorrectionError(
                        f"{self._where(name)}: Correction.{what} must be a tensor, got "
                        f"{type(getattr(entry, what)).__name__}"
                    )
            return entry.pre
        if isinstance(entry, torch.Tensor):
            return entry
        raise CorrectionError(
            f"{self._where(name)}: expected a Correction or a post − pre tensor, got "
            f"{type(entry).__name__}"
        )

    def _delta(self, name: str, entry: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
        delta, mask = self._tensor_of(name, entry), None
        if isinstance(entry, Correction):
            if entry.pre.shape != entry.post.shape:
                raise CorrectionError(
                    f"{self._where(name)}: pre-corrector shape {tuple(entry.pre.shape)} differs "
                    f"from post-corrector shape {tuple(entry.post.shape)}; the corrector must "
                    "keep shapes"
                )
            delta, mask = entry.delta, entry.mask
        if not delta.is_floating_point():
            raise CorrectionError(
                f"{self._where(name)}: corrections must be floating point, got {delta.dtype}"
            )
        if mask is not None and (
            not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool
            or not _broadcasts_to(mask.shape, delta.shape)
        ):
            raise CorrectionError(
                f"{self._where(name)}: the mask must be a boolean tensor broadcastable to "
                f"{tuple(delta.shape)}, got {getattr(mask, 'dtype', type(mask).__name__)} of "
                f"shape {tuple(getattr(mask, 'shape', ()))}"
            )
        if self._area_weights is not None and not _broadcasts_to(
            self._area_weights.shape, delta.shape
        ):
            raise CorrectionError(
                f"{self._where(name)}: area weights of shape {tuple(self._area_weights.shape)} "
                f"do not broadcast to the correction's shape {tuple(delta.shape)}"
            )
        return delta, mask

    def _detached(self, name: str, why: str) -> None:
        message = (
            f"{self.id}: the corrections of {name!r} carry no gradient to the model ({why}); "
            "the penalty would silently do nothing. Apply the corrector with differentiable "
            "ops (torch.clamp, not a straight-through estimator x + (clamp(x) − x).detach()), "
            "or set on_detached = 'warn'"
        )
        if self.config.on_detached == "error":
            raise CorrectionError(message)
        if name not in self._warned:
            self._warned.add(name)
            warnings.warn(message, stacklevel=2)

    def _probe(self, name: str, entry: Any, delta: torch.Tensor) -> None:
        """Whether the corrector passes gradient where it changed something (a host sync)."""
        if not isinstance(entry, Correction) or not entry.pre.requires_grad:
            self._unprobed.pop(name)
            return
        with torch.no_grad():
            changed = (delta != 0) & torch.isfinite(delta)
            if entry.mask is not None:
                changed &= entry.mask
        if not bool(changed.any()):
            self._unprobed[name] += 1
            if self._unprobed[name] >= PROBE_STEPS:
                self._unprobed.pop(name)
            return
        self._unprobed.pop(name)
        (grad,) = torch.autograd.grad(
            delta, entry.pre, torch.ones_like(delta), retain_graph=True, allow_unused=True
        )
        if grad is None or not bool((grad[changed] != 0).any()):
            self._detached(name, "a straight-through corrector: post − pre has zero gradient")

    # -- the term ------------------------------------------------------------------------

    @steadytrain.hookimpl
    def compute_regularizers(
        self, ctx: steadytrain.StepContext
    ) -> Mapping[str, torch.Tensor] | None:
        cfg = self.config
        sets = recorded_sets(ctx, cfg.source)
        self._check_patterns(sets)
        check_grad = self._trainable and torch.is_grad_enabled()
        weight = ctx.weight
        terms: list[tuple[int, torch.Tensor, ValidCount]] = []
        for i, corrections in enumerate(sets):
            if not corrections:
                continue
            device = self._tensor_of(*next(iter(corrections.items()))).device
            plan = self._plan(tuple(corrections), device)
            if not plan.names:
                continue
            deltas, masks = [], []
            for name in plan.names:
                delta, mask = self._delta(name, corrections[name])
                if check_grad:
                    if not delta.requires_grad:
                        self._detached(name, "the tensors do not require grad")
                    elif name in self._unprobed:
                        self._probe(name, corrections[name], delta)
                deltas.append(delta)
                masks.append(mask)
            losses, valid = _losses(
                deltas, plan.std, loss=cfg.loss, masks=masks,
                area_weights=self._area_weights, delta=cfg.delta,
            )
            weighted = losses if plan.weights is None else losses * plan.weights
            terms.append((i, _mean_over_valid(weighted, valid), valid))
            if cfg.variable_metrics:
                # One record per forward step in which the variable was recorded, so that
                # the metric is its mean over exactly those steps.
                log = ctx.log
                for name, raw, scaled in zip(plan.names, losses.unbind(),
                                             (weighted * weight).unbind(), strict=True):
                    log(f"var/{name}", raw)
                    log(f"var_weighted/{name}", scaled)
        if not terms:
            return None
        total = self._combine(ctx, terms, weight)
        self._accumulate_epoch(total.detach(), weight)
        return {"penalty": total}

    def _combine(
        self,
        ctx: steadytrain.StepContext,
        terms: Sequence[tuple[int, torch.Tensor, ValidCount]],
        weight: float,
    ) -> torch.Tensor:
        """Σ_i factor_i · term_i over the forward steps, with their metrics."""
        cfg = self.config
        scale: float | torch.Tensor = 1.0
        if cfg.step_reduction == "mean":
            # Steps whose variables are all masked out leave the mean, like absent ones.
            on_device = [v > 0 for _, _, v in terms if isinstance(v, torch.Tensor)]
            on_host = sum(1 for _, _, v in terms if not isinstance(v, torch.Tensor) and v > 0)
            scale = (1.0 / max(on_host, 1) if not on_device
                     else 1.0 / (torch.stack(on_device).sum() + on_host).clamp(min=1))
        total = None
        for i, term, _ in terms:
            factor = scale * (1.0 + cfg.rollout_alpha * i) ** -0.5
            ctx.log(f"step_{i}", term)
            ctx.log(f"step_{i}_weighted", term * (weight * factor))
            total = term * factor if total is None else total + term * factor
        return total

    # -- epoch aggregate and checkpoint ----------------------------------------------------

    def _accumulate_epoch(self, total: torch.Tensor, weight: float) -> None:
        pair = torch.stack([total, total * weight]).to(torch.float64)
        if self._epoch_sum is None or self._epoch_sum.device != pair.device:
            start = self._epoch_sum
            self._epoch_sum = torch.zeros(2, dtype=torch.float64, device=pair.device)
            if start is not None:
                self._epoch_sum += start.to(pair.device)
        self._epoch_sum += pair
        self._epoch_count += 1

    @steadytrain.hookimpl
    def on_epoch_end(self, run: steadytrain.Run) -> None:
        if not self._epoch_count:
            return
        mean = self._epoch_sum / self._epoch_count
        run.log(self, "epoch", mean[0])
        run.log(self, "epoch_weighted", mean[1])
        self._epoch_sum.zero_()
        self._epoch_count = 0

    def state_dict(self) -> dict[str, Any]:
        epoch_sum = self._epoch_sum
        return {
            "epoch_sum": torch.zeros(2, dtype=torch.float64) if epoch_sum is None
            else epoch_sum.clone(),
            "epoch_count": self._epoch_count,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.check_state(state, ("epoch_sum", "epoch_count"))
        epoch_sum, count = state["epoch_sum"], state["epoch_count"]
        if not (isinstance(epoch_sum, torch.Tensor) and epoch_sum.shape == (2,)) or not (
            isinstance(count, int) and count >= 0
        ):
            raise steadytrain.CheckpointError(
                f"plugin instance {self.id!r} ({self.name}): the checkpoint's epoch_sum must "
                f"be a tensor of shape (2,) and epoch_count an int >= 0, got "
                f"{type(epoch_sum).__name__} and {count!r}"
            )
        self._epoch_sum = epoch_sum.clone()
        self._epoch_count = count
