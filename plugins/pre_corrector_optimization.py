"""Pre-corrector optimization: take the task loss of selected variables before the corrector.

What it does
    A model trained through a corrector learns from the corrected prediction. Where the
    corrector clamps, the corrected value does not depend on the network's output, so
    the loss gives it no gradient there; where it rescales, the gradient passes through
    the rescaling. Pre-corrector optimization takes the task loss of selected variables
    on their values before the corrector instead, so that the network learns to predict
    them well without the corrector's help. The corrected values still feed the rollout
    (the next step's input), the returned predictions and ``corrector_penalty``: only
    what the task loss sees changes.

    The plugin cannot change the host's loss, so the host computes it on what
    :meth:`PreCorrectorOptimization.for_loss` returns::

        pre = pipe.plugins["pre_corrector_optimization"]
        ctx = pipe.before_step(batch=x, targets=y)
        fields = model(x)                                   # apply_corrector(...) inside
        loss = pipe.compute_loss(task_loss(pre.for_loss(fields), y))

    ``for_loss(fields)`` returns a copy of *fields* (a mapping variable → tensor, the
    corrector's output as ``apply_corrector`` returned it) in which every selected
    variable that the corrector changed in this micro-batch is replaced by its value
    before the corrector (the ``pre`` of its recorded :class:`Correction`, found by
    identity: ``fields[v] is correction.post``). The exact relation to the host's loss
    ``L``: the task loss is ``L(for_loss(F), y)`` for the corrected fields ``F`` of each
    forward step, so its value and its gradients are those of ``L`` on the uncorrected
    prediction for the selected variables and on the corrected one for all others, for
    any ``L`` (with its own normalization, weights and reduction). The plugin adds no
    term: the pipeline returns ``loss_scale · (L(for_loss(F), y) + Σ weight · term)``
    as for any task loss, and ``loss/task`` records ``L(for_loss(F), y)``.

    A term ``L(pre) − L(post)`` added to an unchanged task loss would give the same value
    only for a weight of exactly 1, would cost two more evaluations of the host's loss,
    and would leave the corrected path's gradient in as ``∇L(post) − ∇L(post)``, zero
    only up to rounding; a loss on ``for_loss(F)`` is exact and costs nothing.

    In a rollout, call ``for_loss`` on each forward step's corrected fields, before the
    host changes them further; ``for_loss(fields, corrections=mapping)`` uses one forward
    step's corrections given by the host (``Correction`` objects) instead, matched by
    name. Outside a training step (evaluation) it returns the fields unchanged: validation
    losses are of the corrected prediction, the one the model is used with.

When to use it
    With a corrector that clamps (non-negative fields, fractions in [0, 1]) or rescales
    many variables, when the model should learn the physical fields rather than rely on
    the corrector. Exclude the variables whose bounds the loss should enforce: ACE keeps
    ``sea_ice_fraction`` on its corrected value (with the clamp in the loss, the small
    positive sea-ice biases in mid latitudes went away) while the ocean temperatures
    train on their uncorrected values.

Hyperparameters
    ``include`` / ``exclude``: the variables trained on their pre-corrector values, by
    name, resolved as in ``corrector_penalty``: the patterns are checked once against
    every variable recorded in the first micro-batch that records any (a pattern that
    matches none is an error, and so is an empty selection); each set of recorded names
    is resolved once and cached. ``source``: the outputs key the corrections are
    recorded under (``apply_corrector(..., source=...)``), as in ``corrector_penalty``.
    The instance ``weight`` must stay 1: the plugin adds no term.

    Metric: ``<id>/variables``, the number of variables whose task loss was taken on
    their pre-corrector values, per micro-batch.

Source
    Seed 001, the ACE pull request thread: pre-corrector optimization improved the
    evolution of the ocean temperatures (``thetao``), and excluding sea ice from it
    removed the small positive sea-ice biases in mid latitudes. Ai2's ``fme`` (``ai2cm/ace``,
    ``fme/ace/stepper/single_module.py``: ``PreCorrectorOptimizationConfig`` with
    ``exclude_names_and_prefixes``, and ``TrainStepper._accumulate_loss``) computes the
    step loss on ``{**output, **select_precorrected(uncorrected)}``, which is
    ``for_loss(output)`` for an instance with the same exclusions.

Caveats
    ``for_loss`` must receive the corrector's output tensors themselves: a selected
    variable changed after the corrector (a later adjustment, a normalization) is an
    error naming it, since the corrector's input would then replace a value the host
    changed; pass ``corrections=`` to swap by name instead. A micro-batch that records
    corrections of selected variables while ``for_loss`` made no replacement is an error
    (the host computed its loss on the corrected fields, and the technique would do
    nothing). Unlike ``fme``, which warns once, filter patterns that match no recorded
    variable are errors. Where a clamp is active, the corrected value has no gradient:
    with pre-corrector optimization the network gets one, so out-of-bounds predictions
    are pulled toward the target rather than left to the corrector; add
    ``corrector_penalty`` to pull them back into bounds as well.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import attrs
import torch

import steadytrain
from steadytrain.plugins.corrector_penalty import (
    DEFAULT_SOURCE,
    Correction,
    CorrectionError,
    CorrectionSelection,
    recorded_sets,
)


def uncorrected_fields(
    fields: Mapping[str, torch.Tensor],
    corrections: Mapping[str, Correction],
    names: Iterable[str],
) -> dict[str, torch.Tensor]:
    """A copy of *fields* in which each of *names* with a :class:`Correction` in
    *corrections* holds that correction's ``pre`` (its value before the corrector).

    For any training loop: compute the task loss on the result. The plugin adds the name
    filters, the lookup of this step's recorded corrections and the checks.
    """
    return _substitute(
        fields, {n: corrections[n].pre for n in names if n in fields and n in corrections}
    )


def _substitute(
    fields: Mapping[str, torch.Tensor], swap: Mapping[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    return {name: swap.get(name, value) for name, value in fields.items()}


class PreCorrectorOptimization(steadytrain.Plugin):
    """Take the task loss of selected variables on their values before the corrector."""

    name = "pre_corrector_optimization"

    @attrs.frozen
    class Config:
        source: str = DEFAULT_SOURCE

    def __init__(self, config: Any = None, **settings: Any) -> None:
        super().__init__(config, **settings)
        if self.weight != steadytrain.schedules.Constant(1.0):
            raise steadytrain.ConfigError(
                f"{self.id}.weight: {self.name} adds no term to the loss, so a weight would "
                "have no effect; remove it (the host's task loss itself is taken on "
                f"{self.id}.for_loss(fields))"
            )
        self._selection = CorrectionSelection(self.filter)
        self._ctx: steadytrain.StepContext | None = None
        self._replaced: set[str] = set()
        self._given: list[tuple[str, ...]] = []

    # -- the host's side -------------------------------------------------------------------

    def for_loss(
        self,
        fields: Mapping[str, torch.Tensor],
        *,
        corrections: Mapping[str, Correction] | None = None,
    ) -> dict[str, torch.Tensor]:
        """The fields to compute the task loss on: *fields* with each selected variable that
        the corrector changed replaced by its value before the corrector.

        *fields* is one forward step's corrector output. Without *corrections*, the
        corrections recorded in this micro-batch are used, matched by identity; with it
        (one forward step's mapping variable → :class:`Correction`), by name. Outside a
        training step the fields are returned unchanged.
        """
        if not isinstance(fields, Mapping):
            raise CorrectionError(
                f"{self.id}.for_loss: fields must be a mapping of variable name → tensor, got "
                f"{type(fields).__name__}"
            )
        if corrections is not None:
            swap = self._given_swap(fields, corrections)
        elif self._ctx is None:
            swap = {}
        else:
            swap = self._recorded_swap(fields, self._ctx.outputs.get(self.config.source))
        self._replaced.update(swap)
        return _substitute(fields, swap)

    def _given_swap(
        self, fields: Mapping[str, torch.Tensor], corrections: Any
    ) -> dict[str, torch.Tensor]:
        if not isinstance(corrections, Mapping):
            raise CorrectionError(
                f"{self.id}.for_loss: corrections must be a mapping of variable name → "
                f"Correction, got {type(corrections).__name__}"
            )
        names = tuple(corrections)
        self._given.append(names)
        selected = [n for n in self._selection(names) if n in fields]
        for name in selected:
            entry = corrections[name]
            if not isinstance(entry, Correction):
                raise CorrectionError(
                    f"{self.id}.for_loss: corrections[{name!r}] must be a Correction(pre, "
                    f"post), got {type(entry).__name__}; a post − pre tensor does not carry "
                    "the value before the corrector"
                )
            self._check_shape(name, entry.pre, fields[name])
        return {name: corrections[name].pre for name in selected}

    def _recorded_swap(
        self, fields: Mapping[str, torch.Tensor], recorded: Any
    ) -> dict[str, torch.Tensor]:
        if recorded is None:
            return {}  # compute_regularizers names the missing source
        sets = recorded if isinstance(recorded, list) else [recorded]
        sets = [s for s in sets if isinstance(s, Mapping)]
        swap: dict[str, torch.Tensor] = {}
        matched: dict[int, tuple[str, ...]] = {}  # forward step → its selected names
        for name, value in fields.items():
            # The newest step first: a rollout calls for_loss right after each step.
            for k in range(len(sets) - 1, -1, -1):
                entry = sets[k].get(name)
                if isinstance(entry, Correction) and entry.post is value:
                    selected = matched.setdefault(k, self._selection(tuple(sets[k])))
                    if name in selected:
                        swap[name] = entry.pre
                    break
        for k, selected in sorted(matched.items()):
            for name in selected:
                if name in fields and name not in swap:
                    raise CorrectionError(
                        f"{self.id}.for_loss: fields[{name!r}] is not the corrector's output "
                        f"recorded for {name!r} at forward step {k} of this micro-batch (in "
                        f"outputs[{self.config.source!r}]), while the other fields are: it "
                        "was changed after the corrector. Call for_loss on the corrector's "
                        "output, or pass corrections= to replace by name"
                    )
        return swap

    def _check_shape(self, name: str, pre: Any, field: Any) -> None:
        if not isinstance(pre, torch.Tensor) or not isinstance(field, torch.Tensor):
            raise CorrectionError(
                f"{self.id}.for_loss: fields[{name!r}] and corrections[{name!r}].pre must be "
                f"tensors, got {type(field).__name__} and {type(pre).__name__}"
            )
        if pre.shape != field.shape:
            raise CorrectionError(
                f"{self.id}.for_loss: corrections[{name!r}].pre has shape {tuple(pre.shape)} "
                f"but fields[{name!r}] has shape {tuple(field.shape)}"
            )

    # -- hooks -----------------------------------------------------------------------------

    @steadytrain.hookimpl
    def before_step(self, ctx: steadytrain.StepContext) -> None:
        self._ctx = ctx
        self._replaced = set()
        self._given = []

    @steadytrain.hookimpl
    def compute_regularizers(self, ctx: steadytrain.StepContext) -> None:
        source = self.config.source
        # Without records, corrections given to for_loss will do; with neither, an error.
        sets = recorded_sets(ctx, source) if source in ctx.outputs or not self._given else []
        names = [tuple(s) for s in sets] + self._given
        self._selection.check(names)
        if not self._replaced:
            selected = list(dict.fromkeys(n for s in names for n in self._selection(s)))
            if selected:
                raise CorrectionError(
                    f"{self.id}: the corrector changed {', '.join(selected)} in this "
                    "micro-batch, but the task loss was not computed on "
                    f"for_loss(fields): pre-corrector optimization would do nothing. Compute "
                    f"it as loss_fn(pipe.plugins[{self.id!r}].for_loss(fields), targets)"
                )
        ctx.log("variables", float(len(self._replaced)))

    @steadytrain.hookimpl
    def consolidate(self) -> None:
        self._ctx = None  # keep no tensors of a finished step

    @steadytrain.hookimpl
    def teardown(self) -> None:
        self._ctx = None
