"""The Hugging Face Trainer adapter, against the plain loop and the plain Trainer."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("transformers")

from plain_run import (
    CONFIG,
    Result,
    Tiny,
    assert_same,
    assert_same_metrics,
    assert_same_run,
    make_model,
    make_optimizer,
    pipeline,
    samples,
    snapshot,
    train_plain,
)
from transformers import Trainer, TrainerCallback, TrainerState, TrainingArguments

import steadytrain
from steadytrain.adapters.transformers import (
    STATE_FILE,
    SteadytrainCallback,
    SteadytrainMixin,
    SteadytrainTrainer,
)

ROOT = Path(__file__).resolve().parents[2]
BATCH = 4


class TinyWithLossKwargs(Tiny):
    """Sums the cross-entropy and divides by the Trainer's ``num_items_in_batch``."""

    def forward(self, x, labels=None, num_items_in_batch=None, **kwargs):
        out = {"logits": self.logits(x)}
        if labels is not None:
            out["loss"] = F.cross_entropy(out["logits"], labels, reduction="sum") / (
                num_items_in_batch)
        return out


def sum_over_window(outputs, labels, num_items_in_batch=None):
    """A ``compute_loss_func``: the cross-entropy summed and divided by the window's size."""
    return F.cross_entropy(outputs["logits"], labels, reduction="sum") / num_items_in_batch


LOSS_MODES = ("mean", "loss_kwargs", "compute_loss_func")


def arguments(tmp_path, **overrides: Any) -> TrainingArguments:
    settings = dict(
        output_dir=str(tmp_path), per_device_train_batch_size=BATCH, report_to="none",
        use_cpu=True, max_grad_norm=0.0, lr_scheduler_type="constant", logging_steps=1,
        save_strategy="no", train_sampling_strategy="sequential", disable_tqdm=True,
        dataloader_num_workers=0,
    )
    settings.update(overrides)
    return TrainingArguments(**settings)


def build(tmp_path, data, *, mode: str = "mean", pipe=None, trainer_class=None,
          fused: bool = True, callbacks=(), eval_data=None, **overrides: Any) -> Trainer:
    """A Trainer over *data*; with *pipe*, a SteadytrainTrainer."""
    model = make_model(TinyWithLossKwargs if mode == "loss_kwargs" else Tiny)
    kwargs: dict[str, Any] = dict(
        model=model, args=arguments(tmp_path, **overrides), train_dataset=data,
        eval_dataset=eval_data,
        optimizers=(make_optimizer(model, fused=fused), None), callbacks=list(callbacks),
    )
    if mode == "compute_loss_func":
        kwargs["compute_loss_func"] = sum_over_window
    if pipe is not None:
        kwargs["pipeline"] = pipe
    cls = trainer_class or (SteadytrainTrainer if pipe is not None else Trainer)
    return cls(**kwargs)


def training_logs(trainer: Trainer) -> list[dict[str, float]]:
    return [entry for entry in trainer.state.log_history if "loss" in entry]


def result(trainer: SteadytrainTrainer) -> Result:
    return snapshot(trainer.pipeline, trainer.model, trainer.optimizer.optimizer,
                    training_logs(trainer))


def trained(tmp_path, data, **options: Any) -> Result:
    """What a SteadytrainTrainer over *data* with the pipeline of CONFIG trained (*options*
    as for :func:`build`)."""
    trainer = build(tmp_path, data, pipe=pipeline(CONFIG), **options)
    trainer.train()
    return result(trainer)


# -- equivalence ------------------------------------------------------------------------


@pytest.mark.parametrize("mode", LOSS_MODES)
def test_same_weights_ema_and_metrics_as_the_plain_loop(tmp_path, mode):
    data = samples()
    got = trained(tmp_path, data, mode=mode, max_steps=4, gradient_accumulation_steps=2)
    want = train_plain(data, steps=4, batch_size=BATCH, accumulation=2)
    assert_same_run(got, want)
    # The run exercises what it claims to: both groups clipped, the average differs.
    assert all(m["grad_clip/enc/pre_norm"] > 0.1 for m in want.metrics)
    assert all(m["grad_clip/default/pre_norm"] > 0.3 for m in want.metrics)
    assert not torch.equal(got.averaged["head.weight"], got.weights["head.weight"])


def test_bf16_autocast_gives_the_plain_loop_under_autocast(tmp_path):
    data = samples()
    got = trained(tmp_path, data, max_steps=4, gradient_accumulation_steps=2, bf16=True)
    want = train_plain(data, steps=4, batch_size=BATCH, accumulation=2, bf16=True)
    fp32 = train_plain(data, steps=4, batch_size=BATCH, accumulation=2)
    assert_same_run(got, want, without=["optimizer"])
    assert got.metrics[0]["loss/task"] != fp32.metrics[0]["loss/task"]


