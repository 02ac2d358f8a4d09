"""L2-SP: keep the fine-tuned weights near their starting point, not near zero.

What it does
    Adds ``Ω(θ) = α/2·‖θ_S − θ0_S‖² + β/2·‖θ_N‖²`` to the loss (Li et al. 2018). ``S``
    are the selected parameters that have a starting point ``θ0`` in the reference, ``N``
    the selected ones that have none (a new classification head, an added adapter): the
    former are pulled towards where they started, the latter towards zero, as plain weight
    decay would. The two parts are the terms ``sp`` and ``l2`` (the latter only when ``N``
    is not empty); the metric ``<id>/distance`` is ``‖θ_S − θ0_S‖``.

    The reference is, in this order: a mapping of parameter names to tensors given with
    :meth:`L2SP.bind` (``plugin.bind(reference=pretrained.state_dict())``), the state dict
    in ``reference_file`` (saved with ``torch.save``, read with ``weights_only=True``), or,
    by default, the model's own parameters when the pipeline is set up: fine-tuning from
    the weights the model was loaded with. Names are the model's ``named_parameters()``;
    the reference is copied once, onto each parameter's device and dtype.

When to use it
    Fine-tuning a pretrained network on little data, where plain weight decay pulls the
    weights towards zero and so away from what pre-training learnt. For a student made
    from a copy of its teacher (seed 002), L2-SP keeps the copied blocks near the
    teacher's weights while the replaced ones learn.

Hyperparameters
    ``alpha`` α (default 0.1) weighs the distance of the matched parameters to their
    start, ``beta`` β (default 0.01) the squared norm of the new ones; Li et al. choose
    both by cross-validation, so sweep them (e.g. α in 0.01…1). The instance ``weight``
    multiplies both terms. ``include``/``exclude`` choose the parameters (trainable ones
    only; frozen ones never move); e.g. ``exclude = ["*.bias", "*norm*"]``.
    ``reference_file`` names a state dict file.

Source
    Li, Grandvalet and Davoine, "Explicit Inductive Bias for Transfer Learning with
    Convolutional Networks", ICML 2018: ``Ω(w) = α/2·‖w_S − w0_S‖² + β/2·‖w_S̄‖²``. Seed
    002 (the teacher–student alignment document) recommends a ``regularization_lambda``
    of 0.01 without saying what it regularizes; this plugin is the literature's choice
    for a student that starts from its teacher's weights.

Caveats
    The optimizer's own weight decay still pulls every parameter towards zero, against α:
    give the matched parameters ``weight_decay = 0`` (``steadytrain.param_groups``), or
    leave the decay to ``beta``. A reference entry whose shape differs from the
    parameter's is an error (exclude the parameter, or drop it from the reference to make
    it new); a reference that matches none of the selected parameters is an error too
    (names with another prefix, e.g. ``module.`` from DDP, match nothing). The starting
    point is part of the checkpoint, so a resumed run keeps its anchor: the checkpoint
    grows by one copy of the matched parameters, and so does memory. Parameters of 16-bit
    dtypes keep their reference in that dtype; the sum of squares is taken in float32.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import attrs
import torch

import steadytrain
from steadytrain.sources import at_least_float32
from steadytrain.validators import non_negative


def l2_sp(
    matched: list[torch.Tensor],
    reference: list[torch.Tensor],
    new: list[torch.Tensor],
    *,
    alpha: float,
    beta: float,
) -> dict[str, torch.Tensor]:
    """``{"sp": α/2·Σ‖θ − θ0‖², "l2": β/2·Σ‖θ_new‖²}`` (``l2`` only when *new* is not empty).

    For any training loop; the plugin adds the reference, filters and checkpoints.
    """
    terms = {}
    if matched:
        terms["sp"] = alpha / 2 * _sum_of_squares(torch._foreach_sub(matched, reference))
    if new:
        terms["l2"] = beta / 2 * _sum_of_squares(new)
    return terms


def _sum_of_squares(tensors: list[torch.Tensor]) -> torch.Tensor:
    norms = torch._foreach_norm(tensors)
    return torch.stack([at_least_float32(n) for n in norms]).square().sum()


def _load_reference(path: str, owner: str) -> Mapping[str, Any]:
    try:
        table = torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, ValueError) as exc:
        raise steadytrain.ConfigError(f"{owner}: cannot read {path!r}: {exc}") from None
    if not isinstance(table, Mapping):
        raise steadytrain.ConfigError(
            f"{owner}: {path!r} must hold a state dict (a mapping of parameter names to "
            f"tensors), got {type(table).__name__}"
        )
    return table


class L2SP(steadytrain.Plugin):
    """Penalize the distance of the weights to their starting point (L2-SP)."""

    name = "l2_sp"

    @attrs.frozen
    class Config:
        alpha: float = attrs.field(default=0.1, validator=non_negative)
        beta: float = attrs.field(default=0.01, validator=non_negative)
        reference_file: str | None = None

    def __init__(self, config: Any = None, **settings: Any) -> None:
        super().__init__(config, **settings)
        self._reference: Mapping[str, Any] | None = None
        self._matched: list[tuple[str, torch.nn.Parameter]] = []
        self._anchors: list[torch.Tensor] = []
        self._new: list[torch.nn.Parameter] = []

    def bind(self, *, reference: Mapping[str, torch.Tensor]) -> L2SP:
        """Use *reference* (parameter name → tensor, e.g. a state dict) as the start θ0.

        Call before ``setup``; it takes precedence over ``reference_file``.
        """
        if not isinstance(reference, Mapping):
            raise steadytrain.ConfigError(
                f"{self.id}: bind(reference=...) needs a mapping of parameter names to "
                f"tensors (a state dict), got {type(reference).__name__}"
            )
        self._reference = reference
        return self

    @steadytrain.hookimpl
    def setup(self, run: steadytrain.Run) -> None:
        params = {n: p for n, p in run.named_parameters() if p.requires_grad}
        selected = self.filter.select(params, kind="trainable parameter")
        reference, where = self._reference, f"{self.id}: the bound reference"
        if reference is None and self.config.reference_file is not None:
            where = f"{self.id}.reference_file"
            reference = _load_reference(self.config.reference_file, where)
        if reference is None:
            reference = {n: params[n] for n in selected}
        matched = [n for n in selected if n in reference]
        if not matched:
            raise steadytrain.ConfigError(
                f"{where}: none of the {len(selected)} selected parameters is in the reference "
                f"(e.g. {selected[0]!r}; the reference has {list(reference)[:3]}); the names "
                "must be the model's named_parameters() (no 'module.' prefix)"
            )
        for name in matched:
            start = reference[name]
            if not isinstance(start, torch.Tensor) or start.shape != params[name].shape:
                raise steadytrain.ConfigError(
                    f"{where}: the start of parameter {name!r} has shape "
                    f"{tuple(getattr(start, 'shape', ()))}, the parameter "
                    f"{tuple(params[name].shape)}; exclude the parameter, or leave it out of "
                    "the reference to treat it as new"
                )
        self._matched = [(n, params[n]) for n in matched]
        self._anchors = [reference[n].detach().to(p.device, p.dtype, copy=True)
                         for n, p in self._matched]
        self._new = [params[n] for n in selected if n not in reference]
        cfg = self.config
        if cfg.alpha == 0 and (cfg.beta == 0 or not self._new):
            raise steadytrain.ConfigError(
                f"{self.id}.alpha: 0 with {'beta = 0' if self._new else 'no new parameters'} "
                "leaves nothing to penalize; set alpha > 0 or remove the instance"
            )

    @steadytrain.hookimpl
    def compute_regularizers(self, ctx: steadytrain.StepContext) -> dict[str, torch.Tensor]:
        cfg = self.config
        # With alpha 0 the matched parameters carry no term (and no distance metric).
        matched = [p for _, p in self._matched] if cfg.alpha > 0 else []
        terms = l2_sp(matched, self._anchors, self._new, alpha=cfg.alpha, beta=cfg.beta)
        if "sp" in terms:
            ctx.log("distance", (terms["sp"].detach() * (2 / cfg.alpha)).sqrt())
        return terms

    def state_dict(self) -> dict[str, Any]:
        return {"reference": {n: a.clone() for (n, _), a in zip(self._matched, self._anchors,
                                                                 strict=True)}}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.check_state(state, ("reference",))
        saved, expected = state["reference"], [n for n, _ in self._matched]
        if not isinstance(saved, Mapping) or sorted(saved) != sorted(expected):
            raise steadytrain.CheckpointError(
                f"plugin instance {self.id!r} ({self.name}): the checkpoint's reference holds "
                f"{sorted(saved) if isinstance(saved, Mapping) else type(saved).__name__}, "
                f"but the instance anchors {sorted(expected)}; were the filters or the model "
                "changed?"
            )
        for (name, _), anchor in zip(self._matched, self._anchors, strict=True):
            if not isinstance(saved[name], torch.Tensor) or saved[name].shape != anchor.shape:
                raise steadytrain.CheckpointError(
                    f"plugin instance {self.id!r} ({self.name}): the checkpoint's start of "
                    f"{name!r} is not a tensor of shape {tuple(anchor.shape)}"
                )
        for (name, _), anchor in zip(self._matched, self._anchors, strict=True):
            anchor.copy_(saved[name])
