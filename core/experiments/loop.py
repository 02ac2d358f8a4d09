"""One training run: the plain loop around a pipeline, with metrics, checkpoints and resume.

The run directory holds:

* ``config.json``: the run's config as plain data (what ``--resume`` compares);
* ``metrics.jsonl``: one JSON object every ``log_every`` steps with the step, the
  learning rate, the per-step task loss, raw gradient norm (before any plugin clips
  it), largest output logit, largest attention logit and skip flag of the interval,
  and the pipeline's metrics (``pipe.metrics()``, means over the interval);
* ``checkpoint.pt``: model, optimizer, pipeline and random-number states every
  ``checkpoint_every`` steps, at Ctrl-C and at the end, written atomically;
* ``summary.json``: the run's measures when it ends (see :func:`summarize`);
* ``metadata.json``: versions, plugin origins and the resolved config (see
  :mod:`~steadytrain.experiments.metadata`);
* ``events.jsonl``: the structlog events, when run from the command line.

The loop measures what it compares across pipelines itself, the same way for every
config: the gradient norm is taken after the backward and before ``after_backward``,
where no plugin has changed the gradients yet.
"""

from __future__ import annotations

import json
import math
import os
import platform
import shutil
import signal
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from .._version import __version__
from ..errors import ConfigError, SteadytrainError, TrainingError
from ..logs import get_logger
from ..optimizer_step import step_optimizer
from ..param_groups import param_groups
from ..pipeline import Pipeline
from . import measures
from .checkpoint import CHECKPOINT, FORMAT, load_checkpoint, save_atomic, write_json_atomic
from .metadata import record_metadata
from .models import Task, build_task
from .progress import Progress
from .settings import ExperimentConfig, TrainSettings

CONFIG = "config.json"
METRICS = "metrics.jsonl"
SUMMARY = "summary.json"
EVENTS = "events.jsonl"
SERIES = ("loss", "grad_norm", "logit_max", "attention_logit_max", "skipped")

log = get_logger("steadytrain.experiments")


class RunError(SteadytrainError):
    """A run cannot start or resume in its directory (it exists, its config differs, ...)."""


# -- the optimizer and its schedule ---------------------------------------------------------


def build_optimizer(model: torch.nn.Module, config: ExperimentConfig) -> torch.optim.Optimizer:
    """The optimizer of *config* over the model's parameter groups (the pipeline config's
    ``param_groups``)."""
    train = config.train
    groups = param_groups(model, config.pipeline.param_groups, lr=train.lr,
                          weight_decay=train.weight_decay)
    for group in groups:
        group["base_lr"] = group["lr"]
    if train.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=train.lr, momentum=train.momentum)
    kind = torch.optim.AdamW if train.optimizer == "adamw" else torch.optim.Adam
    return kind(groups, lr=train.lr, betas=train.betas)


def add_pipeline_parameters(optimizer: torch.optim.Optimizer, pipe: Pipeline,
                            train: TrainSettings) -> None:
    """The pipeline's own parameters (learnt layer weights, ...) as one more group at
    ``train.pipeline_lr`` (or ``train.lr``), without weight decay; they exist once the
    pipeline is set up."""
    params = list(pipe.parameters())
    if params:
        lr = train.lr if train.pipeline_lr is None else train.pipeline_lr
        optimizer.add_param_group({"params": params, "lr": lr, "base_lr": lr,
                                   "weight_decay": 0.0, "name": "pipeline"})


def lr_factor(step: int, train: TrainSettings) -> float:
    """Linear warmup over ``warmup_steps``, then cosine decay to 0 (or constant)."""
    warmup = train.warmup_steps
    if step < warmup:
        return (step + 1) / warmup
    if train.schedule == "constant":
        return 1.0
    progress = (step - warmup) / max(1, train.steps - warmup)
    return 0.5 * (1 + math.cos(math.pi * progress))


