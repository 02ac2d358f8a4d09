"""Parameter groups from name patterns: one optimizer with per-group lr and weight decay.

What it does
    :func:`param_groups` turns a list of group specs (include/exclude glob patterns, a
    learning-rate scale, a weight decay) into the ``params`` argument of any
    ``torch.optim`` optimizer. Every parameter lands in exactly one group; the ones no
    spec selects form a last, default group with the base ``lr`` and ``weight_decay``.

When to use it
    When parts of a model need their own learning rate or weight decay: one optimizer
    with groups replaces several optimizers (one ``step``, one ``zero_grad``, one state
    to checkpoint, and the fused/foreach kernels see all parameters at once).

Hyperparameters
    Per group: ``include`` (default ``["*"]``), ``exclude``, ``lr_scale`` (1.0),
    ``weight_decay`` (the base value), ``name``. The memory-model document's setup is
    ``[{"include": ["*memory*"], "lr_scale": 0.1, "weight_decay": 0.001}]`` with
    ``weight_decay=0.01`` for the rest.

Source
    The memory-model stability document (seed 000), section 6: two AdamW optimizers,
    the memory parameters at 0.1× the learning rate and weight decay 0.001 against 0.01.

Caveats
    * Patterns use the filter syntax of every plugin (``*``, ``?``, ``[ab]``, ``#`` for
      digits) against ``model.named_parameters()`` names; a pattern that matches nothing
      is an error, and so is a parameter selected by two groups.
    * Each group dict carries a ``name`` key, which torch keeps in
      ``optimizer.param_groups`` (and in its ``state_dict``).
    * Frozen parameters (``requires_grad=False``) are grouped like the others; the
      optimizer skips them while they have no gradient.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from . import validators
from .config import GroupSpec, structure_options
from .errors import ConfigError
from .filters import VariableFilter

OWNER = "param_groups"


def param_groups(
    model: torch.nn.Module,
    groups: Sequence[Mapping[str, Any] | GroupSpec],
    *,
    lr: float,
    weight_decay: float = 0.0,
    default_name: str = "default",
) -> list[dict[str, Any]]:
    """Optimizer parameter groups for *model* from pattern specs.

    Each spec may have ``include`` (glob patterns, default ``["*"]``), ``exclude``,
    ``lr_scale`` (the group's ``lr`` is ``lr * lr_scale``), ``weight_decay`` (default
    *weight_decay*) and ``name`` (default ``groups[i]``). Parameters no spec selects go
    to a last group named *default_name* with *lr* and *weight_decay*; it is left out
    when empty. Raises :class:`ConfigError` for an unknown key, a bad number,
    a pattern that matches no parameter, a parameter two groups select, or a group that
    ends up empty.
    """
    lr = float(validators.check(lr, validators.positive, f"{OWNER}.lr"))
    weight_decay = float(
        validators.check(weight_decay, validators.non_negative, f"{OWNER}.weight_decay")
    )
    named = list(model.named_parameters())
    names = [n for n, _ in named]
    by_name = dict(named)
    owner_of: dict[str, str] = {}
    result = []
    for index, raw in enumerate(groups):
        where = f"{OWNER}.groups[{index}]"
        if isinstance(raw, GroupSpec):
            spec = raw
        elif isinstance(raw, Mapping):
            spec = structure_options(raw, GroupSpec, where)
        else:
            raise ConfigError(f"{where}: expected a table of options, got {raw!r}")
        name = spec.name or f"groups[{index}]"
        selector = VariableFilter(include=spec.include, exclude=spec.exclude, owner=where)
        selected = selector.select(names, kind="parameter")
        for param in selected:
            if param in owner_of:
                raise ConfigError(
                    f"{where}: parameter {param!r} is also in group {owner_of[param]!r}; a "
                    "parameter belongs to one group: narrow the patterns or add an exclude"
                )
            owner_of[param] = name
        result.append({
            "params": [by_name[n] for n in selected],
            "lr": lr * spec.lr_scale,
            "weight_decay": weight_decay if spec.weight_decay is None else spec.weight_decay,
            "name": name,
        })
    rest = [by_name[n] for n in names if n not in owner_of]
    if rest:
        result.append({"params": rest, "lr": lr, "weight_decay": weight_decay,
                       "name": default_name})
    return result
