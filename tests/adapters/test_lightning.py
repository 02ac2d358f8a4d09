"""The Lightning adapter against the plain loop, with the real lightning.pytorch Trainer."""

from __future__ import annotations

import contextlib
import csv
import math
import re
import runpy
from pathlib import Path

import pytest
import structlog
import torch
import torch.nn.functional as F
from plain_run import assert_same, moments, stabilizing

import steadytrain

pl = pytest.importorskip("lightning.pytorch")

from steadytrain.adapters.lightning import PipelineCallback, PipelineLossMixin  # noqa: E402

pytestmark = [
    pytest.mark.filterwarnings("ignore:You defined a `validation_step` but have no"),
    pytest.mark.filterwarnings("ignore:`isinstance\\(treespec, LeafSpec\\)` is deprecated"),
    pytest.mark.filterwarnings("ignore:Be aware that when using `ckpt_path`"),
    pytest.mark.filterwarnings("ignore:The dirpath has changed from"),
]

BATCH, BATCHES = 4, 4

CONFIG = stabilizing({"name": "head", "include": ["head.*"], "max_norm": 0.05})

OPTIMIZERS = {
    "adam": lambda params: torch.optim.Adam(params, lr=0.05),
    "fused_adamw": lambda params: torch.optim.AdamW(params, lr=0.05, fused=True),
    "sgd": lambda params: torch.optim.SGD(params, lr=0.1, momentum=0.9),
}


def dataset(nan_batch: int | None = None) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(BATCH * BATCHES, 4, generator=g)
    y = torch.randint(0, 3, (BATCH * BATCHES,), generator=g)
    if nan_batch is not None:
        x[nan_batch * BATCH, 0] = math.nan
    return list(zip(x.split(BATCH), y.split(BATCH), strict=True))


class Net(PipelineLossMixin, pl.LightningModule):
    def __init__(self, optimizer: str = "adam") -> None:
        super().__init__()
        torch.manual_seed(0)
        self.body = torch.nn.Linear(4, 8)
        self.head = torch.nn.Linear(8, 3)
        self.optimizer = optimizer
        self.validated: list[dict[str, torch.Tensor]] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.body(x)))

    def task(self, batch) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = batch
        logits = self(x)
        return F.cross_entropy(logits, y), logits

    def with_terms(self, batch) -> tuple[torch.Tensor, torch.Tensor]:
        """The task loss, and the pipeline's loss with its terms."""
        loss, logits = self.task(batch)
        return loss, self.pipeline_loss(loss, outputs={"logits": logits})

    def training_step(self, batch, batch_idx):
        return self.with_terms(batch)[1]

    def validation_step(self, batch, batch_idx):
        self.validated.append({k: v.clone() for k, v in self.state_dict().items()})

    def test_step(self, batch, batch_idx):
        self.validation_step(batch, batch_idx)

    def configure_optimizers(self):
        return OPTIMIZERS[self.optimizer](self.parameters())


class Plain(Net):
    """Returns the task loss without the pipeline's terms."""

    def training_step(self, batch, batch_idx):
        return self.task(batch)[0]


def trainer(tmp_path: Path, callbacks, **kwargs) -> pl.Trainer:
    options = dict(
        accelerator="cpu", devices=1, max_epochs=2, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
        default_root_dir=tmp_path,
    )
    options.update(kwargs)
    return pl.Trainer(callbacks=callbacks, **options)


def plain_run(
    config=CONFIG, *, optimizer="adam", epochs=2, accumulate=1, autocast=False,
    nan_batch=None, log_every=50,
):
    """The same training in the plain loop of the user guide; returns model, pipe, optimizer
    and the metrics read every *log_every* optimizer steps."""
    model = Net(optimizer)
    opt = model.configure_optimizers()
    batches = dataset(nan_batch)
    windows = [batches[i:i + accumulate] for i in range(0, len(batches), accumulate)]
    pipe = steadytrain.Pipeline.from_config(config)
    pipe.setup(model, opt, total_steps=epochs * len(windows))
    logged = []
    for epoch in range(epochs):
        pipe.epoch_start(epoch)
        for window in windows:
            for index, (x, y) in enumerate(window):
                pipe.before_step(batch=x, targets=y, micro_batch=index,
                                 num_micro_batches=len(window))
                context = (torch.autocast("cpu", dtype=torch.bfloat16) if autocast
                           else contextlib.nullcontext())
                with context:
                    loss, logits = model.task((x, y))
                    total = pipe.compute_loss(loss, outputs={"logits": logits})
                total.backward()
            steadytrain.step_optimizer(opt, pipe.after_backward())
            pipe.consolidate()
            opt.zero_grad()
            if pipe.run.step % log_every == 0:
                logged.append(pipe.metrics())
        pipe.epoch_end()
    return model, pipe, opt, logged


