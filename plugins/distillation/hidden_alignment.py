"""Hidden-state alignment: pull a student's hidden states towards a frozen teacher's, per layer.

What it does
    For every aligned layer ``i`` the loss is ``L_i = a·loss(s_i, t_i) + b·(1 − cos(s_i,
    t_i))``: ``loss`` measures the magnitude (MSE by default, any loss of
    :mod:`steadytrain.losses` by name), the cosine the direction, per token over the
    hidden (last) dimension, averaged over the tokens. The layers are combined by
    ``weighting``:

    * ``"uniform"``: ``mean_i L_i``;
    * ``"decay"``: ``Σ_i d^i·L_i / Σ_i d^i``, ``i = 0`` for the first aligned layer (``d``
      below 1 weighs the early layers more, above 1 the late ones);
    * ``"uncertainty"`` (Kendall et al. 2018): ``Σ_i exp(−s_i)·L_i + s_i`` with one
      learnable ``s_i`` per layer, starting at 0;
    * ``"softmax"``: ``Σ_i softmax(w/τ)_i·L_i`` with learnable ``w`` (starting at 1) and
      temperature ``τ`` (starting at 1): seed 002's adaptive layer weights. It collapses
      (see Caveats), and choosing it warns.

    The term is ``alignment``. Per layer, the metrics ``<id>/<loss>/<layer>`` (e.g.
    ``mse/2``: the magnitude loss), ``<id>/cosine/<layer>`` (the mean cosine similarity,
    1 when aligned) and ``<id>/weight/<layer>`` (the layer's factor in the sum,
    ``exp(−s_i)`` for ``"uncertainty"``) are recorded.

    Student states are ``outputs[student_key]``: a list or tuple (layers named ``"0"``,
    ``"1"``, …, like the ``hidden_states`` of a Hugging Face model, or the list that
    repeated ``steadytrain.report(student_key, h)`` calls build) or a mapping of layer
    names to tensors; or the outputs of the model's modules matching ``student_taps``
    (layers named by module). Teacher states are ``outputs[teacher_key]`` in the same
    forms, or the outputs of the modules matching ``teacher_taps`` of a teacher that the
    host binds with ``plugin.bind(teacher=module)``: the plugin runs it on the step's
    batch (``before_step(batch=...)``; a mapping is passed as keyword arguments) without
    grad. Student and teacher layers are paired by position (by name when both are
    mappings); ``include``/``exclude`` select layers by the student's names.

When to use it
    Training a modified model (the student: a replaced sublayer, an adapter, a pruned
    block) to behave like the original (the teacher) layer by layer, before or beside
    training on the task; feature distillation into a smaller student of the same depth.

Hyperparameters
    ``mse_weight`` a (0.8) and ``cosine_weight`` b (0.2), seed 002's defaults; ``loss``
    (``"mse"``) and ``loss_options`` (e.g. ``loss = "huber"``, ``loss_options = { delta =
    0.5 }``); ``weighting`` (``"uniform"``); ``decay`` d (0.9, for ``"decay"`` only).
    ``layers`` names the layers that ``outputs[student_key]`` will hold (``["0", "1",
    …]`` for a list): the learnable weightings need it when the states come from the
    outputs, because their parameters must exist for the optimizer before the first
    step. ``tap_element`` picks the hidden states out of a tapped module that returns a
    tuple. A curriculum is a schedule on the instance ``weight`` (docs/distillation.md).

Source
    Seed 002, "NPT loss function improvements": MSE plus cosine per layer, learnable
    softmax layer weights, a cosine curriculum, a gradient penalty, hidden-state
    temperature, focal and smooth-L1 variants. Its mistakes, and what this plugin does
    instead: the curriculum ``0.5·(1+cos(π·(1−p)))`` runs from 0 to 1, not from 0.5 as the
    text says (``cosine_warmup`` with ``start`` gives 0.5 → 1); dividing hidden states by
    a temperature before the MSE only rescales it by ``1/T²`` and the cosine not at all
    (temperature belongs to ``logit_distillation``); its gradient penalty is about 1e-14
    of the loss (``gradient_penalty`` has working ones); learnable softmax weights
    minimised with the loss collapse onto one layer. Uncertainty weighting: Kendall, Gal
    and Cipolla 2018, "Multi-Task Learning Using Uncertainty to Weigh Losses for Scene
    Geometry and Semantics" (``exp(−s_i)·L_i + s_i``, with ``s_i`` a log variance).

Caveats
    ``"softmax"`` weights trained jointly with the loss they weigh move all the weight to
    the layer with the smallest loss and drive the temperature towards 0: the other
    layers stop being aligned (a test shows it); the temperature is learnt as ``log τ``
    so that it stays positive. ``"uncertainty"`` settles at ``s_i = log L_i``, where the
    term is ``Σ_i (1 + log L_i)``: negative once the layer losses are small, so compare
    its per-layer metrics, not the term, across runs. The learnable weights are
    :meth:`parameters` of the plugin, created in ``setup`` on the model's device: add
    ``pipe.parameters()`` to the optimizer after ``setup`` (best without weight decay);
    an optimizer bound to the pipeline that holds none of them is an error at the first
    step, since they would never move. They are checkpointed with the pipeline (their
    optimizer state is in the optimizer's). A bound teacher costs one extra forward pass
    per micro-batch. Student and teacher states of a layer must have one shape; the
    states are compared in float32 at least.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import attrs
import torch

import steadytrain
from steadytrain.sources import at_least_float32
from steadytrain.validators import non_empty_str, non_negative, non_negative_int, one_of, optional
from steadytrain.validators import positive as positive_number

from .teacher import Teacher

WEIGHTINGS = ("uniform", "decay", "uncertainty", "softmax")
LEARNABLE = {"uncertainty": ("log_variances",), "softmax": ("layer_logits", "log_temperature")}
COLLAPSE_WARNING = (
    "weighting 'softmax' learns the layer weights by minimising the very loss they weigh: "
    "they collapse onto the layer with the smallest loss and the others stop being aligned; "
    "use 'uniform', 'decay' or 'uncertainty'"
)


def layer_loss(
    student: torch.Tensor,
    teacher: torch.Tensor,
    *,
    magnitude: steadytrain.losses.Loss,
    mse_weight: float = 0.8,
    cosine_weight: float = 0.2,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``a·magnitude(s, t) + b·(1 − cos(s, t))`` for one layer, with its two parts.

    Returns the layer loss, the magnitude loss and the mean cosine similarity; the
    cosine is taken per token over the last dimension.
    """
    s, t = at_least_float32(student), at_least_float32(teacher.detach())
    size = magnitude(s, t)
    distance = steadytrain.losses.Cosine()(s, t)
    return mse_weight * size + cosine_weight * distance, size, 1 - distance


