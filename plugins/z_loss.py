"""z-loss: keep the softmax normalizer of the output logits near 1.

What it does
    For output logits ``x`` (classes along ``class_dim``), ``log Z = logsumexp(x)`` is
    the log of the softmax normalizer at each position. The plugin returns
    ``coefficient · mean(log² Z)`` over all positions, computed in at least float32, and
    records the mean ``log Z`` as the metric ``<id>/log_z``. Cross-entropy is unchanged
    when every logit of a position moves by the same amount, so nothing stops the logits
    from drifting; the z-loss pulls ``log Z`` toward 0, which pins that free direction.

When to use it
    Language models trained at high learning rates, or in low precision: Wortsman et al.
    2023 show that without it the output logits diverge (``log Z`` grows far from 0)
    and the loss with them, and that the z-loss removes this instability. It costs one
    ``logsumexp`` over the logits.

Hyperparameters
    ``coefficient`` (default 1e-4, the value of PaLM and of Wortsman et al.). Keep the
    instance's ``weight`` at 1 (the default): the term is linear in the coefficient, so
    the effective coefficient is ``weight · coefficient``. ``logits_key`` (default
    ``"logits"``) names the output that holds the logits; ``class_dim`` (default -1, the
    layout ``(batch, seq, classes)``).

Source
    Chowdhery et al. 2022, "PaLM: Scaling Language Modeling with Pathways", section 5
    ("z_loss = 10⁻⁴ · log² Z"); Wortsman et al. 2023, "Small-scale proxies for
    large-scale Transformer training instabilities", section 3.2.

Caveats
    Every position of the logits counts, padding included: pass only the positions that
    count. The term is a mean over positions, like the mean-reduced cross-entropy it is
    added to; with ``F.cross_entropy(..., reduction="sum")`` scale the coefficient by the
    number of positions.
"""

from __future__ import annotations

import attrs
import torch

import steadytrain
from steadytrain.validators import non_empty_str, positive


def log_normalizer(logits: torch.Tensor, class_dim: int = -1) -> torch.Tensor:
    """``log Z = logsumexp(logits)`` over *class_dim*, in at least float32.

    A *class_dim* out of range raises :class:`steadytrain.OptionError` naming it.
    """
    if logits.dim() < 1 or not -logits.dim() <= class_dim < logits.dim():
        raise steadytrain.OptionError(
            "class_dim", f"{class_dim} is out of range for logits of shape {tuple(logits.shape)}"
        )
    wide = logits.to(torch.promote_types(logits.dtype, torch.float32))
    return torch.logsumexp(wide, dim=class_dim)


def z_loss(logits: torch.Tensor, coefficient: float = 1e-4, class_dim: int = -1) -> torch.Tensor:
    """``coefficient · mean(log² Z)`` of *logits*, the classes along *class_dim*."""
    return coefficient * log_normalizer(logits, class_dim).square().mean()


class ZLoss(steadytrain.Plugin):
    """The auxiliary loss coefficient · log² Z on the output logits (PaLM's z-loss)."""

    name = "z_loss"
    #: It acts on the logits as a whole: there is nothing to select.
    uses_filter = False

    @attrs.frozen
    class Config:
        coefficient: float = attrs.field(default=1e-4, validator=positive)
        logits_key: str = attrs.field(default="logits", validator=non_empty_str)
        class_dim: int = -1

    @steadytrain.hookimpl
    def compute_regularizers(self, ctx: steadytrain.StepContext) -> dict[str, torch.Tensor]:
        key = self.config.logits_key
        logits = ctx.output(key, option="logits_key")
        if not isinstance(logits, torch.Tensor):
            raise steadytrain.ConfigError(
                f"{self.id}.logits_key: outputs[{key!r}] is a {type(logits).__name__}, "
                "not a tensor"
            )
        try:
            log_z = log_normalizer(logits, self.config.class_dim)
        except steadytrain.OptionError as exc:
            raise steadytrain.ConfigError(f"{self.id}.{exc.option}: {exc.message}") from None
        ctx.log("log_z", log_z.detach().mean())
        return {"z": self.config.coefficient * log_z.square().mean()}