def loader(nan_batch=None):
    return torch.utils.data.DataLoader(dataset(nan_batch), batch_size=None)


def assert_same_training(net: Net, callback: PipelineCallback, model: Net,
                         pipe: steadytrain.Pipeline, optimizers=None) -> None:
    """The Lightning run of *net* and *callback* ended where the plain loop's *model* and
    *pipe* did: weights and EMA, and the moments of *optimizers* (Lightning's, the plain
    loop's) when given."""
    assert_same(net.state_dict(), model.state_dict())
    assert_same(callback.pipeline.plugins["ema"].averaged_state_dict(),
                pipe.plugins["ema"].averaged_state_dict())
    if optimizers is not None:
        assert_same(*map(moments, optimizers))


def csv_metrics(path: Path) -> list[dict[str, float]]:
    with open(path / "metrics.csv") as file:
        rows = list(csv.DictReader(file))
    return [{k: float(v) for k, v in row.items() if v and k not in ("epoch", "step")}
            for row in rows]


def fit(tmp_path, net, callback, data=None, val_dataloaders=None, **kwargs) -> pl.Trainer:
    run = trainer(tmp_path, [callback], **kwargs)
    run.fit(net, loader() if data is None else data, val_dataloaders)
    return run


@pytest.mark.parametrize("accumulate", [1, 2])
def test_weights_ema_metrics_and_optimizer_state_match_the_plain_loop(tmp_path, accumulate):
    model, pipe, opt, logged = plain_run(accumulate=accumulate, log_every=2)
    net, callback = Net(), PipelineCallback(CONFIG)
    logger = pl.loggers.CSVLogger(tmp_path, name="", version="")
    run = fit(tmp_path, net, callback, accumulate_grad_batches=accumulate, logger=logger,
              log_every_n_steps=2)
    assert callback.pipeline.run.step == pipe.run.step == 2 * BATCHES // accumulate
    assert_same_training(net, callback, model, pipe, (run.optimizers[0], opt))
    rows = csv_metrics(tmp_path)
    assert len(rows) == len(logged) > 1
    for row, expected in zip(rows, logged, strict=True):
        assert row.keys() == expected.keys()
        for name, value in expected.items():
            assert row[name] == pytest.approx(value, rel=1e-6, abs=1e-7), name
    # the techniques did act: the head was clipped and the average trails the weights
    assert all(row["grad_clip/head/pre_norm"] > 0.05 for row in rows)
    assert not torch.equal(net.head.weight, callback.pipeline.plugins["ema"].shadow[2])


def test_bf16_autocast_matches_the_plain_loop_under_torch_autocast(tmp_path):
    model, pipe, _, _ = plain_run(autocast=True)
    net, callback = Net(), PipelineCallback(CONFIG)
    fit(tmp_path, net, callback, precision="bf16-mixed")
    assert_same_training(net, callback, model, pipe)
    # and autocast did run: fp32 training ends elsewhere
    fp32, _, _, _ = plain_run()
    assert not torch.allclose(fp32.head.weight, net.head.weight, rtol=0, atol=1e-6)


@pytest.mark.parametrize("optimizer", sorted(OPTIMIZERS))
def test_a_nan_batch_is_skipped_as_in_the_plain_loop(tmp_path, optimizer):
    model, pipe, opt, _ = plain_run(optimizer=optimizer, nan_batch=2)
    net, callback = Net(optimizer), PipelineCallback(CONFIG)
    run = fit(tmp_path, net, callback, data=loader(nan_batch=2))
    assert pipe.run.skipped_steps == callback.pipeline.run.skipped_steps == 2  # once an epoch
    assert all(torch.isfinite(p).all() for p in net.parameters())
    assert_same_training(net, callback, model, pipe, (run.optimizers[0], opt))
    assert not hasattr(run.optimizers[0], "found_inf")


