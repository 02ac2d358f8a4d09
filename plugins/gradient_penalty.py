"""Gradient penalty: R1 on a tensor the host marks, or WGAN-GP through a critic it binds.

What it does
    Penalizes how steeply a function changes with its input, by differentiating it with
    ``torch.autograd.grad(..., create_graph=True)`` inside the step, so that the penalty's
    own gradient reaches the parameters through the host's one ordinary backward.

    ``mode = "r1"`` (Mescheder et al. 2018; Drucker and LeCun's double backpropagation):
    ``mean_b ‖∂f(x)/∂x_b‖²`` over the samples ``b`` (dimension 0) of a tensor ``x`` the
    host marks with ``x.requires_grad_()`` before the forward pass and passes (or reports)
    as ``outputs[input_key]``, and ``f(x)`` passed as ``outputs[output_key]`` (a
    discriminator's scores on real data, a model's logits; summed before
    differentiating). ``x`` may be any tensor of the graph, e.g. the embedding output of a
    language model.

    ``mode = "wgan_gp"`` (Gulrajani et al. 2017): ``mean_b (‖∂D(x̂)/∂x̂_b‖ − 1)²`` at
    ``x̂ = ε·real + (1 − ε)·fake``, one ``ε ~ U[0, 1]`` per sample, with ``real`` and
    ``fake`` from ``outputs[real_key]`` and ``outputs[fake_key]`` (detached: the penalty
    trains the critic only) and ``D`` the critic the host binds with
    ``plugin.bind(critic=D)``. ``ε`` comes from the instance's own generator (``seed``),
    which is checkpointed.

    The term is ``penalty``; ``<id>/grad_norm`` is the mean per-sample gradient norm.

When to use it
    Discriminators and critics (R1 on real data for GANs, WGAN-GP for Wasserstein
    critics), and models whose output should not swing with small input changes
    (input-gradient regularization for robustness). Not to smooth an alignment loss:
    see Caveats.

Hyperparameters
    The instance ``weight`` is the penalty's λ: R1 is usually written ``γ/2·‖∇‖²``
    (so ``weight = γ/2``; γ 10 in Mescheder et al. for many image GANs, far smaller for
    some data sets), WGAN-GP uses λ = 10. ``mode`` (``"r1"``), ``input_key``
    (``"inputs"``) and ``output_key`` (``"scores"``) for R1; ``real_key`` (``"real"``),
    ``fake_key`` (``"fake"``), ``target_norm`` (1.0, the Lipschitz constant aimed at) and
    ``seed`` (0) for WGAN-GP. Options of the other mode are refused.

Source
    Seed 002 proposes a "gradient penalty inspired by WGAN-GP" for teacher–student
    hidden-state alignment: the gradient of ``MSE(x̂, teacher)`` with respect to
    ``x̂ = α·student + (1 − α)·teacher``, squared and averaged. That gradient is
    ``2α·(student − teacher)/N`` per element for ``N`` elements, so the penalty is
    ``4α²·MSE/N²``: about 1e-14 of the loss for hidden states of 8×512×4096 elements, a
    no-op at any weight one would set (measured in ``tests/plugins/test_gradient_penalty.py``),
    and it has no critic whose smoothness it could control. This plugin implements the
    penalties the idea comes from: Gulrajani et al. 2017, "Improved Training of
    Wasserstein GANs"; Mescheder, Geiger and Nowozin 2018, "Which Training Methods for
    GANs do actually Converge?"; Drucker and LeCun 1992, "Improving generalization
    performance using double backpropagation".

Caveats
    Cost: the penalty differentiates through the function (and the host's backward
    then differentiates that gradient once more: a double backward). Measured by
    ``benchmarks/bench_gradient_penalty.py`` on a 2-core CPU (an MLP critic of width 512,
    batch 256), a step takes 1.5–1.7 times as long with R1 and 1.9–2.2 times with WGAN-GP
    (``docs/gradient_penalty.md``); memory grows by the gradient's graph. Every
    operation between the input and the output must be twice differentiable: some fused
    kernels are not (e.g. the flash and memory-efficient attention backends of
    ``scaled_dot_product_attention``; use the math backend inside the critic). The host
    calls a plain ``loss.backward()``: the plugin builds the gradient's graph itself, with
    ``autograd.grad(create_graph=True)`` in ``compute_regularizers``, and that backward
    differentiates through it. So the class leaves ``needs_create_graph`` off: that flag
    asks the host for ``backward(create_graph=True)``, which would make every parameter
    gradient differentiable too (more memory, and a reference cycle between the
    parameters and their gradients) for nothing. A marked input that does not require
    grad, or an output that does not depend on it, is an error.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import attrs
import torch

import steadytrain
from steadytrain.sources import at_least_float32
from steadytrain.validators import non_empty_str, non_negative, non_negative_int, one_of

MODES = ("r1", "wgan_gp")
#: The options each mode reads; setting one that the configured mode ignores is an error.
MODE_OPTIONS = {"r1": ("input_key", "output_key"),
                "wgan_gp": ("real_key", "fake_key", "target_norm", "seed")}


def input_gradient_norms(output: Any, input: torch.Tensor) -> torch.Tensor | None:
    """Per-sample norms ``‖∂ Σ output / ∂ input_b‖`` over dimension 0 of *input*, with the
    graph kept for the host's backward; ``None`` when *output* does not depend on *input*."""
    if not (isinstance(output, torch.Tensor) and output.requires_grad):
        return None
    (grad,) = torch.autograd.grad(output.sum(), input, create_graph=True, allow_unused=True)
    if grad is None:
        return None
    return torch.linalg.vector_norm(at_least_float32(grad).flatten(1), dim=1)


