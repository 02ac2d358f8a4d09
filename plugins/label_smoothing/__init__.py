"""Label smoothing as a regularizer term on top of the host's plain cross-entropy.

What it does
    Label-smoothed cross-entropy mixes the one-hot target with the uniform distribution
    over the C classes: ``CE_ε = (1 − ε)·CE + ε·mean_k(−log p_k)``. Hence
    ``CE_ε = CE + ε·(mean_k(−log p_k) − CE)``, and this plugin returns the second part,
    averaged over the tokens whose target is not ``ignore_index``. Added with weight 1 to
    ``F.cross_entropy(logits, targets, ignore_index=i)`` (mean reduction), it gives exactly
    ``F.cross_entropy(logits, targets, ignore_index=i, label_smoothing=ε)``, so a host
    switches label smoothing on from the config without touching its loss. Since
    ``log p_y − mean_k log p_k = x_y − mean_k x_k`` (the log-sum-exp cancels), the term is
    computed from the raw logits ``x`` as ``ε·mean(x_y − mean_k x_k)``: no second softmax,
    one read of the logits.

When to use it
    Over-confident logits make the loss of a language model spike on rare tokens; a little
    smoothing (ε = 0.1) bounds the target logit margin and steadies the loss.

Hyperparameters
    ``smoothing`` ε (default 0.1, the source's value). Keep the instance's ``weight`` at
    1 (the default): the term is linear in ε, so the effective smoothing is
    ``weight · smoothing`` — a weight schedule is a smoothing schedule, and any other
    constant weight smooths by a different ε than configured. ``ignore_index`` (default
    -100, as in ``F.cross_entropy``). ``logits_key`` (default ``"logits"``) names the
    output that holds the logits; ``logits_module`` (default: none), the name of a module
    of the model (``"lm_head"``), takes them from that module's output instead (see
    Caveats); ``targets_key`` (default: none) names the entry of the
    host's ``targets`` mapping that holds the class indices — without it the targets are
    the tensor the host passed to ``before_step(targets=...)``. ``class_dim`` (default -1,
    the layout of language-model logits ``(batch, seq, C)``; set 1 for the
    ``(batch, C, ...)`` layout that ``F.cross_entropy`` takes). ``check`` (default
    ``"auto"``) says when the targets' values are checked: every target must be a class
    (0 … C − 1) or ``ignore_index``. The check reads the targets' extremes, one host
    sync: ``"auto"`` checks every step on the CPU, where that costs nothing, and the
    first step elsewhere; ``"every_step"``, ``"first_step"`` and ``"never"`` force a
    policy.

Source
    The memory-model stability document (seed 000), section 5 "Loss Function
    Modifications" (``smoothing=0.1``); Szegedy et al. 2016, "Rethinking the Inception
    Architecture for Computer Vision".

Caveats
    The equality holds for the mean-reduced cross-entropy without class weights. The
    source builds the smoothed target by scattering into ``targets`` (which fails on
    ``ignore_index`` entries) and uses the KL divergence, which differs from ``CE_ε`` by
    the constant entropy of the smoothed target: same gradients, a shifted loss value.
    The logits and targets are used as given: shift them for next-token prediction
    before passing them. A batch in which every target is ignored gives a term of 0.
    A negative target that is not ``ignore_index`` (``-100`` when the host ignores
    ``-1``, or the other way round) is an error naming ``ignore_index``; a host that
    ignores a valid class (padding id 0, say) while ``ignore_index`` keeps its default
    cannot be told apart from a target of that class: set ``ignore_index`` to the host's.
    Targets that are checked only on the first step (``check = "auto"`` on an
    accelerator) can still go out of range later, where the host's own
    ``F.cross_entropy`` fails on them too.
    On logits that a model made (not a leaf tensor) the term registers a hook on them:
    its backward hands the autograd engine the share of the gradient that every class
    gets as a broadcast, and the hook adds the target classes' share into the summed
    gradient in place, so the gradient costs one pass over the logits' gradient, as with
    torch's own ``label_smoothing=`` (docs/benchmarks.md). Where nothing else reads the
    logits, there is no gradient to add the broadcast to. Logits that are a converted
    copy (made by ``Tensor.to``) hand the broadcast to the copy's backward, which
    converts it to the source's dtype reading one value per target, and a hook on that
    conversion adds the target classes' share. That is the case of a Hugging Face model
    trained under Accelerate's mixed precision: its loss is computed inside the forward
    pass, on autocast's float32 copy of the bf16 logits, and the outputs the Trainer
    hands over hold another float32 copy, made after the forward pass, which only the
    term reads. Other logits that only the term reads get its gradient written out
    whole: on CUDA, where Triton kernels run (``steadytrain.kernels.triton_runs_on``), by
    one kernel at about the speed of a copy, elsewhere by torch's strided copy and a
    scatter. ``logits_module`` set to the module that makes the logits (``"lm_head"``)
    has the term read that module's output, which the host's loss reads too. A hook
    that the host registers on the logits before the term is computed sees their
    gradient without that share.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import attrs
import torch
from torch.autograd.function import once_differentiable

import steadytrain
from steadytrain.sources import CHECKS, at_least_float32, check_due
from steadytrain.validators import in_range, non_empty_str, one_of, optional

from . import gradient_kernel


def label_smoothing_term(
    logits: torch.Tensor,
    targets: torch.Tensor,
    smoothing: float = 0.1,
    ignore_index: int = -100,
    class_dim: int = -1,
    *,
    check_targets: bool = False,
) -> torch.Tensor:
    """``ε·(mean_k(−log p_k) − CE)`` averaged over the targets that are not *ignore_index*.

    Computed as ``ε·(x_y − mean_k x_k)`` on the logits ``x``, which is the same quantity.

    ``F.cross_entropy(x, y, ignore_index=i) + label_smoothing_term(x, y, ε, i, class_dim)``
    equals ``F.cross_entropy(x, y, ignore_index=i, label_smoothing=ε)`` with the class
    dimension of *logits* at *class_dim*. A layout that does not fit raises
    :class:`steadytrain.OptionError` naming the argument; with *check_targets*, so does
    a target that is neither a class nor *ignore_index* (one host sync).
    """
    shape = tuple(logits.shape)
    if logits.dim() < 1 or not -logits.dim() <= class_dim < logits.dim():
        raise steadytrain.OptionError(
            "class_dim", f"{class_dim} is out of range for logits of shape {shape}"
        )
    per_target = shape[:class_dim] + shape[class_dim:][1:]
    if targets.dtype.is_floating_point or targets.dtype.is_complex or targets.dtype == torch.bool:
        raise steadytrain.OptionError(
            "targets", f"must be class indices (an integer tensor), got {targets.dtype}; "
            "class-probability targets are not supported"
        )
    if tuple(targets.shape) != per_target:
        raise steadytrain.OptionError(
            "class_dim",
            f"targets of shape {tuple(targets.shape)} do not fit logits of shape {shape} "
            f"with the classes in dimension {class_dim} (the targets must have shape "
            f"{per_target}); set class_dim to where the classes are",
        )
    if check_targets:
        _check_targets(targets, shape, ignore_index, class_dim)
    class_dim %= logits.dim()
    # Logits made by a model (not a leaf) get the gradient of their target classes through
    # a hook (see _TargetShare); a leaf keeps its hooks for good, so it gets all at once.
    targeted = None
    if logits.requires_grad and logits.grad_fn is not None:
        converted = isinstance(logits.grad_fn, _CONVERSION)
        targeted = _TargetShare(class_dim, converted=converted)
        logits.register_hook(targeted)
        if converted:
            logits.grad_fn.register_hook(targeted.after_conversion)
    return _Smoothing.apply(logits, targets, smoothing, ignore_index, class_dim, targeted)


#: The autograd node of ``Tensor.to``: logits made by it are a copy in another dtype (the
#: float32 outputs of a model under Accelerate's mixed precision).
_CONVERSION = getattr(torch._C._functions, "ToCopyBackward0", ())


class _TargetShare:
    """The share ``ε·g/n`` of the gradient that goes to each kept target's class.

    The rest of the term's gradient, ``−ε·g/(n·C)`` for every class, is a broadcast that
    the autograd engine adds to the logits' other gradients (the host's cross-entropy)
    in one pass, as in torch's own label-smoothed cross-entropy. A dense gradient with
    the targets' share in it would cost a pass to write it and an addition reading both
    gradients: twice the traffic. So a hook on the logits adds the targets' share, one
    element per target, into the summed gradient in place. The engine hands the hook
    the sum it made, which nothing else holds; when the term is the logits' only
    consumer, the hook gets the broadcast itself and writes the whole gradient out.

    Logits that are a converted copy (*converted*: made by ``Tensor.to``, as a model's
    float32 outputs are under Accelerate's mixed precision) and read by the term alone
    keep the broadcast: the copy's backward converts it, reading one value per target,
    and :meth:`after_conversion` adds the targets' share into what it wrote. Written out
    in float32 first, the gradient would cost a pass at twice the bytes and the
    conversion a second read of them.
    """

    def __init__(self, class_dim: int, *, converted: bool = False) -> None:
        self.class_dim, self.converted = class_dim, converted
        self.pending: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
        self.deferred: tuple[torch.Tensor, torch.Tensor] | None = None

    def __call__(self, grad: torch.Tensor) -> torch.Tensor | None:
        pending, self.pending = self.pending, None
        if pending is None:  # this backward did not pass through the term
            return None
        index, share, broadcast = pending
        if grad.data_ptr() == broadcast.data_ptr():
            if self.converted:
                self.deferred = index, share
                return None
            return _whole_gradient(grad, self.class_dim, index, share)
        return grad.scatter_add_(self.class_dim, index, share.to(grad.dtype))

    def after_conversion(
        self, grad_inputs: tuple[torch.Tensor | None, ...], _grad_outputs: tuple[Any, ...]
    ) -> tuple[torch.Tensor | None, ...] | None:
        """The post-hook of the conversion's backward: the targets' share added to the
        gradient it wrote, when the term alone read the copy."""
        deferred, self.deferred = self.deferred, None
        converted = grad_inputs[0]
        if deferred is None or converted is None:
            return None
        index, share = deferred
        if not converted.is_contiguous():  # a copy without a dtype change kept the broadcast
            converted = converted.contiguous()
        converted.scatter_add_(self.class_dim, index, share.to(converted.dtype))
        return (converted, *grad_inputs[1:])


def _whole_gradient(
    broadcast: torch.Tensor, class_dim: int, index: torch.Tensor, share: torch.Tensor
) -> torch.Tensor:
    """The term's gradient written out: the *broadcast* share of every class with each
    target's *share* added at *index*; one Triton pass on CUDA where it can."""
    if gradient_kernel.available(broadcast, class_dim):
        return gradient_kernel.smoothing_gradient(broadcast.shape, broadcast.dtype, share,
                                                  index)
    return broadcast.contiguous().scatter_add_(class_dim, index, share.to(broadcast.dtype))


class _Smoothing(torch.autograd.Function):
    """``ε·mean(x_y − mean_k x_k)`` over the kept targets, without a float32 copy of the
    logits ``x``, and its gradient ``ε·g·(onehot(y) − 1/C)/n`` per kept target."""

    @staticmethod
    def forward(
        ctx: Any, logits: torch.Tensor, targets: torch.Tensor, smoothing: float,
        ignore_index: int, class_dim: int, targeted: _TargetShare | None,
    ) -> torch.Tensor:
        moved = logits.movedim(class_dim, -1)
        valid = targets != ignore_index
        safe = torch.where(valid, targets, 0)
        picked = moved.gather(-1, safe.unsqueeze(-1)).squeeze(-1)
        # log p_y − mean_k log p_k = x_y − mean_k x_k: the log-sum-exp cancels, so the
        # term needs no softmax; the mean accumulates in float32 as it reads the logits
        mean = moved.mean(-1, dtype=torch.promote_types(moved.dtype, torch.float32))
        count = valid.sum().clamp_min(1)
        ctx.save_for_backward(safe, valid, count)
        ctx.smoothing, ctx.class_dim, ctx.targeted = smoothing, class_dim, targeted
        ctx.shape, ctx.dtype = logits.shape, logits.dtype
        per_target = torch.where(valid, at_least_float32(picked) - mean, 0.0)
        return smoothing * per_target.sum() / count

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        safe, valid, count = ctx.saved_tensors
        dim = ctx.class_dim
        share = (grad * ctx.smoothing * valid / count).unsqueeze(dim)  # d term / d x_y
        index = safe.unsqueeze(dim)
        classes = ctx.shape[dim]
        logits_grad = (-share / classes).to(ctx.dtype).expand(ctx.shape)
        if ctx.targeted is not None:
            ctx.targeted.pending = (index, share, logits_grad)
        else:
            logits_grad = _whole_gradient(logits_grad, dim, index, share)
        return logits_grad, None, None, None, None, None


def _check_targets(
    targets: torch.Tensor, shape: tuple[int, ...], ignore_index: int, class_dim: int
) -> None:
    """Raise unless every target is a class of logits of *shape* or *ignore_index*; one
    host sync."""
    classes = shape[class_dim]
    if targets.numel() == 0:
        return
    kept = torch.where(targets == ignore_index, 0, targets)
    low, high = torch.stack([kept.min(), kept.max()]).tolist()
    if low < 0:
        raise steadytrain.OptionError(
            "ignore_index",
            f"the targets hold {low}, which is neither a class (0 … {classes - 1}) nor "
            f"ignore_index ({ignore_index}); set ignore_index to the value the host's loss "
            "ignores (-100 is F.cross_entropy's default)",
        )
    if high >= classes:
        raise steadytrain.OptionError(
            "class_dim",
            f"the targets hold {high}, but the logits have {classes} classes "
            f"(0 … {classes - 1}) in dimension {class_dim} of shape {shape}; every target "
            f"must be a class or ignore_index ({ignore_index})",
        )


class LabelSmoothing(steadytrain.Plugin):
    """The term that turns the host's cross-entropy into label-smoothed cross-entropy."""

    name = "label_smoothing"
    #: It acts on the logits and targets as a whole: there is nothing to select.
    uses_filter = False

    @attrs.frozen
    class Config:
        smoothing: float = attrs.field(
            default=0.1, validator=in_range(0.0, 1.0, include_low=True, include_high=True)
        )
        ignore_index: int = -100
        logits_key: str = attrs.field(default="logits", validator=non_empty_str)
        logits_module: str | None = attrs.field(default=None, validator=optional(non_empty_str))
        targets_key: str | None = attrs.field(default=None, validator=optional(non_empty_str))
        class_dim: int = -1
        check: str = attrs.field(default="auto", validator=one_of(*CHECKS))

    @steadytrain.hookimpl
    def setup(self, run: steadytrain.Run) -> None:
        self._checked = False
        self._module = None
        name = self.config.logits_module
        if name is not None:
            matched = run.tap(self, name, option="logits_module")
            if len(matched) != 1:
                raise steadytrain.ConfigError(
                    f"{self.id}.logits_module: {name!r} matches {len(matched)} modules "
                    f"({', '.join(matched)}); name the one module whose output are the logits"
                )
            self._module = matched[0]

    @steadytrain.hookimpl
    def compute_regularizers(self, ctx: steadytrain.StepContext) -> dict[str, torch.Tensor]:
        config = self.config
        logits = self._logits(ctx)
        targets = self._targets(ctx)
        check = check_due(self.config.check, targets, checked=self._checked)
        try:
            term = label_smoothing_term(
                logits, targets, config.smoothing, config.ignore_index, config.class_dim,
                check_targets=check,
            )
        except steadytrain.OptionError as exc:
            # The function's targets argument is what targets_key selects here.
            option = "targets_key" if exc.option == "targets" else exc.option
            raise steadytrain.ConfigError(f"{self.id}.{option}: {exc.message}") from None
        self._checked = self._checked or check
        return {"smoothing": term}

    def _logits(self, ctx: steadytrain.StepContext) -> torch.Tensor:
        if self._module is not None:
            calls = ctx.tapped(self._module, option="logits_module")
            if len(calls) != 1:
                raise steadytrain.ConfigError(
                    f"{self.id}.logits_module: module {self._module!r} ran {len(calls)} times "
                    "in this forward pass, but the term takes the logits of one call; name the "
                    "module that makes them once, or pass them as an output (logits_key)"
                )
            logits, where = calls[0], f"the output of module {self._module!r}"
            option = "logits_module"
        else:
            key = self.config.logits_key
            logits, where = ctx.output(key, option="logits_key"), f"outputs[{key!r}]"
            option = "logits_key"
        if not isinstance(logits, torch.Tensor):
            raise steadytrain.ConfigError(
                f"{self.id}.{option}: {where} is a {type(logits).__name__}, not a tensor"
            )
        return logits

    def _targets(self, ctx: steadytrain.StepContext) -> torch.Tensor:
        key, targets = self.config.targets_key, ctx.targets
        if key is None:
            if isinstance(targets, Mapping):
                raise steadytrain.ConfigError(
                    f"{self.id}.targets_key: the targets are a mapping with keys "
                    f"{', '.join(map(str, targets))}; set targets_key to the one that holds "
                    "the class indices"
                )
            where = "targets"
        else:
            if not isinstance(targets, Mapping) or key not in targets:
                present = (", ".join(map(str, targets)) if isinstance(targets, Mapping)
                           else f"not a mapping but a {type(targets).__name__}")
                raise steadytrain.ConfigError(
                    f"{self.id}.targets_key: no entry {key!r} in the step's targets "
                    f"({present}); pass before_step(targets={{{key!r}: labels}}) or fix "
                    "targets_key"
                )
            targets, where = targets[key], f"targets[{key!r}]"
        if not isinstance(targets, torch.Tensor):
            raise steadytrain.ConfigError(
                f"{self.id}.targets_key: the step's {where} is a {type(targets).__name__}, "
                "not a tensor of class indices; pass before_step(targets=...)"
            )
        return targets

    @classmethod
    def conformance_fixture(cls) -> steadytrain.testing.Fixture:
        """On the CPU the kit checks the targets on the first step only, as on an accelerator."""
        from steadytrain.testing import Fixture

        return Fixture(cpu_options={"check": "first_step"})
