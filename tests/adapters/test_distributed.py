"""DDP and FSDP2 with two CPU ranks (gloo) against one process on the same global batch.

The ranks are forked once for the whole module (``distributed_runs.launch``) and run
every scenario; the tests compare what they wrote with ``plain_run.train_plain``.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from distributed_runs import (
    AGC_CONFIG,
    CONFIG,
    GLOBAL_BATCH,
    GUIDE,
    NAN_AT,
    NAN_CONFIG,
    RESUME_AT,
    SHARDED_CONFIG,
    STEPS,
    WORLD,
    launch,
    results,
)
from plain_run import (
    Result,
    assert_same_run,
    make_model,
    make_optimizer,
    pipeline,
    samples,
    train_plain,
)

import steadytrain
from steadytrain.adapters import distributed


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory, frozen_heap: None) -> Path:
    """The folder the two ranks wrote every scenario's results to.

    The heap is frozen before the fork: each ``gc.collect()`` of a rank (the example
    collects its DDP model) then scans only what the rank made.
    """
    folder = tmp_path_factory.mktemp("ranks")
    launch(folder)
    return folder


def one_process(config, *, accumulation: int = 1, data=None) -> Result:
    return train_plain(data or samples(), steps=STEPS, batch_size=GLOBAL_BATCH,
                       accumulation=accumulation, config=config)


TRAINING = {
    "ddp_training": (CONFIG, 2),
    "fsdp2_training": (SHARDED_CONFIG, 2),
    "fsdp2_agc": (AGC_CONFIG, 1),
}


@pytest.mark.parametrize("name", TRAINING)
def test_ranks_train_as_one_process_on_the_global_batch(ranks, name):
    """Weights, EMA, optimizer moments and every metric (losses, terms, the clipping
    norms of each group, infinity norm included) as one process; an evaluation inside
    the run (the EMA swapped in and out) changes nothing."""
    config, accumulation = TRAINING[name]
    want = one_process(config, accumulation=accumulation)
    for got in results(ranks, name):
        assert_same_run(Result.of(got), want)


def test_ranks_see_different_losses_and_report_the_global_mean(ranks):
    """The metrics are read on each rank after an all-reduce: both ranks report the mean
    over the global batch, which neither rank's own share has."""
    rank_0, rank_1 = results(ranks, "ddp_training")
    assert rank_0["metrics"] == rank_1["metrics"]
    model = make_model()
    first = next(iter([samples()[:GLOBAL_BATCH]]))
    x = torch.stack([s["x"] for s in first])
    y = torch.stack([s["labels"] for s in first])
    per_sample = torch.nn.functional.cross_entropy(model.logits(x), y, reduction="none")
    half = GLOBAL_BATCH // WORLD
    shares = [per_sample[:half].mean().item(), per_sample[half:].mean().item()]
    # the first step accumulates two global batches; its first one starts with these weights
    assert shares[0] != pytest.approx(shares[1], rel=1e-3)
    want = one_process(CONFIG, accumulation=2).metrics[0]["loss/task"]
    assert rank_0["metrics"][0]["loss/task"] == pytest.approx(want, rel=1e-6)


def test_every_rank_sees_the_step_loss_of_the_global_batch(ranks):
    """``ctx.step_loss`` is the mean over the ranks (and micro-batches), as in one process
    on the global batch, so the guard's spike rule judges the same loss on every rank: in
    step 1 rank 1's own loss is 6 times its step-0 loss, the global one 3.5 times, and a
    guard with window 1 and spike factor 4 skips nothing, as in one process."""
    for got in results(ranks, "step_loss_across_ranks"):
        assert got["seen"] == [pytest.approx(1.0), pytest.approx(3.5)]
        assert got["skipped"] == 0


@pytest.mark.parametrize("kind", ["ddp", "fsdp2"])
def test_a_nan_on_one_rank_skips_the_step_on_every_rank(ranks, kind):
    """Only rank 1 sees the NaN loss; the gradient reduction carries the NaN to rank 0's
    gradients (shards under FSDP2), which its guard sees too. The core's all-reduce makes
    both ranks skip, and the run equals one process skipping that step."""
    want = one_process(NAN_CONFIG, data=samples(nan_at=NAN_AT))
    assert want.skipped == 1
    rank_0, rank_1 = results(ranks, f"{kind}_nan_on_rank_1")
    assert rank_1["requests"][1] == [True]
    for got in (rank_0, rank_1):
        # the guard's own counters are each rank's verdict, averaged over the ranks
        assert_same_run(Result.of(got), want, metrics_but="guard/")
    assert math.isnan(rank_0["metrics"][1]["loss/task"])


@pytest.mark.parametrize("kind", ["ddp", "fsdp2"])
def test_resume_from_a_distributed_checkpoint_continues_the_run(ranks, kind):
    """Model, optimizer and pipeline (EMA shadows as DTensors under FSDP2, each rank's
    guard history) saved with torch.distributed.checkpoint and loaded into a fresh run."""
    for got in results(ranks, f"{kind}_resume"):
        assert got["step"] == 2 * RESUME_AT
        assert_same_run(Result.of(got["resumed"]), Result.of(got["uninterrupted"]))


def test_ranks_whose_pipelines_differ_are_refused(ranks):
    for got in results(ranks, "differing_configs"):
        assert got["same"] == "no error"
        assert got["option"].startswith("ConfigError: the steadytrain pipelines of the ranks")
        assert "ema.decay is 0.9 on rank 0 but 0.99 on rank 1" in got["option"]
        assert "same config" in got["option"]
        assert ("rank 0 has the instances ['guard', 'label_smoothing', 'grad_clip', 'ema'] "
                "and rank 1 has ['label_smoothing', 'grad_clip', 'ema']") in got["instances"]
        assert "setup(total_steps=...) is 3 on rank 0 but 4 on rank 1" in got["total_steps"]