@pytest.mark.parametrize("optimizer", ["adam", "fused_adamw"])
def test_a_skipped_step_leaves_weights_and_optimizer_state_as_they_were(tmp_path, optimizer):
    """An epoch whose last batch has a NaN ends where the epoch without that batch ends."""
    nan = BATCHES - 1
    net, callback = Net(optimizer), PipelineCallback(CONFIG)
    run = fit(tmp_path, net, callback, data=loader(nan_batch=nan), max_epochs=1)
    clean = Net(optimizer)
    clean_run = fit(tmp_path, clean, PipelineCallback(CONFIG), max_epochs=1,
                    data=torch.utils.data.DataLoader(dataset()[:nan], batch_size=None))
    assert callback.pipeline.run.skipped_steps == 1
    assert_same(net.state_dict(), clean.state_dict(), rtol=0, atol=0)
    assert_same(moments(run.optimizers[0]), moments(clean_run.optimizers[0]), rtol=0, atol=0)


@pytest.mark.parametrize(("optimizer", "host_read"), [("adam", True), ("fused_adamw", False)])
def test_a_fused_optimizer_takes_the_skip_decision_on_the_device(tmp_path, optimizer, host_read):
    # The pipeline logs step.skipped only for a decision the host has read.
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(0))
    with structlog.testing.capture_logs() as events:
        fit(tmp_path, Net(optimizer), PipelineCallback(CONFIG), data=loader(nan_batch=2),
            max_epochs=1)
    assert ("step.skipped" in [e["event"] for e in events]) is host_read


def val_loader():
    return torch.utils.data.DataLoader(dataset()[:1], batch_size=None)


@pytest.mark.parametrize("swap", ["auto", "copy"])
def test_validation_and_test_see_the_average_and_training_weights_come_back(tmp_path, swap):
    config = {"plugins": [*CONFIG["plugins"][:3], {**CONFIG["plugins"][3], "swap": swap}]}
    model, pipe, _, _ = plain_run(config)
    net, callback = Net(), PipelineCallback(config)
    run = trainer(tmp_path, [callback])
    run.fit(net, loader(), val_loader())
    averaged = pipe.plugins["ema"].averaged_state_dict()
    assert len(net.validated) == 2
    assert_same(net.validated[-1], averaged)
    assert_same(net.state_dict(), model.state_dict())
    run.test(net, val_loader(), verbose=False)
    assert_same(net.validated[-1], averaged)  # test_step is validation_step below
    assert_same(net.state_dict(), model.state_dict())


