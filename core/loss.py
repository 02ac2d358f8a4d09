"""The loss composer: ``loss_scale · (task_loss + Σ weight_i(t) · term_i)``, with its checks.

Weights are read from each instance once, when the pipeline is assembled: a constant
stays a float, a schedule is evaluated once per optimizer step. Terms are checked without
a host sync (type, shape, ``requires_grad``); the finite check follows ``finite_check``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from .errors import ConfigError, TermError, UsageError
from .schedules import Constant, Schedule

FINITE_CHECKS = ("auto", "step", "log")


def instance_weight(key: str, weight: Any, *, allows_negative: bool = False) -> Schedule:
    """Instance *key*'s *weight* (a number or a schedule) as a schedule, checked."""
    if isinstance(weight, (int, float)) and not isinstance(weight, bool):
        weight = Constant(float(weight))
    if not isinstance(weight, Schedule):
        raise ConfigError(
            f"{key}.weight: must be a number or a steadytrain.schedules schedule, got "
            f"{type(weight).__name__} {weight!r}"
        )
    if weight.lowest < 0 and not allows_negative:
        raise ConfigError(
            f"{key}.weight: must be >= 0, got a weight that reaches {weight.lowest}; a "
            "negative weight rewards what the plugin penalizes"
        )
    return weight


class LossComposer:
    """Adds the weighted terms of one micro-batch to its task loss."""

    def __init__(self, weights: Mapping[str, Schedule], finite_check: str = "auto") -> None:
        if finite_check not in FINITE_CHECKS:
            raise ConfigError(
                f"finite_check: must be one of {', '.join(FINITE_CHECKS)}, got {finite_check!r}"
            )
        self.finite_check = finite_check
        self.current = {k: w.value for k, w in weights.items() if isinstance(w, Constant)}
        self._schedules = [(k, w) for k, w in weights.items() if not isinstance(w, Constant)]

    @property
    def needs_progress(self) -> list[tuple[str, Schedule]]:
        """The instances whose weight schedule follows the run's progress."""
        return [(k, w) for k, w in self._schedules if w.needs_progress]

    def advance(self, step: int, progress: float | None) -> Mapping[str, float]:
        """Evaluate the schedules for *step*; return every instance's weight."""
        for key, schedule in self._schedules:
            self.current[key] = schedule(step, progress)
        return self.current

    def compose(
        self,
        task_loss: torch.Tensor | None,
        results: list[tuple[str, Any]],
        *,
        loss_scale: float,
        step: int,
        staged: list[tuple[str, Any]],
    ) -> torch.Tensor:
        """The combined loss of one micro-batch; raw and weighted terms go to *staged*."""
        if task_loss is not None:  # checked by the caller (check_task_loss)
            staged.append(("loss/task", task_loss))
        total = task_loss
        for key, terms in results:
            if not isinstance(terms, Mapping):
                raise TermError(
                    f"plugin instance {key!r}: compute_regularizers must return a mapping of "
                    f"term names to tensors, got {type(terms).__name__}"
                )
            weight = self.current[key]
            for term, value in terms.items():
                self._check_term(key, term, value, task_loss, step)
                weighted = value * weight
                staged.append((f"reg/{key}/{term}", value))
                staged.append((f"reg_weighted/{key}/{term}", weighted))
                total = weighted if total is None else total + weighted
        if total is None:
            raise UsageError(
                "compute_loss() got no task loss and no plugin returned a term; pass the "
                "host's loss"
            )
        # Recorded before the accumulation scaling: comparable with loss/task, and the same
        # whether the host or the pipeline divides by the number of micro-batches.
        staged.append(("loss/total", total))
        return total * loss_scale if loss_scale != 1.0 else total

    def _check_term(
        self, key: str, term: str, value: Any, task_loss: torch.Tensor | None, step: int
    ) -> None:
        where = f"plugin instance {key!r}, term {term!r}, step {step}"
        if not isinstance(value, torch.Tensor):
            raise TermError(f"{where}: a term must be a tensor, got {type(value).__name__}")
        if value.numel() != 1:
            raise TermError(
                f"{where}: a term must be a scalar, got shape {tuple(value.shape)}; "
                "reduce it (mean or sum) in the plugin"
            )
        if task_loss is not None and task_loss.requires_grad and not value.requires_grad:
            raise TermError(
                f"{where}: the term does not require grad while the task loss does: it is a "
                "constant and would change no weight. Compute it from tensors of the forward "
                "graph (a hard 0/1 mask or a detached tensor has no gradient)"
            )
        eager = self.finite_check == "step" or (
            self.finite_check == "auto" and value.device.type == "cpu"
        )
        # A non-finite task loss means the batch or the model broke, not this plugin: the
        # step is left to a guard (or to the host), as it would be without regularizers.
        if (
            eager
            and not bool(torch.isfinite(value.detach()).all())
            and (task_loss is None or bool(torch.isfinite(task_loss.detach()).all()))
        ):
            raise TermError(f"{where}: the term is {value.item()}, not finite")


def check_task_loss(task_loss: Any) -> None:
    """Refuse a task loss that is not a scalar tensor, before the host's backward."""
    if not isinstance(task_loss, torch.Tensor):
        raise TermError(
            f"compute_loss(): the task loss must be a tensor, got {type(task_loss).__name__}"
        )
    if task_loss.numel() != 1:
        raise TermError(
            f"compute_loss(): the task loss must be a scalar, got shape "
            f"{tuple(task_loss.shape)}; reduce it (e.g. .mean()) before passing it"
        )