def interpolate(
    real: torch.Tensor, fake: torch.Tensor, generator: torch.Generator | None = None
) -> torch.Tensor:
    """``ε·real + (1 − ε)·fake``, one ``ε ~ U[0, 1]`` per sample, detached from both and
    requiring grad."""
    eps = torch.rand((real.shape[0],) + (1,) * (real.dim() - 1), generator=generator,
                     device=real.device, dtype=real.dtype)
    return torch.lerp(fake.detach(), real.detach(), eps).requires_grad_(True)


def r1_penalty(output: torch.Tensor, input: torch.Tensor) -> torch.Tensor:
    """``mean_b ‖∂ Σ output / ∂ input_b‖²`` over dimension 0 of *input* (R1)."""
    norms = input_gradient_norms(output, input)
    if norms is None:
        raise ValueError("the output does not depend on the input")
    return norms.square().mean()


def wgan_gp_penalty(
    critic: Callable[[torch.Tensor], torch.Tensor],
    real: torch.Tensor,
    fake: torch.Tensor,
    *,
    target_norm: float = 1.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """``mean_b (‖∂D(x̂)/∂x̂_b‖ − target_norm)²`` at ``x̂ = ε·real + (1 − ε)·fake``."""
    mixed = interpolate(real, fake, generator)
    norms = input_gradient_norms(critic(mixed), mixed)
    if norms is None:
        raise ValueError("the critic's output does not depend on its input")
    return (norms - target_norm).square().mean()


def _mode_options(inst: Any, _attr: attrs.Attribute, mode: str) -> None:
    defaults = {f.name: f.default for f in attrs.fields(type(inst))}
    for other, options in MODE_OPTIONS.items():
        if other == mode:
            continue
        for option in options:
            if getattr(inst, option) != defaults[option]:
                raise steadytrain.OptionError(
                    option, f"is an option of mode {other!r}, but mode is {mode!r}; remove it "
                    f"or set mode = {other!r}"
                )


class GradientPenalty(steadytrain.Plugin):
    """Penalize input gradients: R1 on a marked tensor, or WGAN-GP through a bound critic."""

    name = "gradient_penalty"
    uses_filter = False

    @attrs.frozen
    class Config:
        # Its validator runs once every option is set (attrs validates after assigning).
        mode: str = attrs.field(default="r1", validator=[one_of(*MODES), _mode_options])
        input_key: str = attrs.field(default="inputs", validator=non_empty_str)
        output_key: str = attrs.field(default="scores", validator=non_empty_str)
        real_key: str = attrs.field(default="real", validator=non_empty_str)
        fake_key: str = attrs.field(default="fake", validator=non_empty_str)
        target_norm: float = attrs.field(default=1.0, validator=non_negative)
        seed: int = attrs.field(default=0, validator=non_negative_int)

    def __init__(self, config: Any = None, **settings: Any) -> None:
        super().__init__(config, **settings)
        self._critic: Callable[[torch.Tensor], torch.Tensor] | None = None
        self._generator: torch.Generator | None = None
        self._saved_rng: tuple[torch.Tensor, str] | None = None

    def bind(self, *, critic: Callable[[torch.Tensor], torch.Tensor]) -> GradientPenalty:
        """Give mode ``"wgan_gp"`` its critic ``D``: a module or function of one tensor."""
        if not callable(critic):
            raise steadytrain.ConfigError(
                f"{self.id}: bind(critic=...) needs a module or function that maps a batch to "
                f"scores, got {type(critic).__name__}"
            )
        self._critic = critic
        return self

    @steadytrain.hookimpl
    def setup(self, run: steadytrain.Run) -> None:
        mode = self.config.mode
        if mode == "wgan_gp" and self._critic is None:
            raise steadytrain.ConfigError(
                f"{self.id}.mode: 'wgan_gp' differentiates a critic at interpolations of "
                f"outputs[{self.config.real_key!r}] and outputs[{self.config.fake_key!r}], and "
                "no critic is bound: call plugin.bind(critic=D) before pipe.setup() (find the "
                "instance with pipe.plugins[id])"
            )
        if mode == "r1" and self._critic is not None:
            raise steadytrain.ConfigError(
                f"{self.id}.mode: a critic is bound, but mode 'r1' differentiates "
                f"outputs[{self.config.output_key!r}] and never calls it; set mode = "
                "'wgan_gp' or do not bind a critic"
            )

    def _tensor(self, ctx: steadytrain.StepContext, option: str) -> torch.Tensor:
        key = getattr(self.config, option)
        value = ctx.output(key, option=option)
        if not isinstance(value, torch.Tensor) or not value.is_floating_point() or (
            value.dim() < 1
        ):
            raise steadytrain.ConfigError(
                f"{self.id}.{option}: outputs[{key!r}] must be a floating-point tensor with a "
                f"batch dimension, got {_describe(value)}"
            )
        return value

    @steadytrain.hookimpl
    def compute_regularizers(self, ctx: steadytrain.StepContext) -> dict[str, torch.Tensor]:
        cfg = self.config
        if cfg.mode == "r1":
            x, output = self._tensor(ctx, "input_key"), self._tensor(ctx, "output_key")
            if not x.requires_grad:
                raise steadytrain.ConfigError(
                    f"{self.id}.input_key: outputs[{cfg.input_key!r}] does not require grad, "
                    "so its gradient cannot be taken; mark it with x.requires_grad_() before "
                    "the forward pass"
                )
            norms = input_gradient_norms(output, x)
            if norms is None:
                raise steadytrain.ConfigError(
                    f"{self.id}.output_key: outputs[{cfg.output_key!r}] does not depend on "
                    f"outputs[{cfg.input_key!r}]; pass the function's value at the marked input"
                )
            penalty = norms.square().mean()
        else:
            real, fake = self._tensor(ctx, "real_key"), self._tensor(ctx, "fake_key")
            if real.shape != fake.shape:
                raise steadytrain.ConfigError(
                    f"{self.id}.fake_key: outputs[{cfg.fake_key!r}] has shape "
                    f"{tuple(fake.shape)} and outputs[{cfg.real_key!r}] {tuple(real.shape)}; "
                    "interpolation needs one shape"
                )
            mixed = interpolate(real, fake, self._generator_on(real.device))
            scores = self._critic(mixed)
            norms = input_gradient_norms(scores, mixed)
            if norms is None:
                raise steadytrain.ConfigError(
                    f"{self.id}: the bound critic's output ({_describe(scores)}) does not "
                    "depend on its input; bind the critic that scores the batch"
                )
            penalty = (norms - cfg.target_norm).square().mean()
        ctx.log("grad_norm", norms.detach().mean())
        return {"penalty": penalty}

    def _generator_on(self, device: torch.device) -> torch.Generator:
        if self._generator is None or self._generator.device.type != device.type:
            if self._saved_rng is not None and self._saved_rng[1] != device.type:
                raise steadytrain.CheckpointError(
                    f"plugin instance {self.id!r} ({self.name}): the checkpoint holds the "
                    f"state of a {self._saved_rng[1]} generator, but the tensors are on "
                    f"{device.type}; resume on the same kind of device"
                )
            self._generator = torch.Generator(device=device).manual_seed(self.config.seed)
            if self._saved_rng is not None:
                self._generator.set_state(self._saved_rng[0])
                self._saved_rng = None
        return self._generator

    def state_dict(self) -> dict[str, Any]:
        if self.config.mode == "r1":
            return {}
        if self._generator is None:
            saved = self._saved_rng
            return {"rng": None if saved is None else saved[0],
                    "device": None if saved is None else saved[1]}
        return {"rng": self._generator.get_state(), "device": self._generator.device.type}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if self.config.mode == "r1":
            super().load_state_dict(state)
            return
        self.check_state(state, ("rng", "device"))
        rng, device = state["rng"], state["device"]
        if rng is None:
            self._generator, self._saved_rng = None, None
            return
        if not (isinstance(rng, torch.Tensor) and rng.dtype == torch.uint8
                and isinstance(device, str)):
            raise steadytrain.CheckpointError(
                f"plugin instance {self.id!r} ({self.name}): the checkpoint's rng must be a "
                f"uint8 tensor and device a string, got {_describe(rng)} and {device!r}"
            )
        self._generator, self._saved_rng = None, (rng.clone(), device)

    @classmethod
    def conformance_fixture(cls) -> steadytrain.testing.Fixture:
        """The conformance kit passes the marked inputs and the logits as the scores (R1)."""
        from steadytrain.testing import Fixture, input_gradient_forward

        return Fixture(forward=input_gradient_forward)


def _describe(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return f"a {value.dtype} tensor of shape {tuple(value.shape)}"
    return f"a {type(value).__name__}"