def test_options_that_cannot_work_on_shards_are_refused(ranks):
    for got in results(ranks, "sharded_refusals"):
        assert got["ema_on_host"].startswith("ConfigError: ema.device: 'cpu'")
        assert "'enc.weight' and 3 more are sharded" in got["ema_on_host"]
        assert "device = 'same'" in got["ema_on_host"]
        assert got["agc_split_rows"].startswith("ConfigError: grad_clip.mode: 'agc'")
        assert "'enc.weight' are split across ranks" in got["agc_split_rows"]
        assert "mode = 'norm'" in got["agc_split_rows"]
        assert got["norm_split_rows"] == "no error"
        assert got["whole_into_sharded"].startswith("CheckpointError: ema: shadow of 'enc.weight'"
                                                    " is a whole tensor in the checkpoint but "
                                                    "sharded as (Shard(dim=0),) here")
        assert got["state_of_other_rank"].startswith(
            "CheckpointError: the checkpoint holds no pipeline state for rank")


def test_only_rank_zero_logs(ranks):
    rank_0, rank_1 = results(ranks, "logging_on_rank_zero")
    assert rank_0["events"] == ["pipeline.assembled", "app.event"]
    assert rank_1["events"] == []
    # called twice: one processor that drops, before the one configured earlier
    assert rank_0["processors"] == rank_1["processors"] == 2


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled, unavailable or uninitialized")
def test_load_refuses_a_checkpoint_of_another_number_of_ranks(ranks):
    pipe = pipeline(SHARDED_CONFIG)
    distributed.setup(pipe, make_model(), None, total_steps=4)
    with pytest.raises(steadytrain.CheckpointError,
                       match=r"saved by 2 ranks and this run has 1; resume with 2 ranks"):
        distributed.load(ranks / "checkpoint-fsdp2", pipe)
    with pytest.raises(steadytrain.CheckpointError, match="no steadytrain pipeline state"):
        torch.distributed.checkpoint.save({"x": torch.zeros(2)}, checkpoint_id=ranks / "other",
                                          no_dist=True)
        distributed.load(ranks / "other", pipe)
    with pytest.raises(steadytrain.CheckpointError, match="no such checkpoint folder"):
        distributed.load(ranks / "missing", pipe)


def test_without_a_process_group_setup_is_the_pipelines_own():
    model = make_model()
    optimizer = make_optimizer(model)
    pipe = distributed.setup(pipeline(CONFIG), model, optimizer, total_steps=STEPS)
    assert pipe.is_setup and pipe.run.model is model and pipe.run.optimizers == (optimizer,)


def test_save_and_load_need_the_model_with_the_optimizer(tmp_path):
    model = make_model()
    pipe = distributed.setup(pipeline(CONFIG), model, make_optimizer(model), total_steps=STEPS)
    with pytest.raises(steadytrain.UsageError, match=r"pass the model too \(model=...\)"):
        distributed.save(tmp_path, pipe, optimizer=make_optimizer(model))


def test_the_example_skips_the_nan_of_one_rank_and_resumes_exactly(ranks):
    """examples/distributed/train.py as torchrun starts it: the NaN batch of rank 1 skips
    one step on both ranks; FSDP2 resumed after the first epoch ends where the
    uninterrupted run ends; DDP and FSDP2 train alike."""
    for got in results(ranks, "example"):
        ddp, fsdp2, resumed = got["ddp"], got["fsdp2"], got["fsdp2_resumed"]
        assert fsdp2["skipped"] == ddp["skipped"] == resumed["skipped"] == 1
        assert resumed == fsdp2
        for key in ("accuracy", "ema_accuracy"):
            assert fsdp2[key] == pytest.approx(ddp[key], abs=2 / 1024)
    assert (ranks / "fsdp2" / "epoch-1" / ".metadata").is_file()


def test_the_guides_loop_runs_on_two_ranks_and_prints_what_the_guide_says(ranks):
    rank_0, rank_1 = results(ranks, "guide")
    assert rank_1["printed"] == ""
    assert rank_0["step"] == rank_1["step"] == 8
    assert rank_0["loss"] == rank_1["loss"]
    line = f"8 0 {rank_0['loss']:.4f}"
    assert rank_0["printed"] == line + "\n"
    assert f"rank 0 alone prints `{line}`" in GUIDE.read_text().replace("\n", " ")
    assert (ranks / "guide" / "checkpoints" / "step-8" / ".metadata").is_file()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="FSDP1 needs an accelerator")
def test_a_model_wrapped_in_fsdp1_is_refused(tmp_path):
    from torch.distributed.fsdp import FullyShardedDataParallel

    torch.cuda.set_device(0)
    torch.distributed.init_process_group("nccl", init_method=f"file://{tmp_path}/store",
                                         rank=0, world_size=1)
    try:
        model = FullyShardedDataParallel(make_model().cuda())
        refusal = r"wrapped in FullyShardedDataParallel \(FSDP1\).*fully_shard \(FSDP2\)"
        with pytest.raises(steadytrain.ConfigError, match=refusal):
            distributed.setup(pipeline(CONFIG), model, make_optimizer(model),
                              total_steps=STEPS)
    finally:
        torch.distributed.destroy_process_group()
