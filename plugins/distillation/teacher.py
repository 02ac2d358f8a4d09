"""The frozen teacher of a distillation plugin: bound by the host, run on the batch without grad."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

import steadytrain


class Teacher:
    """A frozen module, checked when bound and at setup, that runs on the step's batch.

    ``owner`` is the plugin instance id used in messages. Taps on the teacher's modules
    capture their outputs only while :meth:`run` runs it, so a host that also calls the
    teacher itself piles nothing up.
    """

    def __init__(self, owner: str) -> None:
        self.owner = owner
        self.module: torch.nn.Module | None = None
        self._handles: list[Any] = []
        self._captured: dict[str, list[Any]] = {}
        self._running = False

    def bind(self, module: torch.nn.Module) -> None:
        if not isinstance(module, torch.nn.Module):
            raise steadytrain.ConfigError(
                f"{self.owner}: bind(teacher=...) needs a torch.nn.Module, got "
                f"{type(module).__name__}"
            )
        self.remove_taps()
        self.module = module
        self.check()

    def check(self) -> None:
        """Refuse a teacher that is not frozen: one that requires grad or is in training mode."""
        module = self.module
        if module is None:
            return
        trainable = [n for n, p in module.named_parameters() if p.requires_grad]
        if trainable:
            raise steadytrain.ConfigError(
                f"{self.owner}: the teacher's parameter {trainable[0]!r} requires grad "
                f"({len(trainable)} do); a teacher is frozen and runs without grad: call "
                "teacher.requires_grad_(False) before binding it"
            )
        if module.training:
            raise steadytrain.ConfigError(
                f"{self.owner}: the teacher is in training mode, so dropout would make its "
                "targets noisy; call teacher.eval() before binding it"
            )

    def tap(self, patterns: Sequence[str], option: str) -> tuple[str, ...]:
        """Capture the outputs of the teacher's modules matching *patterns* during :meth:`run`."""
        if self.module is None:
            raise steadytrain.ConfigError(
                f"{self.owner}.{option}: taps the teacher's modules, and no teacher is bound; "
                "call plugin.bind(teacher=module) before pipe.setup()"
            )
        modules = dict(self.module.named_modules())
        names = steadytrain.VariableFilter(
            include=tuple(patterns), owner=f"{self.owner}.{option}"
        ).select([n for n in modules if n], kind="teacher module")
        self.remove_taps()
        for name in names:
            self._handles.append(modules[name].register_forward_hook(self._capture(name)))
        return names

    def _capture(self, name: str) -> Any:
        def hook(_module: torch.nn.Module, _args: Any, output: Any) -> None:
            if self._running:
                self._captured.setdefault(name, []).append(output)

        return hook

    def run(self, batch: Any) -> tuple[Any, dict[str, list[Any]]]:
        """The teacher's output on *batch* and its tapped module outputs, without grad.

        A mapping batch is passed as keyword arguments, anything else as the one argument.
        """
        if batch is None:
            raise steadytrain.ConfigError(
                f"{self.owner}: the bound teacher needs the step's input: pass it with "
                "pipe.before_step(batch=...)"
            )
        self._captured = {}
        self._running = True
        try:
            with torch.no_grad():
                output = self.module(**batch) if isinstance(batch, Mapping) else self.module(batch)
        finally:
            self._running = False
        captured, self._captured = self._captured, {}
        return output, captured

    def remove_taps(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()


def logits_of(output: Any, where: str) -> torch.Tensor:
    """The logits in a model's *output*: the tensor itself, its ``logits`` attribute (a
    Hugging Face ``ModelOutput``) or its ``"logits"`` entry."""
    if isinstance(output, torch.Tensor):
        return output
    logits = output.get("logits") if isinstance(output, Mapping) else getattr(
        output, "logits", None)
    if not isinstance(logits, torch.Tensor):
        raise steadytrain.ConfigError(
            f"{where}: the teacher returned a {type(output).__name__} without logits; return "
            "the logits tensor, or an object with a 'logits' attribute or key"
        )
    return logits
