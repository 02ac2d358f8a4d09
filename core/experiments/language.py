"""Next-byte prediction on a corpus: the task of the language models."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from ..errors import ConfigError
from ..pipeline import Pipeline
from .data import VOCAB, Corpus
from .settings import DataSettings


class LanguageTask:
    """Next-byte prediction on a corpus: batches, the loss, and the validation loss."""

    #: The task loss's weight in the objective the pipeline adds its terms to.
    task_weight: float = 1.0

    def __init__(self, corpus: Corpus, data: DataSettings, *, seed: int,
                 device: torch.device, factory: Callable[[], torch.nn.Module]) -> None:
        corpus.require(data.seq_len)
        self.corpus, self.data, self.seed, self.device = corpus, data, seed, device
        self.factory = factory
        self.data_sha256 = corpus.sha256
        self.val = corpus.validation(data.eval_batches * data.batch_size, data.seq_len)
        self.val = self.val.to(device)

    def build_model(self) -> torch.nn.Module:
        return self.factory()

    def prepare(self, pipe: Pipeline) -> None:
        """Nothing to bind for text."""

    def batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        ids = self.corpus.batch(step, self.seed, self.data.batch_size, self.data.seq_len)
        ids = ids.to(self.device)
        return ids[:, :-1], ids[:, 1:]

    def loss(self, model: torch.nn.Module, inputs: torch.Tensor,
             targets: torch.Tensor) -> tuple[torch.Tensor, dict[str, Any]]:
        out = model(inputs)
        logits = out[0] if isinstance(out, tuple) else out
        expected = (*inputs.shape, VOCAB)
        if not isinstance(logits, torch.Tensor) or tuple(logits.shape) != expected:
            got = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits)
            raise ConfigError(
                f"model: the model must return logits of shape {expected} for ids of shape "
                f"{tuple(inputs.shape)}, got {got}"
            )
        return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten()), \
            {"logits": logits}

    @torch.no_grad()
    def evaluate(self, model: torch.nn.Module) -> dict[str, float]:
        """Mean cross-entropy (nats per byte) over the validation windows."""
        total = 0.0
        size = self.data.batch_size
        for start in range(0, len(self.val), size):
            chunk = self.val[start : start + size]
            out = model(chunk[:, :-1])
            logits = out[0] if isinstance(out, tuple) else out
            total += F.cross_entropy(logits.flatten(0, 1).float(), chunk[:, 1:].flatten(),
                                     reduction="sum").item()
        return {"loss": total / (len(self.val) * self.data.seq_len)}