def set_lr(optimizer: torch.optim.Optimizer, factor: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = group["base_lr"] * factor


# -- the run directory ------------------------------------------------------------------------


def differences(saved: Mapping[str, Any], current: Mapping[str, Any], path: str = "") -> list[str]:
    """``key: saved -> current`` for every leaf that differs between two config dicts."""
    lines = []
    for key in sorted(set(saved) | set(current)):
        where = f"{path}.{key}" if path else key
        a, b = saved.get(key, "(absent)"), current.get(key, "(absent)")
        if isinstance(a, Mapping) and isinstance(b, Mapping):
            lines += differences(a, b, where)
        elif a != b:
            lines.append(f"{where}: {a!r} in the checkpoint, {b!r} now")
    return lines


def prepare_directory(out: Path, *, resume: bool, overwrite: bool) -> bool:
    """Make *out* ready; return whether the run resumes from its checkpoint."""
    if resume:
        if not (out / CHECKPOINT).exists():
            raise RunError(f"{out}: nothing to resume, there is no {CHECKPOINT}; run without "
                           "--resume to start")
        return True
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        if not overwrite:
            raise RunError(f"{out}: the output directory exists; pass --overwrite to replace "
                           "it, or --resume to continue the run in it")
        if not (out / CONFIG).exists():
            raise RunError(f"{out}: --overwrite only replaces a run directory (one with "
                           f"{CONFIG}) and this is not one, so nothing was deleted; choose "
                           "another --out")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    return False


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The lines of a ``metrics.jsonl``."""
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]


def series(lines: Sequence[Mapping[str, Any]], name: str) -> list[float]:
    """One per-step series of a run (``loss``, ``grad_norm``, ...) from its metrics lines."""
    return [float(x) for line in lines for x in line[name]]


# -- stopping on Ctrl-C ---------------------------------------------------------------------------


class StopRequest:
    """Set by the first SIGINT or SIGTERM; a second SIGINT interrupts at once."""

    def __init__(self) -> None:
        self.requested: str | None = None

    def _handle(self, signum: int, _frame: Any) -> None:
        self.requested = signal.Signals(signum).name
        signal.signal(signal.SIGINT, signal.default_int_handler)

    @contextmanager
    def installed(self) -> Iterator[StopRequest]:
        try:
            previous = {s: signal.signal(s, self._handle) for s in (signal.SIGINT, signal.SIGTERM)}
        except ValueError:  # not the main thread: signals stay with the host
            yield self
            return
        try:
            yield self
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)


# -- the loop ---------------------------------------------------------------------------------


class Interval:
    """The per-step measurements since the last metrics line, kept on the device."""

    def __init__(self) -> None:
        self.values: dict[str, list[torch.Tensor]] = {name: [] for name in SERIES}

    def add(self, **values: torch.Tensor) -> None:
        for name, value in values.items():
            self.values[name].append(value.detach().reshape(()).float())

    def read(self) -> dict[str, list[float]]:
        """The interval's values as floats (one host sync), and a fresh interval."""
        names = list(self.values)
        stacked = torch.stack([torch.stack(self.values[n]).cpu() for n in names]).tolist()
        self.values = {name: [] for name in SERIES}
        return dict(zip(names, stacked, strict=True))


def _largest(value: Any, device: torch.device) -> torch.Tensor:
    """The largest of a reported scalar or list of scalars; NaN when nothing was reported."""
    if value is None:
        return torch.full((), math.nan, device=device)
    if isinstance(value, (list, tuple)):
        return torch.stack([torch.as_tensor(v, device=device).float() for v in value]).amax()
    return torch.as_tensor(value, device=device).float()


def _device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device: 'cuda' is not available here; use 'cpu'")
    return torch.device(name)


def train(
    config: ExperimentConfig,
    out: str | Path,
    *,
    resume: bool = False,
    overwrite: bool = False,
    threads: int | None = None,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Train *config* into the run directory *out*; return the summary.

    The summary's ``status`` is ``"finished"``, ``"diverged"`` (the loss stayed non-finite
    for a whole log interval, or a plugin stopped the run) or ``"interrupted"`` (Ctrl-C
    or SIGTERM: the checkpoint and the metrics so far are written, and ``resume=True``
    continues). A resumed run reaches the weights an uninterrupted one reaches.
    """
    out = Path(out)
    plain = config.to_dict()
    resuming = prepare_directory(out, resume=resume, overwrite=overwrite)
    if resuming and (out / SUMMARY).exists():
        summary = json.loads((out / SUMMARY).read_text(encoding="utf-8"))
        saved = json.loads((out / CONFIG).read_text(encoding="utf-8"))["config"]
        if not differences(saved, plain) and summary["status"] != "interrupted":
            return summary
    if threads is not None:
        torch.set_num_threads(threads)
    train_settings = config.train
    device = _device(train_settings.device)
    torch.manual_seed(train_settings.seed)
    task = build_task(config, device)
    model = task.build_model().to(device)
    pipe = Pipeline.from_config(config.pipeline)
    optimizer = build_optimizer(model, config)
    task.prepare(pipe)
    pipe.setup(model, optimizer, total_steps=train_settings.steps)
    add_pipeline_parameters(optimizer, pipe, train_settings)
    try:
        return _run(config, plain, out, task, model, pipe, optimizer, resuming, progress)
    finally:
        pipe.close()


def _run(config: ExperimentConfig, plain: dict[str, Any], out: Path, task: Task,
         model: torch.nn.Module, pipe: Pipeline, optimizer: torch.optim.Optimizer,
         resuming: bool, progress: Progress | None) -> dict[str, Any]:
    settings = config.train
    device = next(model.parameters()).device
    if resuming:
        state = load_checkpoint(out / CHECKPOINT)
        if changed := differences(state["config"], plain):
            raise RunError(f"{out}: the config differs from the checkpoint's, so the run "
                           "cannot resume: " + "; ".join(changed[:6])
                           + ". Resume with the config it was started with, or start anew "
                           "with --overwrite or another --out")
        if state["data_sha256"] != task.data_sha256:
            raise RunError(f"{out}: the data changed since the checkpoint (sha256 "
                           f"{state['data_sha256'][:12]}… then, {task.data_sha256[:12]}… now)")
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        pipe.load_state_dict(state["pipeline"])
        torch.set_rng_state(state["rng"])
        if device.type == "cuda" and "cuda_rng" in state:
            torch.cuda.set_rng_state(state["cuda_rng"])
        start, initial = int(state["step"]), float(state["initial_loss"])
        seconds = float(state["train_seconds"])
        with open(out / METRICS, "r+b") as metrics:
            metrics.truncate(int(state["metrics_bytes"]))
        log.info("run.resumed", out=str(out), step=start)
    else:
        write_json_atomic({"format": FORMAT, "steadytrain": __version__, "config": plain,
                           "data_sha256": task.data_sha256}, out / CONFIG)
        (out / METRICS).write_bytes(b"")
        initial = evaluate(task, model)["loss"]
        start, seconds = 0, 0.0
        log.info("run.started", out=str(out), model=config.model.name, lr=settings.lr,
                 seed=settings.seed, steps=settings.steps, initial_loss=round(initial, 4))
    record_metadata(out, config, pipe, task.data_sha256, step=start)

    def checkpoint(step: int, finished: bool = False) -> None:
        state = {
            "format": FORMAT, "step": step, "finished": finished, "config": plain,
            "data_sha256": task.data_sha256, "initial_loss": initial,
            "train_seconds": seconds, "metrics_bytes": (out / METRICS).stat().st_size,
            "model": model.state_dict(), "optimizer": optimizer.state_dict(),
            "pipeline": pipe.state_dict(), "rng": torch.get_rng_state(),
        }
        if device.type == "cuda":
            state["cuda_rng"] = torch.cuda.get_rng_state()
        save_atomic(state, out / CHECKPOINT)
        log.debug("checkpoint.saved", step=step, finished=finished)

    status = "finished"
    interval = Interval()
    stop = StopRequest()
    step = start
    with stop.installed(), open(out / METRICS, "a", encoding="utf-8") as metrics:
        began = time.perf_counter()
        model.train()
        try:
            for step in range(start, settings.steps):
                set_lr(optimizer, lr_factor(step, settings))
                _step(task, model, pipe, optimizer, interval, step, device)
                done = step + 1
                boundary = done % settings.log_every == 0 or done == settings.steps
                if not (boundary or stop.requested):
                    continue
                seconds += time.perf_counter() - began
                line = {"step": done, "lr": optimizer.param_groups[-1]["lr"],
                        "seconds": round(seconds, 3), **interval.read(),
                        "pipeline": pipe.metrics()}
                metrics.write(json.dumps(line) + "\n")
                metrics.flush()
                if progress is not None:
                    progress.update(done, _progress_text(line))
                if not any(math.isfinite(x) for x in line["loss"]):
                    status = "diverged"
                    log.warning("run.diverged", step=done, reason="non-finite loss")
                    break
                if stop.requested and done < settings.steps:
                    status = "interrupted"
                    checkpoint(done)
                    log.warning("run.interrupted", step=done, signal=stop.requested,
                                resume=f"steadytrain run ... --out {out} --resume")
                    break
                if done % settings.checkpoint_every == 0 and done < settings.steps:
                    checkpoint(done)
                began = time.perf_counter()
        except TrainingError as exc:
            status = "diverged"
            log.warning("run.diverged", step=step, reason=str(exc))
    if progress is not None:
        progress.close()
    summary = summarize(config, task, model, pipe, out, status=status, initial=initial,
                        seconds=seconds)
    if status != "interrupted":
        checkpoint(summary["steps_done"], finished=True)
    write_json_atomic(summary, out / SUMMARY)
    log.info("run.ended", status=status, final_loss=summary["final_loss"],
             steps=summary["steps_done"])
    return summary


def _step(task: Task, model: torch.nn.Module, pipe: Pipeline, optimizer: torch.optim.Optimizer,
          interval: Interval, step: int, device: torch.device) -> None:
    """One optimizer step of the plain loop, and its measurements."""
    inputs, targets = task.batch(step)
    ctx = pipe.before_step(batch=inputs, targets=targets)
    loss, outputs = task.loss(model, inputs, targets)
    total = pipe.compute_loss(loss * task.task_weight, outputs=outputs)
    total.backward(create_graph=pipe.needs_create_graph)
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    grad_norm = torch.nn.utils.get_total_norm(grads, foreach=True) if grads else \
        torch.zeros((), device=device)
    outcome = pipe.after_backward()
    step_optimizer(optimizer, outcome)
    pipe.consolidate()
    optimizer.zero_grad(set_to_none=True)
    logits = outputs.get("logits")
    interval.add(
        loss=loss, grad_norm=grad_norm,
        logit_max=_largest(None if logits is None else logits.detach().abs().amax(), device),
        attention_logit_max=_largest(ctx.outputs.get("attention_logits_max"), device),
        skipped=torch.as_tensor(outcome.flag, device=device),
    )


def _progress_text(line: Mapping[str, Any]) -> str:
    finite = [x for x in line["loss"] if math.isfinite(x)]
    loss = sum(finite) / len(finite) if finite else math.nan
    text = f"loss {loss:.4f}  grad {max(line['grad_norm']):.3g}"
    attention = [x for x in line["attention_logit_max"] if math.isfinite(x)]
    if attention:
        text += f"  attn logit {max(attention):.3g}"
    skipped = int(sum(line["skipped"]))
    return text + (f"  skipped {skipped}" if skipped else "")


def machine(device: str) -> str:
    """Where a run ran, for the tables: processor, cores, threads, accelerator, torch."""
    where = f"{platform.machine()} {os.cpu_count()} cores, {torch.get_num_threads()} thread(s)"
    if device == "cuda":
        where += f", {torch.cuda.get_device_name()}"
    return f"{where}, torch {torch.__version__.split('+')[0]}"


def evaluate(task: Task, model: torch.nn.Module) -> dict[str, float]:
    """The task's evaluation in eval mode (the model goes back to training mode after)."""
    model.eval()
    try:
        return task.evaluate(model)
    finally:
        model.train()


@torch.no_grad()
def frozen_losses(task: Task, model: torch.nn.Module, steps: range) -> list[float]:
    """The task loss of the model as it is now, without training, on the batches of *steps*."""
    model.eval()
    try:
        return [task.loss(model, *task.batch(step))[0].item() for step in steps]
    finally:
        model.train()


def summarize(config: ExperimentConfig, task: Task, model: torch.nn.Module, pipe: Pipeline,
              out: Path, *, status: str, initial: float, seconds: float) -> dict[str, Any]:
    """The run's measures, from its metrics file and an evaluation of its final weights.

    ``final_loss`` is the validation loss of the weights the pipeline evaluates with
    (inside ``pipe.evaluating()``: the average where a plugin keeps one), and
    ``val_loss_raw`` that of the raw weights; ``final_metrics`` are the pipeline's metrics
    of the last log interval. The oscillation ratio is taken over the last fifth of the
    run (at least 10 steps), and its noise floor from the final raw weights, frozen, on
    the batches of those same steps.
    """
    lines = read_metrics(out / METRICS)
    losses = series(lines, "loss")
    done = lines[-1]["step"] if lines else 0
    raw = averaged = {"loss": math.nan}
    if status != "interrupted":
        raw = evaluate(task, model)
        with pipe.evaluating():
            averaged = evaluate(task, model)
    tail = range(max(0, done - max(measures.OSCILLATION_WINDOW, done // 5)), done)
    frozen = frozen_losses(task, model, tail) if status == "finished" else []
    final = averaged["loss"]
    train = config.train

    def largest(name: str) -> float:
        values = [x for x in series(lines, name) if math.isfinite(x)]
        return max(values) if values else math.nan

    return {
        "status": status, "steps_done": done, "steps": train.steps, "lr": train.lr,
        "seed": train.seed, "model": config.model.name, "data": config.data.source,
        "initial_loss": initial, "final_loss": final,
        "val_loss_raw": raw["loss"], "val_loss_averaged": averaged["loss"],
        "diverged": status == "diverged" or measures.diverged(final, initial),
        "spikes": measures.count_spikes(losses),
        "skipped_steps": int(sum(series(lines, "skipped"))),
        "max_grad_norm": largest("grad_norm"), "max_logit": largest("logit_max"),
        "max_attention_logit": largest("attention_logit_max"),
        "oscillation_ratio": measures.oscillation_ratio([losses[i] for i in tail]),
        "oscillation_floor": measures.oscillation_ratio(frozen),
        "seconds_per_step": seconds / done if done else math.nan,
        "machine": machine(config.train.device),
        "extras": {k: v for k, v in averaged.items() if k != "loss"},
        "final_metrics": lines[-1]["pipeline"] if lines else {},
    }