@pytest.mark.parametrize("mode", LOSS_MODES)
def test_without_terms_the_weights_are_the_plain_trainers(tmp_path, mode):
    # 5 batches, 2 per step: the last step has one micro-batch.
    data = samples(5 * BATCH)
    plain = build(tmp_path / "plain", data, mode=mode, num_train_epochs=1,
                  gradient_accumulation_steps=2)
    plain.train()
    adapted = build(tmp_path / "adapted", data, mode=mode, num_train_epochs=1,
                    gradient_accumulation_steps=2, pipe=pipeline(
                        {"plugins": [{"plugin": "ema"}]}))
    adapted.train()
    assert adapted.state.global_step == plain.state.global_step == 3
    assert_same(adapted.model.state_dict(), plain.model.state_dict())
    assert [e["loss"] for e in training_logs(adapted)] == pytest.approx(
        [e["loss"] for e in training_logs(plain)], rel=1e-6)


# -- evaluation, resume, skipped steps ----------------------------------------------------


def test_evaluation_runs_with_the_averaged_weights(tmp_path):
    data = samples()
    trainer = build(tmp_path, data, max_steps=4, pipe=pipeline(CONFIG))
    trainer.train()
    held_out = samples(16, seed=1)
    metrics = trainer.evaluate(held_out)
    trained = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    model = Tiny()
    with trainer.pipeline.evaluating():
        model.load_state_dict(trainer.model.state_dict())
    x = torch.stack([s["x"] for s in held_out])
    y = torch.stack([s["labels"] for s in held_out])
    with torch.no_grad():
        expected = F.cross_entropy(model.logits(x), y).item()
    assert metrics["eval_loss"] == pytest.approx(expected, rel=1e-5)
    assert_same(trainer.model.state_dict(), trained)  # the training weights came back


def test_resume_from_a_mid_run_checkpoint_gives_the_uninterrupted_run(tmp_path):
    data = samples()
    # An evaluation right before the checkpoint: the checkpoint must hold the training
    # weights, not the averaged ones the evaluation ran with.
    options = dict(max_steps=6, gradient_accumulation_steps=2, save_strategy="steps",
                   save_steps=3, eval_strategy="steps", eval_steps=3,
                   eval_data=samples(8, seed=1))
    whole = build(tmp_path / "whole", data, pipe=pipeline(CONFIG),
                  **options)
    whole.train()
    checkpoint = tmp_path / "whole" / "checkpoint-3"
    assert (checkpoint / STATE_FILE).is_file()
    shutil.copytree(checkpoint, tmp_path / "resumed" / "checkpoint-3")
    resumed = build(tmp_path / "resumed", data,
                    pipe=pipeline(CONFIG), **options)
    resumed.train(resume_from_checkpoint=True)
    assert resumed.pipeline.run.step == 6
    expected, got = result(whole), result(resumed)
    assert_same_run(got, expected, without=["optimizer", "metrics"])
    # The log history of steps 1 to 3 comes from the checkpoint's trainer_state.json.
    assert_same_metrics(got.metrics[3:], expected.metrics[3:])


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "foreach"])
def test_a_nan_batch_is_skipped_as_in_the_plain_loop(tmp_path, fused):
    data = samples(nan_at=2 * BATCH + 1)  # in the third step
    got = trained(tmp_path / "nan", data, max_steps=4, fused=fused)
    want = train_plain(data, steps=4, batch_size=BATCH, fused=fused)
    assert want.skipped == 1
    assert [m["guard/skipped"] for m in got.metrics] == [0.0, 0.0, 1.0, 0.0]
    assert_same_run(got, want, without=["metrics"])


class OwnScheduler(SteadytrainTrainer):
    """Makes its scheduler without the Trainer's create_scheduler."""

    def create_scheduler(self, num_training_steps, optimizer=None):
        self.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda _: 1.0)
        return self.lr_scheduler


# The scheduler wrapped optimizer.step() before the adapter could: torch says so, once.
@pytest.mark.filterwarnings("ignore:Seems like `optimizer.step\\(\\)` has been overridden")
def test_a_skip_is_honoured_when_a_subclass_makes_its_own_scheduler(tmp_path):
    data = samples(nan_at=2 * BATCH + 1)
    trainer = build(tmp_path, data, max_steps=4, trainer_class=OwnScheduler,
                    pipe=pipeline(CONFIG))
    trainer.train()
    assert trainer.pipeline.run.skipped_steps == 1
    assert_same(trainer.model.state_dict(),
                train_plain(data, steps=4, batch_size=BATCH).weights)


def test_a_skipped_step_changes_neither_weights_nor_optimizer_state(tmp_path):
    data = samples(nan_at=2 * BATCH)
    before = trained(tmp_path / "before", data, max_steps=2)
    after = trained(tmp_path / "after", data, max_steps=3)
    assert after.skipped == 1
    assert_same(after.weights, before.weights)
    assert_same(after.optimizer, before.optimizer)


# -- bad input ---------------------------------------------------------------------------


def test_max_grad_norm_with_a_clipping_plugin_is_an_error(tmp_path):
    with pytest.raises(steadytrain.ConfigError, match=r"max_grad_norm is 1\.0.*'grad_clip'"):
        build(tmp_path, samples(), max_steps=1, max_grad_norm=1.0,
              pipe=pipeline(CONFIG))


