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
    Averaging starts at ``start_step``: the update at that step copies the weights, so
    the shadow holds nothing of earlier weights. Before the first update, evaluation and
    ``EMA.averaged_state_dict()`` use the training weights. Skipped optimizer steps do
    not update the average; when the host has not read the skip decision (it is still a
    device tensor), the update is masked on the device instead of waiting for it, and
    the update count and the next weight (float32) stay on the device too. On CUDA,
    where Triton kernels run (``steadytrain.kernels.triton_runs_on``: compute capability
    8.0 or newer, Triton installed, ``STEADYTRAIN_TRITON`` not ``0``), every update,
    plain or masked, is one launch per dtype of a Triton kernel that reads the weight
    and the flag on the device and updates every tensor (a plain update of weights in
    one buffer, below, stays one ``_foreach_lerp_``); a masked update's launch also
    keeps the count and the next weight (elsewhere three more scalar kernels, five with
    ``warmup``); its host cost does not grow with the number of tensors, except for a
    check, every update, that each weight still has the address the launch was built
    with (a ``model.to()`` or ``param.data =`` rebuilds it). Without Triton the plain
    update is torch's ``_foreach_lerp_`` and the masked one torch's fused SGD kernel,
    which computes the average and skips itself on the flag, 13–18 % slower than
    ``_foreach_lerp_`` on an H200 (see the benchmarks); its first update computes ``θ̄ −
    1·(θ̄ − θ)``, which is ``θ`` up to one rounding. The masked update runs on CUDA and
    for float32/float64 shadows on the CPU; elsewhere (half-precision shadows on the
    CPU, whose fused kernel torch leaves unfinished, and other devices) the flag is read
    on the host, which costs nothing on the CPU and one sync elsewhere. When the
    selected weights of one dtype already lie back to back in one buffer (a host that
    keeps its parameters flat), the shadow mirrors that layout and each update is one
    kernel over the whole buffer instead of a multi-tensor launch (with many small
    tensors most of that launch's time is torch's own work on the host). That holds
    while the first and last of them still point into the buffer, checked every update
    (a model moved with ``.to()`` falls back to the per-tensor update); a single
    parameter in between re-pointed with ``param.data =`` goes unnoticed there, so
    re-point all or none. The shadow has the dtype of its parameter: keep float32 master
    weights (as mixed-precision training does), since a bfloat16 shadow cannot hold an
    update of ``(1 − decay)·Δ``. ``swap = "auto"`` exchanges tensor storage
    (``param.data``) for evaluation, which moves no bytes but changes the parameters'
    data pointers; use ``swap = "copy"`` for models captured in CUDA graphs. With
    ``device = "cpu"`` each update copies the selected weights to the host (a
    host-device sync on an accelerator) and the host keeps a second copy as staging.
    Integer buffers are not averaged: evaluation uses the model's own, and a selection
    of integer tensors only is refused at ``setup``. Sharded parameters (FSDP2's
    DTensors): each rank averages its own shards, without gathering them; the shadow is
    a DTensor laid out like its parameter (so ``torch.distributed.checkpoint`` saves and
    reshards it), evaluation copies the average into the shards (``swap = "auto"``
    exchanges no storage there), and ``device = "cpu"`` is refused.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping, Sequence
from typing import Any

import attrs
import torch

import steadytrain
from steadytrain import validators

from . import multi_tensor


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


def _lerps_fused(tensor: torch.Tensor) -> bool:
    """Whether torch's fused SGD kernel averages tensors of this device and dtype.

    Its CPU loop for float16/bfloat16 never stores the updated values (torch 2.13), so
    those are left out there.
    """
    return tensor.device.type == "cuda" or (
        tensor.device.type == "cpu" and tensor.dtype in (torch.float32, torch.float64))


@torch.no_grad()
def _masked_lerp_(
    averaged: list[torch.Tensor], current: list[torch.Tensor], weight: torch.Tensor,
    skip: torch.Tensor,
) -> None:
    """``a ← a + weight·(c − a)`` for every pair, unless *skip* is 1; no host sync.

    torch's fused SGD step with momentum 0, weight decay 1 and ``maximize`` takes the
    weights as the gradients and *weight* as the learning rate: ``a − w·(a − c)``, one
    multi-tensor pass that returns at once when ``found_inf`` (*skip*) is 1. *weight* and
    *skip* are 0-d float32 tensors on the device of the pairs, which share one dtype.
    """
    torch._fused_sgd_(averaged, current, [], weight_decay=1.0, momentum=0.0, lr=weight,
                      dampening=0.0, nesterov=False, maximize=True, is_first_step=False,
                      found_inf=skip)


