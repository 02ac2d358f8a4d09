"""EMA of weights: an exponential moving average of the parameters, swapped in for evaluation.

What it does
    Keeps a shadow copy ``θ̄`` of the selected parameters (and, optionally, floating-point
    buffers) and after every optimizer step moves it towards the weights,
    ``θ̄ ← decay·θ̄ + (1 − decay)·θ``, with one fused ``torch._foreach_lerp_`` over all
    tensors. The first update copies the weights into the shadow. With ``warmup`` the
    decay of the n-th averaging update is ``min(decay, (1 + n)/(10 + n))``, so early
    weights are forgotten quickly. Inside ``pipe.evaluating()`` the model runs with the
    averaged weights; training weights come back on exit and at ``teardown``.

When to use it
    When the loss oscillates from step to step but the trend is right: evaluating (and
    shipping) the average of recent weights smooths the noise of the last updates. It
    costs one extra copy of the selected weights and one read-modify-write pass per update.

Hyperparameters
    ``decay`` 0.999 (the memory-model document's; an averaging horizon of about
    1/(1 − decay) = 1000 updates), ``warmup`` true (see Source), ``every`` 1,
    ``start_step`` 0 (the first optimizer step, counted from 0, that updates the average;
    it must be below the ``total_steps`` given to ``setup``), ``buffers`` false,
    ``device`` ``"same"`` (or ``"cpu"`` to save accelerator memory), ``swap`` ``"auto"``.

    ```toml
    [[plugins]]
    plugin = "ema"
    decay = 0.999
    include = ["encoder.*"]
    ```

Source
    Polyak & Juditsky (1992), "Acceleration of stochastic approximation by averaging",
    for averaging the iterates. The memory-model stability document (seed 000) asks to
    "Implement EMA for model parameters" and updates an
    ``ExponentialMovingAverage(model.parameters(), decay=0.999)`` after every optimizer
    step, without saying which package that class comes from. The warmup is that of the
    class of this name and signature in the ``torch_ema`` package (on by default there,
    ``use_num_updates=True``) and of TensorFlow's ``ExponentialMovingAverage`` given
    ``num_updates``.

Caveats
    Averaging starts at ``start_step``: the update at that step copies the weights, so the
    shadow holds nothing of earlier weights. Before the first update, evaluation and
    ``EMA.averaged_state_dict()`` use the training weights. Skipped optimizer steps do
    not update the average; when the host has not read the skip decision (it is still a
    device tensor), the update is masked on the device instead of waiting for it, at the
    cost of a few scalar kernels and a per-tensor weight in the lerp. The shadow has the
    dtype of its parameter: keep float32 master weights (as mixed-precision training
    does), since a bfloat16 shadow cannot hold an update of ``(1 − decay)·Δ``.
    ``swap = "auto"`` exchanges tensor storage (``param.data``) for evaluation, which
    moves no bytes but changes the parameters' data pointers; use ``swap = "copy"`` for
    models captured in CUDA graphs. With ``device = "cpu"`` each update copies the
    selected weights to the host (a host-device sync on an accelerator) and the host
    keeps a second copy as staging. Integer buffers are not averaged: evaluation uses the
    model's own, and a selection of integer tensors only is refused at ``setup``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import attrs
import torch

import steadytrain
from steadytrain import validators


def ema_decay(decay: float, num_updates: int, *, warmup: bool = True) -> float:
    """The decay of the *num_updates*-th averaging update (counted from 1).

    With *warmup*, ``min(decay, (1 + n)/(10 + n))``; otherwise *decay*.
    """
    if not warmup:
        return decay
    return min(decay, (1 + num_updates) / (10 + num_updates))


@torch.no_grad()
def ema_update_(
    averaged: Sequence[torch.Tensor], current: Sequence[torch.Tensor], decay: float
) -> None:
    """Move every tensor of *averaged* towards *current*: ``a ← decay·a + (1 − decay)·c``.

    One fused ``torch._foreach_lerp_`` over all tensors; pairs must match in shape, dtype
    and device.
    """
    if averaged:
        torch._foreach_lerp_(list(averaged), list(current), 1.0 - decay)


class EMA(steadytrain.Plugin):
    """Exponential moving average of the weights, swapped in for evaluation."""

    name = "ema"
    # Read by pluggy's scan of the instance at registration, before setup.
    _count: int | torch.Tensor = 0

    @attrs.frozen
    class Config:
        decay: float = attrs.field(default=0.999, validator=validators.in_range(0.0, 1.0))
        warmup: bool = True
        every: int = attrs.field(default=1, validator=validators.positive_int)
        start_step: int = attrs.field(default=0, validator=validators.non_negative_int)
        buffers: bool = False
        device: str = attrs.field(default="same", validator=validators.one_of("same", "cpu"))
        swap: str = attrs.field(default="auto", validator=validators.one_of("auto", "copy"))

    @steadytrain.hookimpl
    def setup(self, run: steadytrain.Run) -> None:
        if run.model is None:
            raise steadytrain.ConfigError(f"{self.id}: the ema plugin needs a model in setup()")
        start, total = self.config.start_step, run.total_steps
        if total is not None and start >= total:
            raise steadytrain.ConfigError(
                f"{self.id}.start_step: is {start}, but the run has total_steps = {total} "
                f"optimizer steps (0 … {total - 1}), so nothing would ever be averaged; set "
                "start_step below total_steps"
            )
        tensors = dict(run.model.named_parameters())
        if self.config.buffers:
            tensors.update(run.model.named_buffers())
        kind = "parameter or buffer" if self.config.buffers else "parameter"
        selected = self.filter.select(list(tensors), kind=kind)
        # Integer buffers (BatchNorm's batch counter) cannot be averaged; the model's own
        # are used in evaluation.
        self.names = [n for n in selected if tensors[n].is_floating_point()]
        if not self.names:
            raise steadytrain.FilterError(
                f"{self.id}.include/exclude: the patterns select only integer tensors "
                f"({', '.join(selected)}), which cannot be averaged; select floating-point "
                "parameters or buffers"
            )
        self._targets = [tensors[n] for n in self.names]
        self._model = run.model
        # Tied weights appear once in named_parameters() but under every name in the
        # model's state_dict; the export fills each of those names.
        everything = [*run.model.named_parameters(remove_duplicate=False),
                      *run.model.named_buffers(remove_duplicate=False)]
        index = {id(t): i for i, t in enumerate(self._targets)}
        self._aliases = {name: index[id(t)] for name, t in everything if id(t) in index}
        on_cpu = self.config.device == "cpu"
        with torch.no_grad():
            self.shadow = [t.to("cpu", copy=True) if on_cpu else t.clone()
                           for t in self._targets]
        moves = on_cpu and any(t.device.type != "cpu" for t in self._targets)
        self._staging = [torch.empty_like(t) for t in self.shadow] if moves else None
        self._by_pointer = self.config.swap == "auto" and not moves
        self._backup: list[torch.Tensor] | None = None
        # A plain count while every skip decision is known on the host; a device tensor
        # once an update was masked by a device-side skip flag.
        self._count = 0
        self._weights: dict[torch.dtype, torch.Tensor] = {}
        self._weight_views: list[torch.Tensor] = []
        self._swapped = False

    @property
    def num_updates(self) -> int:
        """Averaging updates applied so far (reads a device-side count once: may sync)."""
        if isinstance(self._count, torch.Tensor):
            self._count = int(self._count)
        return self._count

    @steadytrain.hookimpl
    def consolidate(self, ctx: steadytrain.StepContext) -> None:
        start, every = self.config.start_step, self.config.every
        if ctx.step < start or (ctx.step - start) % every:
            return
        # A decision the host already read costs nothing; an unread one stays on the device.
        decided = ctx.outcome is None or ctx.outcome.decided
        skip = ctx.skipped if decided else ctx.skip_flag
        if isinstance(skip, torch.Tensor):
            self.update(skip=skip)
        elif not skip:
            self.update()

    @torch.no_grad()
    def update(self, skip: torch.Tensor | None = None) -> None:
        """Average the current weights into the shadow (what ``consolidate`` calls).

        *skip*, a boolean device tensor, leaves the average as it is where it holds,
        decided on the device: the host does not wait for the flag.
        """
        current = self._targets
        if self._staging is not None:
            torch._foreach_copy_(self._staging, current)
            current = self._staging
        if skip is not None or isinstance(self._count, torch.Tensor):
            self._masked_update(current, skip)
        elif self._count == 0:
            torch._foreach_copy_(self.shadow, current)
            self._count = 1
        else:
            decay = ema_decay(self.config.decay, self._count, warmup=self.config.warmup)
            ema_update_(self.shadow, current, decay)
            self._count += 1

    def _masked_update(self, current: list[torch.Tensor], skip: torch.Tensor | None) -> None:
        """The update with its weight computed on the device: ``(1 − decay_n)·(not skip)``."""
        device = self.shadow[0].device
        if not self._weights:
            # One 0-d weight per dtype, seen through views shaped like each shadow tensor:
            # the masked update is then one foreach call with a weight list.
            self._weights = {t.dtype: torch.zeros((), dtype=t.dtype, device=device)
                             for t in self.shadow}
            self._weight_views = [self._weights[t.dtype].expand_as(t) for t in self.shadow]
        count = self._count
        if not isinstance(count, torch.Tensor):
            # A fill, not a copy from host memory.
            count = torch.full((), count, dtype=torch.int64, device=device)
        n = count.to(torch.float64)
        if self.config.warmup:
            decay = ((1 + n) / (10 + n)).clamp(max=self.config.decay)
        else:
            decay = torch.full_like(n, self.config.decay)
        # Weight 1 on the first update: lerp returns the weights exactly, a copy.
        decay = torch.where(n == 0, torch.zeros_like(decay), decay)
        keep = torch.ones_like(count) if skip is None else (~skip.reshape(()).bool()).to(
            device, torch.int64)
        weight = (1 - decay) * keep
        for buffer in self._weights.values():
            buffer.copy_(weight)
        torch._foreach_lerp_(self.shadow, current, self._weight_views)
        self._count = count + keep

    # -- evaluation -------------------------------------------------------------------

    @steadytrain.hookimpl
    @torch.no_grad()
    def on_eval_start(self) -> None:
        if self._swapped or self.num_updates == 0:
            return
        if self._by_pointer:
            self._exchange_storage()
        else:
            # One scratch copy of the training weights; on the CPU-shadow path the
            # staging buffer already is one.
            backup = self._staging or [torch.empty_like(t) for t in self._targets]
            torch._foreach_copy_(backup, self._targets)
            torch._foreach_copy_(self._targets, self.shadow)
            self._backup = backup
        self._swapped = True

    @steadytrain.hookimpl
    def on_eval_end(self) -> None:
        self._restore()

    @steadytrain.hookimpl
    def teardown(self) -> None:
        self._restore()

    @torch.no_grad()
    def _restore(self) -> None:
        if not self._swapped:
            return
        if self._by_pointer:
            self._exchange_storage()
        else:
            torch._foreach_copy_(self._targets, self._backup)
            self._backup = None
        self._swapped = False

    def _exchange_storage(self) -> None:
        for index, target in enumerate(self._targets):
            self.shadow[index], target.data = target.data, self.shadow[index]

    # -- export and checkpoints -------------------------------------------------------

    def _averages(self) -> list[torch.Tensor]:
        """Where the averaged values live now: the shadow, or the model while swapped in."""
        return self._targets if self._swapped else self.shadow

    def averaged_state_dict(self) -> dict[str, torch.Tensor]:
        """The model's ``state_dict`` with the averaged values in place of the selected ones.

        Loads into the model with ``model.load_state_dict``; the tensors are copies.
        Before the first update it holds the training weights.
        """
        state = self._model.state_dict()
        if self.num_updates:
            averages = self._averages()
            for name, position in self._aliases.items():
                if name in state:
                    state[name] = averages[position]
        return {name: t.detach().clone() for name, t in state.items()}

    def state_dict(self) -> dict[str, Any]:
        return {
            "num_updates": self.num_updates,
            "shadow": dict(zip(self.names, self._averages(), strict=True)),
        }

    @torch.no_grad()
    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.check_state(state, ("num_updates", "shadow"))
        shadow = state["shadow"]
        if list(shadow) != self.names:
            missing = sorted(set(self.names) - set(shadow))
            extra = sorted(set(shadow) - set(self.names))
            raise steadytrain.CheckpointError(
                f"{self.id}: the checkpoint averages other tensors (missing: "
                f"{', '.join(missing) or 'none'}; extra: {', '.join(extra) or 'none'}); "
                "load it with the include/exclude/buffers it was saved with"
            )
        saved = list(shadow.values())
        for name, mine, theirs in zip(self.names, self.shadow, saved, strict=True):
            if mine.shape != theirs.shape:
                raise steadytrain.CheckpointError(
                    f"{self.id}: shadow of {name!r} has shape {tuple(theirs.shape)} in the "
                    f"checkpoint but {tuple(mine.shape)} in the model"
                )
        torch._foreach_copy_(self._averages(), saved)
        self._count = int(state["num_updates"])