def test_max_grad_norm_without_a_clipping_plugin_is_the_trainers(tmp_path):
    data = samples()
    trainer = build(tmp_path, data, max_steps=2, max_grad_norm=0.05,
                    pipe=pipeline({"plugins": [{"plugin": "guard"}]}))
    trainer.train()
    plain = build(tmp_path / "plain", data, max_steps=2, max_grad_norm=0.05)
    plain.train()
    assert_same(trainer.model.state_dict(), plain.model.state_dict())


def test_deepspeed_is_refused(tmp_path):
    trainer = build(tmp_path, samples(), max_steps=1,
                    pipe=pipeline({"plugins": [{"plugin": "ema"}]}))
    trainer.args.deepspeed = "ds_config.json"
    with pytest.raises(steadytrain.ConfigError, match="deepspeed"):
        trainer.train()


class BypassingTrainer(SteadytrainMixin, Trainer):
    """Its compute_loss skips the mixin's: the pipeline never sees the loss."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        return Trainer.compute_loss(self, model, inputs, return_outputs, num_items_in_batch)


def test_a_loss_that_bypasses_the_pipeline_is_an_error_naming_the_term_plugins(tmp_path):
    trainer = build(tmp_path, samples(), max_steps=2, trainer_class=BypassingTrainer,
                    pipe=pipeline(CONFIG))
    with pytest.raises(steadytrain.UsageError, match=r"'label_smoothing' would train without"):
        trainer.train()


def test_a_loss_that_bypasses_the_pipeline_is_an_error_without_term_plugins(tmp_path):
    trainer = build(tmp_path, samples(), max_steps=2, trainer_class=BypassingTrainer,
                    pipe=pipeline({"plugins": [{"plugin": "guard"}, {"plugin": "ema"}]}))
    with pytest.raises(steadytrain.UsageError, match=r"see no loss.*SteadytrainMixin first"):
        trainer.train()


def test_a_pipeline_bound_elsewhere_is_refused(tmp_path, model):
    pipe = pipeline({"plugins": [{"plugin": "ema"}]})
    pipe.setup(model)
    with pytest.raises(steadytrain.UsageError, match="new Pipeline for each Trainer"):
        build(tmp_path, samples(), max_steps=1, pipe=pipe)


def test_training_twice_with_one_pipeline_is_refused(tmp_path):
    trainer = build(tmp_path, samples(), max_steps=1,
                    pipe=pipeline({"plugins": [{"plugin": "ema"}]}))
    trainer.train()
    with pytest.raises(steadytrain.UsageError, match="resume_from_checkpoint"):
        trainer.train()


def test_resuming_from_a_checkpoint_without_the_pipeline_is_an_error(tmp_path):
    data = samples()
    plain = build(tmp_path, data, max_steps=2, save_strategy="steps", save_steps=2)
    plain.train()
    resumed = build(tmp_path, data, max_steps=4,
                    pipe=pipeline(CONFIG))
    with pytest.raises(steadytrain.CheckpointError, match=rf"checkpoint-2.{STATE_FILE}"):
        resumed.train(resume_from_checkpoint=str(tmp_path / "checkpoint-2"))


def test_a_pipeline_state_from_another_step_is_an_error(tmp_path):
    data = samples()
    first = build(tmp_path, data, max_steps=4, save_strategy="steps", save_steps=2,
                  pipe=pipeline(CONFIG))
    first.train()
    shutil.copy(tmp_path / "checkpoint-2" / STATE_FILE, tmp_path / "checkpoint-4" / STATE_FILE)
    resumed = build(tmp_path, data, max_steps=6, pipe=pipeline(CONFIG))
    with pytest.raises(steadytrain.CheckpointError, match="at step 2 but the Trainer's at step 4"):
        resumed.train(resume_from_checkpoint=str(tmp_path / "checkpoint-4"))


def test_saving_into_a_folder_the_trainer_did_not_make_is_an_error(tmp_path):
    callback = SteadytrainCallback(steadytrain.Pipeline())
    state = TrainerState(global_step=3)
    with pytest.raises(steadytrain.CheckpointError, match="checkpoint-3"):
        callback.on_save(arguments(tmp_path), state, None)
    assert not os.listdir(tmp_path)


def test_the_pipeline_argument_must_be_a_pipeline():
    with pytest.raises(TypeError, match=r"steadytrain\.Pipeline"):
        SteadytrainCallback(CONFIG)


def test_stepping_the_optimizer_outside_the_trainers_step_is_an_error(tmp_path):
    class StepEarly(TrainerCallback):
        def on_step_begin(self, args, state, control, optimizer=None, **kwargs):
            optimizer.step()

    trainer = build(tmp_path, samples(), max_steps=2, callbacks=[StepEarly()],
                    pipe=pipeline({"plugins": [{"plugin": "ema"}]}))
    with pytest.raises(steadytrain.UsageError, match="outside the Trainer's optimizer step"):
        trainer.train()


@pytest.mark.slow
def test_the_example_runs_and_skips_the_broken_record(tmp_path):
    result = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "transformers" / "train.py"), "--epochs", "2",
         "--output", str(tmp_path)],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert "skipped steps: 1 of 32" in result.stdout
    assert (tmp_path / "checkpoint-32" / STATE_FILE).is_file()