def _add_unless_(
    counters: list[torch.Tensor], increments: list[torch.Tensor], skip: torch.Tensor
) -> None:
    """``n ← n + i`` for every counter unless *skip* is 1, in one kernel, as above."""
    torch._fused_sgd_(counters, increments, [], weight_decay=0.0, momentum=0.0, lr=-1.0,
                      dampening=0.0, nesterov=False, maximize=False, is_first_step=False,
                      found_inf=skip)


def _back_to_back(tensors: Sequence[torch.Tensor]) -> torch.Tensor | None:
    """A 1-D view over *tensors* when they are contiguous and tile one storage region
    without gaps (in any order), else None."""
    if len(tensors) < 2 or not all(t.is_contiguous() for t in tensors):
        return None
    storage = tensors[0].untyped_storage().data_ptr()
    if any(t.untyped_storage().data_ptr() != storage for t in tensors):
        return None
    ordered = sorted(tensors, key=lambda t: t.storage_offset())
    start = end = ordered[0].storage_offset()
    for tensor in ordered:
        if tensor.storage_offset() != end:
            return None
        end += tensor.numel()
    return ordered[0].detach().as_strided((end - start,), (1,), start)


class _Pairs:
    """Shadow tensors of one device and dtype with the tensors they average, the lists
    built once; one flat view over each side when both lie back to back in one buffer.

    On CUDA with Triton every update is one launch of :class:`MultiTensorLerp` over the
    pairs (or the flat pair), rebuilt when a weight's address changed.
    """

    def __init__(
        self, shadow: list[torch.Tensor], current: list[torch.Tensor], owner: str
    ) -> None:
        self.shadow, self.current, self.owner = shadow, current, owner
        self._flat: tuple[torch.Tensor, torch.Tensor] | None = None
        flat_current, flat_shadow = _back_to_back(current), _back_to_back(shadow)
        if flat_current is not None and flat_shadow is not None:
            self._flat = flat_shadow, flat_current
            self._ends = (current[0], current[-1])
            self._pointers = tuple(t.data_ptr() for t in self._ends)
        self.triton = multi_tensor.available(shadow[0]) and all(
            t.is_contiguous() for t in (*shadow, *current))
        self._kernel: tuple[bool, multi_tensor.MultiTensorLerp] | None = None
        self.fused = self.triton or _lerps_fused(shadow[0])

    def _sides(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        if self._flat is not None:
            # Weights moved since setup (``model.to()``): the buffer is no longer theirs.
            if tuple(t.data_ptr() for t in self._ends) == self._pointers:
                return [self._flat[0]], [self._flat[1]]
            self._flat = None
        return self.shadow, self.current

    def _launcher(self) -> multi_tensor.MultiTensorLerp | None:
        """The one-launch update over the current sides, or None without Triton."""
        if not self.triton:
            return None
        sides = self._sides()
        flat = self._flat is not None
        if self._kernel is None or self._kernel[0] != flat or self._kernel[1].current_moved():
            shadow, current = sides
            changed = next((c for s, c in zip(shadow, current, strict=True)
                            if c.shape != s.shape or not c.is_contiguous()), None)
            if changed is not None:
                raise steadytrain.UsageError(
                    f"{self.owner}: a weight averaged here was given new storage of shape "
                    f"{tuple(changed.shape)}{'' if changed.is_contiguous() else ', not contiguous'}"
                    " (param.data = ...), which the one-launch update cannot average into "
                    "its shadow; give it storage like the old (same shape, contiguous), or "
                    "build the pipeline again after changing the model"
                )
            self._kernel = flat, multi_tensor.MultiTensorLerp(*sides)
        return self._kernel[1]

    def copy(self) -> None:
        torch._foreach_copy_(*self._sides())

    def lerp(self, decay: float) -> None:
        sides = self._sides()
        # One pair (a flat buffer): torch's single kernel costs the host less than a launch.
        launcher = self._launcher() if len(sides[0]) > 1 else None
        if launcher is not None:
            launcher(1.0 - decay)
        else:
            ema_update_(*sides, decay)

    def masked_lerp(self, weight: torch.Tensor, skip: torch.Tensor) -> None:
        """torch's path: *weight* and *skip* 0-d float32 tensors."""
        _masked_lerp_(*self._sides(), weight, skip)

    def launch(self, weights: torch.Tensor, skip: torch.Tensor | None, slot: int,
               count: multi_tensor.Count | None) -> None:
        """The Triton path (see :class:`~steadytrain.plugins.ema.multi_tensor.MultiTensorLerp`)."""
        self._launcher()(weights, skip, slot=slot, count=count)


def _is_sharded(tensor: torch.Tensor) -> bool:
    """Whether *tensor* is a DTensor (FSDP2's parameters are); none exists before
    ``torch.distributed.tensor`` is imported, an import this check does not pay for."""
    dtensor = getattr(sys.modules.get("torch.distributed.tensor"), "DTensor", None)
    return dtensor is not None and isinstance(tensor, dtensor)


def _copies(tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Clones of *tensors*; those of one dtype that tile one buffer are cloned as one
    buffer, so that their clones tile one too."""
    copies: list[torch.Tensor | None] = [None] * len(tensors)
    for indices in _by_kind(tensors).values():
        group = [tensors[i] for i in indices]
        flat = _back_to_back(group)
        if flat is None:
            continue
        clone, start = flat.clone(), flat.storage_offset()
        for index, tensor in zip(indices, group, strict=True):
            offset = tensor.storage_offset() - start
            copies[index] = clone[offset:offset + tensor.numel()].view(tensor.shape)
    return [t.clone() if c is None else c for t, c in zip(tensors, copies, strict=True)]


def _by_kind(tensors: Sequence[torch.Tensor]) -> dict[tuple[torch.device, torch.dtype], list[int]]:
    """Positions of *tensors* by device and dtype, in order."""
    kinds: dict[tuple[torch.device, torch.dtype], list[int]] = {}
    for index, tensor in enumerate(tensors):
        kinds.setdefault((tensor.device, tensor.dtype), []).append(index)
    return kinds


def _local(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a DTensor (sharing its storage), or the tensor itself."""
    return tensor.to_local() if _is_sharded(tensor) else tensor


def _layout(tensor: torch.Tensor) -> str:
    return f"sharded as {tensor.placements}" if _is_sharded(tensor) else "a whole tensor"


@attrs.define
class _DeviceCount:
    """What the update keeps on the device once a skip flag stayed there."""

    #: The update count and 10 + the count (float64, exact), in one tensor.
    counts: torch.Tensor
    #: The Triton path's weights: the next update's in ``weights[slot]``.
    weights: torch.Tensor
    #: The Triton path's bookkeeping, done by the update's own launch.
    count: multi_tensor.Count
    #: Views of ``counts``: the count, then 10 + count with warmup.
    counters: list[torch.Tensor]
    #: The least weight of the next update: 1 until an update was applied, then 1 − decay.
    floor: torch.Tensor
    #: The weight of the next update (``floor`` itself without warmup).
    weight: torch.Tensor
    after_first: torch.Tensor
    never: torch.Tensor
    nine: torch.Tensor
    ones: list[torch.Tensor]
    slot: int = 0


class EMA(steadytrain.Plugin):
    """Exponential moving average of the weights, swapped in for evaluation."""

    name = "ema"
    # Read by pluggy's scan of the instance at registration, before setup.
    _count: int | torch.Tensor = 0
    _device_state: _DeviceCount | None = None

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
        sharded = [n for n in self.names if _is_sharded(tensors[n])]
        if sharded and self.config.device == "cpu":
            raise steadytrain.ConfigError(
                f"{self.id}.device: 'cpu' keeps the average on the host, but {sharded[0]!r}"
                f"{f' and {len(sharded) - 1} more' if len(sharded) > 1 else ''} are sharded "
                "across ranks (DTensors, as under FSDP2); a host copy of a shard can be "
                "neither checkpointed nor swapped in as the parameter. Set device = 'same': "
                "each rank then keeps the average of its own shards only"
            )
        self._model = run.model
        # Tied weights appear once in named_parameters() but under every name in the
        # model's state_dict; the export fills each of those names.
        everything = [*run.model.named_parameters(remove_duplicate=False),
                      *run.model.named_buffers(remove_duplicate=False)]
        index = {id(t): i for i, t in enumerate(self._targets)}
        self._aliases = {name: index[id(t)] for name, t in everything if id(t) in index}
        on_cpu = self.config.device == "cpu"
        with torch.no_grad():
            if on_cpu:
                self.shadow = [t.to("cpu", copy=True) for t in self._targets]
            else:
                self.shadow = [t.clone() for t in self._targets] if sharded else _copies(
                    [t.detach() for t in self._targets])
        # The average is elementwise: it runs on this rank's shards, which share storage
        # with the DTensors, without communication. Unsharded these are the same lists.
        self._local_targets, self._local_shadow = self._targets, self.shadow
        if sharded:
            self._local_targets = [_local(t) for t in self._targets]
            self._local_shadow = [_local(t) for t in self.shadow]
        moves = on_cpu and any(t.device.type != "cpu" for t in self._targets)
        self._staging = [torch.empty_like(t) for t in self.shadow] if moves else None
        current = self._staging or self._local_targets
        self._pairs = [
            _Pairs([self._local_shadow[i] for i in indices], [current[i] for i in indices],
                   owner=self.id)
            for indices in _by_kind(self._local_shadow).values()
        ]
        # Without the fused kernel a device-side flag is read on the host instead.
        self._on_device = all(pairs.fused for pairs in self._pairs)
        self._one_launch = all(pairs.triton for pairs in self._pairs)
        # FSDP2 gathers a parameter from its own storage, not from ``param.data``.
        self._by_pointer = self.config.swap == "auto" and not moves and not sharded
        self._backup: list[torch.Tensor] | None = None
        # A plain count while every skip decision is known on the host; a device tensor
        # once an update was masked by a device-side skip flag.
        self._count = 0
        self._swapped = False

    @property
    def num_updates(self) -> int:
        """Averaging updates applied so far (reads a device-side count once: may sync)."""
        if isinstance(self._count, torch.Tensor):
            self._count = int(self._count)
            self._device_state = None
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
        if self._staging is not None:
            torch._foreach_copy_(self._staging, self._local_targets)
        if skip is not None and not self._on_device:
            if bool(skip):
                return
            skip = None
        if skip is not None or isinstance(self._count, torch.Tensor):
            self._masked_update(skip)
        elif self._count == 0:
            for pairs in self._pairs:
                pairs.copy()
            self._count = 1
        else:
            decay = ema_decay(self.config.decay, self._count, warmup=self.config.warmup)
            for pairs in self._pairs:
                pairs.lerp(decay)
            self._count += 1

    def _masked_update(self, skip: torch.Tensor | None) -> None:
        """The update with its weight and the count on the device, skipped where *skip*."""
        state = self._device_state or self._start_device_state()
        if self._one_launch:
            # One launch a dtype; the first also counts and writes the next weight.
            flag = None if skip is None else skip.to(state.counts.device)
            for index, pairs in enumerate(self._pairs):
                pairs.launch(state.weights, flag, state.slot, state.count if index == 0 else None)
            state.slot ^= 1
            self._count = state.counters[0]
            return
        skipped = state.never if skip is None else skip.reshape(()).to(
            state.never.device, torch.float32)
        for pairs in self._pairs:
            pairs.masked_lerp(state.weight, skipped)
        _add_unless_(state.counters, state.ones, skipped)
        # Weight 1 until an update was applied (it copies), then at most 1 − decay: a lerp
        # with weight 0 or 1 returns one end exactly.
        torch.lerp(state.after_first, state.floor, skipped, out=state.floor)
        if self.config.warmup:
            # 1 − min(decay, (1 + n)/(10 + n)) = max(1 − decay, 9/(10 + n))
            torch.div(state.nine, state.counters[1], out=state.weight)
            torch.maximum(state.weight, state.floor, out=state.weight)
        self._count = state.counters[0]

    def _start_device_state(self) -> _DeviceCount:
        """The count, the weight of the next update and constants, filled on the device
        (a fill, not a copy from host memory) from the host's count."""
        count = self._count
        device = self._local_shadow[0].device

        def full(value: float, dtype: torch.dtype = torch.float32) -> torch.Tensor:
            return torch.full((), value, dtype=dtype, device=device)

        decay = self.config.decay
        weight = 1.0 if count == 0 else 1.0 - ema_decay(decay, count, warmup=self.config.warmup)
        counts = full(count, torch.float64).repeat(2)
        counts[1:] += 10  # a kernel on the device, not a copy from the host
        counters = list(counts.unbind()) if self.config.warmup else [counts[0]]
        floor = full(1.0 if count == 0 else 1.0 - decay)
        self._device_state = _DeviceCount(
            counts=counts, weights=torch.full((2,), weight, device=device),
            count=multi_tensor.Count(counts, 1.0 - decay, self.config.warmup),
            counters=counters, floor=floor, weight=full(weight) if self.config.warmup else floor,
            after_first=full(1.0 - decay), never=full(0.0),
            nine=full(9.0, torch.float64), ones=[full(1.0, torch.float64)] * len(counters))
        return self._device_state

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
            backup = self._staging or [torch.empty_like(t) for t in self._local_targets]
            torch._foreach_copy_(backup, self._local_targets)
            torch._foreach_copy_(self._local_targets, self._local_shadow)
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
            torch._foreach_copy_(self._local_targets, self._backup)
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
            if _layout(mine) != _layout(theirs):
                raise steadytrain.CheckpointError(
                    f"{self.id}: shadow of {name!r} is {_layout(theirs)} in the checkpoint "
                    f"but {_layout(mine)} here; load a sharded pipeline state with "
                    "steadytrain.adapters.distributed.load (torch.distributed.checkpoint "
                    "gives each rank its shards)"
                )
        averages = self._local_targets if self._swapped else self._local_shadow
        torch._foreach_copy_(averages, [_local(t) for t in saved])
        self._count = int(state["num_updates"])
        self._device_state = None