class SaveInsideValidation(pl.Callback):
    """Saves a checkpoint while the validation loop runs, as some callbacks do."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def on_validation_epoch_end(self, trainer, pl_module):
        if trainer.current_epoch == 0:
            trainer.save_checkpoint(self.path)


def test_resume_from_the_checkpoint_saved_at_validation_reaches_the_same_weights(tmp_path):
    """ModelCheckpoint saves at the end of validation: training weights in state_dict, the
    pipeline (the average included) in the callback's state, the average under
    eval_state_dict with save_eval_weights."""
    epochs, inside = 3, tmp_path / "inside.ckpt"
    saver = pl.callbacks.ModelCheckpoint(dirpath=tmp_path, filename="{epoch}", save_top_k=-1)
    net, callback = Net(), PipelineCallback(CONFIG, save_eval_weights=True)
    trainer(tmp_path, [callback, saver, SaveInsideValidation(inside)], max_epochs=epochs,
            enable_checkpointing=True).fit(net, loader(), val_loader())
    first = torch.load(tmp_path / "epoch=0.ckpt", weights_only=True)
    model, pipe, _, _ = plain_run(epochs=1)
    for checkpoint in (first, torch.load(inside, weights_only=True)):
        assert_same(checkpoint["state_dict"], model.state_dict())
        averaged = pipe.plugins["ema"].averaged_state_dict()
        assert_same(checkpoint["eval_state_dict"], averaged)
        assert_same(checkpoint["eval_state_dict"], net.validated[0])

    resumed, again = Net(), PipelineCallback(CONFIG)
    trainer(tmp_path, [again], max_epochs=epochs).fit(
        resumed, loader(), val_loader(), ckpt_path=tmp_path / "epoch=0.ckpt")
    assert again.pipeline.run.step == callback.pipeline.run.step == epochs * BATCHES
    assert_same(resumed.state_dict(), net.state_dict())
    assert_same(again.pipeline.plugins["ema"].averaged_state_dict(),
                callback.pipeline.plugins["ema"].averaged_state_dict())
    assert_same(resumed.validated[-1], net.validated[-1])

    # a fresh callback tests with the checkpoint's average
    tested, fresh = Net(), PipelineCallback(CONFIG)
    trainer(tmp_path, [fresh]).test(tested, val_loader(), ckpt_path=tmp_path / "epoch=0.ckpt",
                                    verbose=False)
    assert_same(tested.validated[-1], first["eval_state_dict"])
    assert_same(tested.state_dict(), first["state_dict"])


def test_a_checkpoint_without_pipeline_state_starts_the_plugins_afresh(tmp_path):
    saver = pl.callbacks.ModelCheckpoint(dirpath=tmp_path, filename="plain")
    trainer(tmp_path, [saver], max_epochs=1, enable_checkpointing=True).fit(
        Plain(), loader())
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(0))
    callback = PipelineCallback(CONFIG)
    with structlog.testing.capture_logs() as events:
        trainer(tmp_path, [callback]).fit(Net(), loader(), ckpt_path=tmp_path / "plain.ckpt")
    assert "lightning.no_pipeline_state" in [e["event"] for e in events]
    assert callback.pipeline.run.step == BATCHES  # the second epoch only


# -- what the Trainer may do on its own ---------------------------------------------------


class Bare(pl.LightningModule):
    """A module without PipelineLossMixin, for configs whose plugins need no loss."""

    def __init__(self) -> None:
        super().__init__()
        self.net = Net()

    def training_step(self, batch, batch_idx):
        return self.net.task(batch)[0]

    def configure_optimizers(self):
        return self.net.configure_optimizers()


def test_trainer_clipping_runs_after_the_pipeline_when_no_plugin_clips(tmp_path):
    config = {"plugins": [{"plugin": "ema", "decay": 0.9}, {"plugin": "grad_norm"}]}
    module = Bare()
    callback = PipelineCallback(config)
    fit(tmp_path, module, callback, gradient_clip_val=0.05)
    model = Net()
    opt = model.configure_optimizers()
    pipe = steadytrain.Pipeline.from_config(config)
    pipe.setup(model, opt, total_steps=2 * BATCHES)
    for _ in range(2):
        for x, y in dataset():
            pipe.before_step(batch=x, targets=y)
            model.task((x, y))[0].backward()
            pipe.after_backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 0.05)
            opt.step()
            pipe.consolidate()
            opt.zero_grad()
    assert_same(module.net.state_dict(), model.state_dict())
    # grad_norm measured the gradients before Lightning clipped them
    assert callback.pipeline.metrics()["grad_norm/norm"] == pytest.approx(
        pipe.metrics()["grad_norm/norm"], rel=1e-6)


# -- bad input ------------------------------------------------------------------------------


def test_trainer_clipping_and_a_clipping_plugin_together_are_refused(tmp_path):
    with pytest.raises(steadytrain.ConfigError, match=r"gradient_clip_val=1\.0.*grad_clip"):
        fit(tmp_path, Net(), PipelineCallback(CONFIG), gradient_clip_val=1.0)


def test_a_module_without_the_mixin_is_refused_when_plugins_need_the_loss(tmp_path):
    with pytest.raises(steadytrain.UsageError,
                       match=r"Bare: plugin instance\(s\) label_smoothing add terms to the loss"
                             r".*PipelineLossMixin"):
        fit(tmp_path, Bare(), PipelineCallback(CONFIG))


def test_a_training_step_without_pipeline_loss_fails_before_the_first_optimizer_step(tmp_path):
    net = Plain()
    initial = {k: v.clone() for k, v in net.state_dict().items()}
    with pytest.raises(steadytrain.UsageError,
                       match=r"Plain.training_step did not call self.pipeline_loss\(\) at step 0:"
                             r" plugin instance\(s\) label_smoothing would run without"):
        fit(tmp_path, net, PipelineCallback(CONFIG))
    assert_same(net.state_dict(), initial, rtol=0, atol=0)


class DropsTheTerms(Net):
    def training_step(self, batch, batch_idx):
        return self.with_terms(batch)[0]


def test_a_returned_loss_without_the_terms_is_refused(tmp_path):
    with pytest.raises(steadytrain.UsageError, match="does not contain its value"):
        fit(tmp_path, DropsTheTerms(), PipelineCallback(CONFIG))


class BuildsOnTheLoss(Net):
    def training_step(self, batch, batch_idx):
        loss, total = self.with_terms(batch)
        return 0.5 * total + 0.0 * loss


def test_a_loss_built_from_pipeline_loss_is_accepted(tmp_path):
    callback = PipelineCallback(CONFIG)
    fit(tmp_path, BuildsOnTheLoss(), callback, max_epochs=1)
    assert callback.pipeline.run.step == BATCHES


class Manual(Net):
    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False


def test_manual_optimization_is_refused(tmp_path):
    with pytest.raises(steadytrain.UsageError, match="Manual: manual optimization"):
        fit(tmp_path, Manual(), PipelineCallback(CONFIG))


class LossInValidation(Net):
    def validation_step(self, batch, batch_idx):
        return self.with_terms(batch)[1]


def test_pipeline_loss_outside_training_step_is_refused(tmp_path):
    with pytest.raises(steadytrain.UsageError, match="outside a training step"):
        trainer(tmp_path, [PipelineCallback(CONFIG)]).fit(
            LossInValidation(), loader(), val_loader())


def test_pipeline_loss_without_a_callback_is_refused(tmp_path):
    with pytest.raises(steadytrain.UsageError, match=r"exactly one PipelineCallback.*found 0"):
        trainer(tmp_path, []).fit(Net(), loader())


def test_lightning_refuses_two_callbacks(tmp_path):
    # pipeline_loss() relies on it to find its callback
    with pytest.raises(RuntimeError, match="more than one stateful callback"):
        trainer(tmp_path, [PipelineCallback(CONFIG), PipelineCallback(CONFIG)]).fit(
            Net(), loader())


class Unsized(torch.utils.data.IterableDataset):
    def __iter__(self):
        return iter(dataset()[:3])


def test_an_unsized_epoch_ending_inside_an_accumulation_window_is_refused(tmp_path):
    with pytest.raises(steadytrain.UsageError, match=r"epoch ended at batch 2.*__len__"):
        fit(tmp_path, Net(), PipelineCallback(CONFIG), accumulate_grad_batches=2,
            data=torch.utils.data.DataLoader(Unsized(), batch_size=None))


def test_an_epoch_of_unsized_data_that_fits_the_windows_trains(tmp_path):
    callback = PipelineCallback(CONFIG)
    data = torch.utils.data.DataLoader(Unsized(), batch_size=None)
    fit(tmp_path, Net(), callback, accumulate_grad_batches=3, data=data)
    assert callback.pipeline.run.step == 2


class NeverSteps(Net):
    """Runs the closure (forward and backward) but leaves the optimizer alone."""

    def optimizer_step(self, epoch, batch_idx, optimizer, optimizer_closure=None):
        optimizer_closure()


def test_an_optimizer_step_override_that_skips_the_closure_is_refused(tmp_path):
    with pytest.raises(steadytrain.UsageError, match="optimizer_step override must call"):
        fit(tmp_path, NeverSteps(), PipelineCallback(CONFIG))


class StopsTheEpoch(Net):
    def on_train_batch_start(self, batch, batch_idx):
        return -1 if batch_idx == 1 else None


def test_an_epoch_stopped_inside_a_step_is_refused(tmp_path):
    with pytest.raises(steadytrain.UsageError, match="epoch ended inside optimizer step 1"):
        fit(tmp_path, StopsTheEpoch(), PipelineCallback(CONFIG))


class LearnsAScale(steadytrain.Plugin):
    """A regularizer with a parameter of its own, pulled towards 1."""

    name = "learns_a_scale"

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.scale = torch.nn.Parameter(torch.zeros(()))

    def parameters(self):
        return [self.scale]

    @steadytrain.hookimpl
    def compute_regularizers(self, ctx):
        return {"distance": (self.scale - 1) ** 2}


class TrainsPluginParameters(Net):
    def configure_optimizers(self):
        return torch.optim.SGD([*self.parameters(), *self.pipeline.parameters()], lr=0.1)


def scale_callback() -> PipelineCallback:
    registry = steadytrain.Registry.discover()
    registry.register(LearnsAScale)
    return PipelineCallback({"plugins": [{"plugin": "learns_a_scale"}]}, registry=registry)


def test_plugin_parameters_are_trained_through_configure_optimizers(tmp_path):
    callback = scale_callback()
    fit(tmp_path, TrainsPluginParameters(), callback)
    # gradient descent on (s - 1)^2 from 0 with step 0.1: s_n = 1 - 0.8^n
    scale = callback.pipeline.plugins["learns_a_scale"].scale
    assert scale.item() == pytest.approx(1 - 0.8 ** (2 * BATCHES), rel=1e-6)


def test_plugin_parameters_outside_the_optimizer_are_refused(tmp_path):
    with pytest.raises(steadytrain.UsageError, match=r"self\.pipeline\.parameters"):
        fit(tmp_path, Net(), scale_callback())


def test_a_grad_scaler_with_a_fused_optimizer_is_refused(tmp_path):
    from lightning.pytorch.plugins.precision import MixedPrecision

    precision = MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu"))
    with pytest.raises(steadytrain.UsageError, match="GradScaler and the fused optimizer AdamW"):
        fit(tmp_path, Net("fused_adamw"), PipelineCallback(CONFIG), plugins=[precision])


def test_several_processes_are_refused(tmp_path):
    # The hook the Trainer would call in each spawned process, called here without spawning.
    run = trainer(tmp_path, [], devices=2, strategy="ddp_spawn")
    with pytest.raises(steadytrain.UsageError, match=r"runs in one process.*world_size 2"):
        PipelineCallback(CONFIG).on_fit_start(run, Net())


def test_under_a_grad_scaler_the_pipeline_sees_unscaled_gradients_and_skips_as_in_the_plain_loop(
    tmp_path,
):
    """The guard skips the NaN batch and, with a tight spike rule, finite ones: the scaler
    backs off for both, as step_optimizer(scaler=...) makes it in the plain loop."""
    from lightning.pytorch.plugins.precision import MixedPrecision

    config = {"plugins": [{"plugin": "guard", "spike_factor": 1.02, "window": 2},
                          *CONFIG["plugins"][1:]]}
    init_scale = 2.0**10
    model = Net()
    opt = model.configure_optimizers()
    scaler = torch.amp.GradScaler("cpu", init_scale=init_scale, growth_interval=3)
    pipe = steadytrain.Pipeline.from_config(config)
    pipe.setup(model, opt, total_steps=2 * BATCHES)
    for epoch in range(2):
        pipe.epoch_start(epoch)
        for x, y in dataset(nan_batch=2):
            pipe.before_step(batch=x, targets=y)
            with torch.autocast("cpu", dtype=torch.float16):
                loss, logits = model.task((x, y))
                total = pipe.compute_loss(loss, outputs={"logits": logits})
            scaler.scale(total).backward()
            scaler.unscale_(opt)
            steadytrain.step_optimizer(opt, pipe.after_backward(), scaler=scaler)
            scaler.update()
            pipe.consolidate()
            opt.zero_grad()
            if pipe.run.step == 2:  # before the NaN batch
                expected = pipe.metrics()
        pipe.epoch_end()

    net, callback = Net(), PipelineCallback(config)
    lightning_scaler = torch.amp.GradScaler("cpu", init_scale=init_scale, growth_interval=3)
    precision = MixedPrecision("16-mixed", "cpu", scaler=lightning_scaler)
    logger = pl.loggers.CSVLogger(tmp_path, name="", version="")
    fit(tmp_path, net, callback, data=loader(nan_batch=2), plugins=[precision], logger=logger,
        log_every_n_steps=2)
    assert callback.pipeline.run.skipped_steps == pipe.run.skipped_steps > 2
    assert lightning_scaler.get_scale() == scaler.get_scale()
    assert_same_training(net, callback, model, pipe)
    first = csv_metrics(tmp_path)[0]
    # the clipping plugin measured unscaled norms (scaled ones would be 2^10 times larger)
    for group in ("head", "default"):
        name = f"grad_clip/{group}/pre_norm"
        assert first[name] == pytest.approx(expected[name], rel=1e-6)
    assert first["grad_clip/head/pre_norm"] < 10


def test_validation_inside_an_accumulation_window_is_refused(tmp_path):
    with pytest.raises(steadytrain.UsageError,
                       match=r"validation inside optimizer step 0, after micro-batch 1 of 2.*"
                             r"val_check_interval a multiple"):
        fit(tmp_path, Net(), PipelineCallback(CONFIG), accumulate_grad_batches=2,
            val_check_interval=1, data=loader(), val_dataloaders=val_loader())


class SavesEveryBatch(pl.Callback):
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        trainer.save_checkpoint(Path(trainer.default_root_dir) / f"{batch_idx}.ckpt")


def test_a_checkpoint_inside_an_accumulation_window_is_refused(tmp_path):
    callback = PipelineCallback(CONFIG)
    run = trainer(tmp_path, [callback, SavesEveryBatch()], accumulate_grad_batches=2)
    with pytest.raises(steadytrain.UsageError,
                       match=r"a checkpoint inside optimizer step 0, after micro-batch 1 of 2"):
        run.fit(Net(), loader())


def test_evaluation_weights_cannot_be_saved_once_the_stage_is_over(tmp_path):
    callback = PipelineCallback(CONFIG, save_eval_weights=True)
    run = fit(tmp_path, Net(), callback, max_epochs=1)
    with pytest.raises(steadytrain.UsageError, match="outside fit, validate, test and predict"):
        run.save_checkpoint(tmp_path / "after.ckpt")
    # without them the pipeline's last state is saved
    plain = PipelineCallback(CONFIG)
    run = fit(tmp_path, Net(), plain, max_epochs=1)
    run.save_checkpoint(tmp_path / "after.ckpt")
    saved = torch.load(tmp_path / "after.ckpt", weights_only=True)["callbacks"][plain.state_key]
    assert saved["counters"]["step"] == BATCHES


EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "lightning" / "train.py"


def run_example(monkeypatch, capsys, *args: str) -> str:
    monkeypatch.setattr("sys.argv", [str(EXAMPLE), *args])
    runpy.run_path(str(EXAMPLE), run_name="__main__")
    return capsys.readouterr().out


def test_the_example_skips_the_corrupted_step_and_resumes_exactly(tmp_path, monkeypatch, capsys):
    common = ("--epochs", "2", "--samples", "512", "--corrupt-epoch", "1")
    whole = run_example(monkeypatch, capsys, *common, "--out", str(tmp_path / "a"))
    assert "skipped steps: 1 of 8" in whole
    resumed = run_example(monkeypatch, capsys, *common, "--out", str(tmp_path / "b"),
                          "--resume", str(tmp_path / "a" / "epoch=0.ckpt"))
    assert resumed.replace("/b\n", "/a\n") == whole
    checkpoint = torch.load(tmp_path / "a" / "epoch=1.ckpt", weights_only=True)
    assert checkpoint["eval_state_dict"].keys() == checkpoint["state_dict"].keys()


def test_the_usage_snippet_of_the_docs_runs(tmp_path, monkeypatch):
    docs = Path(__file__).resolve().parents[2] / "docs" / "lightning.md"
    (snippet,) = re.findall(r"```python\n(.*?)```", docs.read_text(), flags=re.DOTALL)
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(snippet, str(docs), "exec"), namespace)
    run = namespace["callback"].pipeline.run
    assert (run.step, run.skipped_steps) == (8, 0)  # what the snippet's comment says
