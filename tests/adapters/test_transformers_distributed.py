"""The Hugging Face Trainer adapter in two CPU processes (DDP over gloo), against one process.

The Trainer joins the process group that ``accelerate.debug_launcher`` sets up for its
forked ranks, as it joins torchrun's; each rank reads every other per-device batch of the
sequential sampler, so a step's two batches are one global batch of the plain loop.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from torch.nn.parallel import DistributedDataParallel

pytest.importorskip("transformers")

from plain_run import (
    CONFIG,
    assert_same_metrics,
    assert_same_run,
    pipeline,
    samples,
    train_plain,
)
from test_accelerate import forked
from test_transformers import BATCH, build, result

from steadytrain.adapters.transformers import STATE_FILE

RANKS = 2


def train_on_ranks(folder: Path, data: list[dict], steps: int, *,
                   resume_from_checkpoint: bool = False, **overrides) -> list:
    """What each of the two ranks' SteadytrainTrainer trained over *data*."""

    def run() -> None:
        trainer = build(folder, data, pipe=pipeline(CONFIG), max_steps=steps, **overrides)
        trainer.train(resume_from_checkpoint=resume_from_checkpoint or None)
        assert torch.distributed.get_world_size() == RANKS
        assert isinstance(trainer.model_wrapped, DistributedDataParallel)
        torch.save(result(trainer), folder / f"rank{torch.distributed.get_rank()}.pt")

    forked(run, RANKS)
    return [torch.load(folder / f"rank{r}.pt", weights_only=False) for r in range(RANKS)]


def test_two_ranks_train_as_one_process_on_the_global_batch(tmp_path):
    data = samples()
    ranks = train_on_ranks(tmp_path, data, steps=4, gradient_accumulation_steps=2)
    want = train_plain(data, steps=4, batch_size=RANKS * BATCH, accumulation=2)
    for got in ranks:
        assert_same_run(got, want)
    assert all(m["grad_clip/enc/pre_norm"] > 0.1 for m in want.metrics)


def test_a_nan_in_one_ranks_batch_skips_the_step_on_both(tmp_path):
    # The third step's batches: rank 0 reads the first BATCH samples, rank 1 the next.
    data = samples(nan_at=2 * RANKS * BATCH + BATCH + 1)
    ranks = train_on_ranks(tmp_path, data, steps=4)
    want = train_plain(data, steps=4, batch_size=RANKS * BATCH)
    assert want.skipped == 1
    for got in ranks:
        assert got.skipped == 1
        assert [m["guard/skipped"] for m in got.metrics] == [0.0, 0.0, 1.0, 0.0]
        assert_same_run(got, want, without=["metrics"])


def test_resume_on_two_ranks_gives_the_uninterrupted_run(tmp_path):
    """Rank 0 alone writes the checkpoint (the Trainer's ``should_save``); both ranks load
    the pipeline's state from it."""
    data = samples()
    options = dict(save_strategy="steps", save_steps=2)
    whole = train_on_ranks(tmp_path / "whole", data, steps=4, **options)
    checkpoint = tmp_path / "whole" / "checkpoint-2"
    assert (checkpoint / STATE_FILE).is_file()
    shutil.copytree(checkpoint, tmp_path / "resumed" / "checkpoint-2")
    resumed = train_on_ranks(tmp_path / "resumed", data, steps=4,
                             resume_from_checkpoint=True, **options)
    for got, expected in zip(resumed, whole, strict=True):
        assert_same_run(got, expected, without=["optimizer", "metrics"])
        # The log history of steps 1 and 2 comes from the checkpoint's trainer_state.json.
        assert_same_metrics(got.metrics[2:], expected.metrics[2:])