def combine(
    losses: torch.Tensor,
    weighting: str,
    *,
    decay: float = 0.9,
    log_variances: torch.Tensor | None = None,
    layer_logits: torch.Tensor | None = None,
    log_temperature: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The layers' *losses* (one per layer) combined by *weighting*; and each layer's factor."""
    n = losses.shape[0]
    if weighting == "uniform":
        factors = losses.new_full((n,), 1.0 / n)
        return losses.mean(), factors
    if weighting == "decay":
        factors = decay ** torch.arange(n, dtype=losses.dtype, device=losses.device)
        factors = factors / factors.sum()
        return (factors * losses).sum(), factors
    if weighting == "uncertainty":
        factors = torch.exp(-log_variances)
        return (factors * losses + log_variances).sum(), factors
    if weighting == "softmax":
        factors = torch.softmax(layer_logits / log_temperature.exp(), dim=0)
        return (factors * losses).sum(), factors
    raise ValueError(f"weighting must be one of {', '.join(WEIGHTINGS)}, got {weighting!r}")


def _decay_only(inst: Any, attr: attrs.Attribute, value: float) -> None:
    positive_number(inst, attr, value)
    if inst.weighting != "decay" and value != attr.default:
        raise steadytrain.OptionError(
            attr.name, f"is used by weighting 'decay' only, and weighting is "
            f"{inst.weighting!r}; remove it or set weighting = 'decay'")


def _some_weight(inst: Any, attr: attrs.Attribute, value: float) -> None:
    non_negative(inst, attr, value)
    if value == 0 and inst.mse_weight == 0:
        raise steadytrain.OptionError(
            attr.name, "and mse_weight are both 0, so the alignment would be 0; give one a "
            "weight > 0")


class HiddenAlignment(steadytrain.Plugin):
    """Align the student's hidden states with a frozen teacher's, layer by layer (MSE + cosine)."""

    name = "hidden_alignment"

    @attrs.frozen
    class Config:
        mse_weight: float = attrs.field(default=0.8, validator=non_negative)
        cosine_weight: float = attrs.field(default=0.2, validator=_some_weight)
        loss: str = attrs.field(default="mse", validator=steadytrain.losses.known)
        loss_options: dict[str, float] = attrs.field(
            factory=dict, validator=steadytrain.losses.options_of("loss"))
        weighting: str = attrs.field(default="uniform", validator=one_of(*WEIGHTINGS))
        decay: float = attrs.field(default=0.9, validator=_decay_only)
        student_key: str = attrs.field(default="hidden_states", validator=non_empty_str)
        teacher_key: str = attrs.field(default="teacher_hidden_states", validator=non_empty_str)
        student_taps: tuple[str, ...] = ()
        teacher_taps: tuple[str, ...] = ()
        tap_element: int | None = attrs.field(default=None, validator=optional(non_negative_int))
        layers: tuple[str, ...] = ()

    def __init__(self, config: Any = None, **settings: Any) -> None:
        super().__init__(config, **settings)
        cfg = self.config
        if cfg.weighting == "softmax":
            warnings.warn(f"{self.id}.weighting: {COLLAPSE_WARNING}", UserWarning, stacklevel=2)
        self._magnitude = steadytrain.losses.get(cfg.loss, where=f"{self.id}.loss_options",
                                                 **cfg.loss_options)
        self._teacher = Teacher(self.id)
        self._student_modules: tuple[str, ...] = ()
        self._teacher_modules: tuple[str, ...] = ()
        self._names: tuple[str, ...] | None = None
        self._selected: list[int] = []
        self._learnable: dict[str, torch.nn.Parameter] = {}
        self._optimizer_checked = False

    def bind(self, *, teacher: torch.nn.Module) -> HiddenAlignment:
        """Run *teacher* (frozen: no parameter requires grad, eval mode) on every batch and
        read its states from the modules matching ``teacher_taps``."""
        self._teacher.bind(teacher)
        return self

    def parameters(self) -> list[torch.nn.Parameter]:
        """The learnable layer weights (``"uncertainty"``, ``"softmax"``), once set up."""
        return list(self._learnable.values())

    # -- setup: sources, layer names, learnable weights ------------------------------------

    @steadytrain.hookimpl
    def setup(self, run: steadytrain.Run) -> None:
        cfg = self.config
        self._teacher.check()
        if cfg.teacher_taps:
            self._teacher_modules = self._teacher.tap(cfg.teacher_taps, "teacher_taps")
        elif self._teacher.module is not None:
            raise steadytrain.ConfigError(
                f"{self.id}.teacher_taps: a teacher is bound but no teacher_taps say which of "
                "its modules give the hidden states; set teacher_taps (or pass the teacher's "
                f"states as outputs[{cfg.teacher_key!r}] and do not bind it)"
            )
        names: Sequence[str] | None = None
        if cfg.student_taps:
            if cfg.layers:
                raise steadytrain.ConfigError(
                    f"{self.id}.layers: names the layers of outputs[{cfg.student_key!r}], but "
                    "student_taps are set, so the layers are the tapped modules; remove layers"
                )
            self._student_modules = names = run.tap(self, cfg.student_taps)
            if self._teacher_modules and len(self._teacher_modules) != len(names):
                raise steadytrain.ConfigError(
                    f"{self.id}.teacher_taps: match {len(self._teacher_modules)} teacher modules "
                    f"and student_taps {len(names)} student modules; the layers are paired by "
                    "position, so the two must match as many"
                )
        elif cfg.layers:
            names = cfg.layers
        if names is not None:
            self._resolve(tuple(names))
        if cfg.weighting in LEARNABLE:
            if names is None:
                raise steadytrain.ConfigError(
                    f"{self.id}.layers: weighting {cfg.weighting!r} learns one weight per layer, "
                    "and the optimizer needs them before the first step; set layers to the "
                    f"names outputs[{cfg.student_key!r}] will have ('0', '1', … for a list) or "
                    "tap the layers with student_taps"
                )
            self._create_weights(run)

    def _create_weights(self, run: steadytrain.Run) -> None:
        params = list(run.model.parameters()) if run.model is not None else []
        device = params[0].device if params else torch.device("cpu")
        n = len(self._selected)
        starts = {"log_variances": torch.zeros(n), "layer_logits": torch.ones(n),
                  "log_temperature": torch.zeros(())}
        self._learnable = {name: torch.nn.Parameter(starts[name].to(device))
                           for name in LEARNABLE[self.config.weighting]}

    def _resolve(self, names: tuple[str, ...]) -> None:
        selected = set(self.filter.select(names, kind="layer"))
        self._names = names
        self._selected = [i for i, name in enumerate(names) if name in selected]

    # -- a step -----------------------------------------------------------------------------

    @steadytrain.hookimpl
    def compute_regularizers(self, ctx: steadytrain.StepContext) -> dict[str, torch.Tensor]:
        cfg = self.config
        students = self._student_states(ctx)
        teachers = self._teacher_states(ctx)
        self._pair(students, teachers)
        names = tuple(str(i) if name is None else name for i, (name, _) in enumerate(students))
        if self._names is None:
            self._resolve(names)
        elif names != self._names:
            raise steadytrain.ConfigError(
                f"{self.id}: the student's layers are {list(names)}, but "
                f"{'layers says' if self.config.layers else 'were'} {list(self._names)}; every "
                "step must bring the same layers"
            )
        self._check_optimizer(ctx)
        totals, sizes, cosines = [], [], []
        for index in self._selected:
            name, student, teacher = names[index], students[index][1], teachers[index][1]
            if student.shape != teacher.shape:
                raise steadytrain.ConfigError(
                    f"{self.id}: layer {name!r}: the student's hidden states have shape "
                    f"{tuple(student.shape)} and the teacher's {tuple(teacher.shape)}; paired "
                    "layers must have one shape (project the student's states, or pair other "
                    "layers)"
                )
            total, size, cosine = layer_loss(
                student, teacher, magnitude=self._magnitude, mse_weight=cfg.mse_weight,
                cosine_weight=cfg.cosine_weight)
            totals.append(total)
            sizes.append(size)
            cosines.append(cosine)
        alignment, factors = combine(torch.stack(totals), cfg.weighting, decay=cfg.decay,
                                     **self._learnable)
        for index, size, cosine, factor in zip(self._selected, sizes, cosines, factors.unbind(),
                                               strict=True):
            name = self._names[index]
            ctx.log(f"{cfg.loss}/{name}", size)
            ctx.log(f"cosine/{name}", cosine)
            ctx.log(f"weight/{name}", factor)
        return {"alignment": alignment}

    def _check_optimizer(self, ctx: steadytrain.StepContext) -> None:
        if self._optimizer_checked or not self._learnable or not ctx.optimizers:
            return
        held = {id(p) for opt in ctx.optimizers for group in opt.param_groups
                for p in group["params"]}
        if not any(id(p) in held for p in self._learnable.values()):
            raise steadytrain.ConfigError(
                f"{self.id}.weighting: the learnable layer weights of {self.config.weighting!r} "
                "are in none of the optimizers, so they would never change; add them after "
                "setup: optimizer.add_param_group({'params': list(pipe.parameters()), "
                "'weight_decay': 0.0})"
            )
        self._optimizer_checked = True

    def _pair(self, students: list[tuple[str | None, Any]],
              teachers: list[tuple[str | None, Any]]) -> None:
        """Refuse layers that cannot be paired: other counts, or other names (mappings)."""
        cfg = self.config
        where = {
            "student": f"student_taps {list(cfg.student_taps)}" if cfg.student_taps
            else f"outputs[{cfg.student_key!r}]",
            "teacher": f"teacher_taps {list(cfg.teacher_taps)}" if cfg.teacher_taps
            else f"outputs[{cfg.teacher_key!r}]",
        }
        if len(students) != len(teachers):
            raise steadytrain.ConfigError(
                f"{self.id}: the student has {len(students)} hidden-state layers "
                f"({where['student']}) and the teacher {len(teachers)} ({where['teacher']}); "
                "the layers are paired by position, so both must give as many"
            )
        student_keys = [name for name, _ in students]
        teacher_keys = [name for name, _ in teachers]
        if None not in student_keys + teacher_keys and student_keys != teacher_keys:
            raise steadytrain.ConfigError(
                f"{self.id}: the student's layers are {student_keys} and the teacher's "
                f"{teacher_keys}; layers given as mappings are paired by name, in one order"
            )

    def _student_states(self, ctx: steadytrain.StepContext) -> list[tuple[str, torch.Tensor]]:
        cfg = self.config
        if cfg.student_taps:
            return [(name, self._tapped(name, ctx.tapped(name, option="student_taps"),
                                        "student_taps")) for name in self._student_modules]
        return self._listed(ctx.output(cfg.student_key, option="student_key"), "student_key")

    def _teacher_states(
        self, ctx: steadytrain.StepContext
    ) -> list[tuple[str | None, torch.Tensor]]:
        cfg = self.config
        if cfg.teacher_taps:
            _, captured = self._teacher.run(ctx.batch)
            return [(None, self._tapped(name, captured.get(name, []), "teacher_taps"))
                    for name in self._teacher_modules]
        return self._listed(ctx.output(cfg.teacher_key, option="teacher_key"), "teacher_key")

    def _listed(self, value: Any, option: str) -> list[tuple[str | None, torch.Tensor]]:
        """The layers of an outputs entry: ``(key, states)`` of a mapping, ``(None, states)``
        of a list (named by position)."""
        key = getattr(self.config, option)
        if isinstance(value, Mapping):
            items = [(str(name), state) for name, state in value.items()]
        elif isinstance(value, (list, tuple)):
            items = [(None, state) for state in value]
        else:
            raise steadytrain.ConfigError(
                f"{self.id}.{option}: outputs[{key!r}] must be a list of hidden states (one "
                f"per layer) or a mapping of layer names to them, got {type(value).__name__}"
            )
        for index, (name, state) in enumerate(items):
            self._require_states(state, f"outputs[{key!r}][{name or index!r}]", option)
        return items

    def _tapped(self, module: str, calls: list[Any], option: str) -> torch.Tensor:
        if len(calls) != 1:
            raise steadytrain.ConfigError(
                f"{self.id}.{option}: module {module!r} ran {len(calls)} times in this forward "
                "pass; tap modules that run once per forward pass"
            )
        output, index = calls[0], self.config.tap_element
        if isinstance(output, (tuple, list)):
            if index is None or index >= len(output):
                raise steadytrain.ConfigError(
                    f"{self.id}.tap_element: module {module!r} returns a "
                    f"{type(output).__name__} of {len(output)} items; set tap_element to the "
                    "index of the hidden states"
                )
            output = output[index]
        elif index is not None:
            raise steadytrain.ConfigError(
                f"{self.id}.tap_element: module {module!r} returns a single "
                f"{type(output).__name__}, not a tuple; remove tap_element"
            )
        self._require_states(output, f"module {module!r}", option)
        return output

    def _require_states(self, value: Any, label: str, option: str) -> None:
        if not isinstance(value, torch.Tensor) or not value.is_floating_point() or (
            value.dim() < 1
        ):
            got = (f"a {value.dtype} tensor of shape {tuple(value.shape)}"
                   if isinstance(value, torch.Tensor) else f"a {type(value).__name__}")
            raise steadytrain.ConfigError(
                f"{self.id}.{option}: {label} must be a floating-point tensor of hidden "
                f"states (…, hidden), got {got}"
            )

    # -- lifecycle and checkpoints ----------------------------------------------------------

    @steadytrain.hookimpl
    def teardown(self) -> None:
        self._teacher.remove_taps()

    def state_dict(self) -> dict[str, Any]:
        return {name: p.detach().clone() for name, p in self._learnable.items()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.check_state(state, self._learnable)
        for name, param in self._learnable.items():
            saved = state[name]
            if not isinstance(saved, torch.Tensor) or saved.shape != param.shape:
                raise steadytrain.CheckpointError(
                    f"plugin instance {self.id!r} ({self.name}): the checkpoint's {name} is "
                    f"not a tensor of shape {tuple(param.shape)} (one per aligned layer); were "
                    "the layers or the filters changed?"
                )
        with torch.no_grad():
            for name, param in self._learnable.items():
                param.copy_(state[name])

    @classmethod
    def conformance_fixture(cls) -> steadytrain.testing.Fixture:
        """The conformance kit trains a student whose frozen teacher reports its outputs."""
        from steadytrain.testing import distillation_fixture

        return distillation_fixture()
