"""Several configs on the same model, data and seeds, over a sweep of learning rates.

Every (config, learning rate, seed) is one ``steadytrain run`` in its own process and run
directory, ``OUT/<config>/lr_<lr>/seed_<seed>``, so that each is resumable on its own
and several run at once. A run whose directory already holds a finished summary of the
same config is reused with ``--resume``. When every run has ended, the measures of
:mod:`~steadytrain.experiments.measures` are computed per config and written as a table
(``OUT/results.md``, and to the terminal) and a figure (``OUT/comparison.png``).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import attrs

from ..errors import ConfigError
from . import measures
from .checkpoint import write_json_atomic
from .loop import CHECKPOINT, CONFIG, METRICS, SUMMARY, RunError, differences, read_metrics
from .models import model_options
from .progress import Progress
from .settings import ExperimentConfig, load_experiment

MARKER = "compare.json"
RESULTS = "results.md"
FIGURE = "comparison.png"
INTERRUPTED = 130


def lr_sweep(low: float, high: float, count: int) -> list[float]:
    """*count* learning rates from *low* to *high*, evenly spaced in log scale."""
    if not (low > 0 and high > 0 and math.isfinite(low) and math.isfinite(high)):
        raise ConfigError(f"--lr-sweep: LO and HI must be positive numbers, got {low} {high}")
    if low >= high:
        raise ConfigError(f"--lr-sweep: LO must be below HI, got LO={low:g} >= HI={high:g}")
    if count < 2:
        raise ConfigError(f"--lr-sweep: N must be at least 2, got {count}")
    ratio = (high / low) ** (1 / (count - 1))
    return [float(f"{low * ratio**i:.4g}") for i in range(count)]


@attrs.frozen
class Planned:
    """One run of the comparison."""

    label: str
    path: Path
    config: ExperimentConfig
    out: Path
    log: Path
    removed: tuple[str, ...] = ()

    @property
    def name(self) -> str:
        return f"{self.label} lr={self.config.train.lr:g} seed={self.config.train.seed}"


def labels_of(paths: Sequence[Path]) -> list[str]:
    """File stems, or ``folder_stem`` for all when two stems collide."""
    stems = [p.stem for p in paths]
    if len(set(stems)) == len(stems):
        return stems
    labels = [f"{p.parent.name}_{p.stem}" for p in paths]
    if len(set(labels)) != len(labels):
        raise ConfigError("compare: the configs " + ", ".join(map(str, paths))
                          + " cannot be told apart by their file names; rename one")
    return labels


def ablations(label: str, config: ExperimentConfig) -> list[tuple[str, tuple[str, ...]]]:
    """``(label, removed ids)``: the config itself, then without each enabled instance."""
    off = set(config.pipeline.disable)
    ids = [i.id for i in config.pipeline.plugins
           if i.enabled and i.id not in off and i.plugin not in off]
    return [(label, ()), *((f"{label}-no_{i}", (i,)) for i in ids)]


def plan(paths: Sequence[Path], out: Path, *, lrs: Sequence[float] | None,
         seeds: Sequence[int] | None, model: str | None, disable: tuple[str, ...] = (),
         no_autoload: bool = False, ablate: bool = False,
         device: str | None = None) -> list[Planned]:
    """Every run of the comparison, after checking that the configs can be compared.

    With *ablate*, the last config also runs once without each of its plugin instances.
    """
    if not paths:
        raise ConfigError("compare: name at least one config file")
    configs = [load_experiment(p, model=model, model_options=model_options)
               .with_disabled(disable, no_autoload=no_autoload).with_overrides(device=device)
               for p in paths]
    first = configs[0]
    for path, config in zip(paths[1:], configs[1:], strict=True):
        for what, mine, theirs in (
            ("model.name", config.model.name, first.model.name),
            ("data", config.data, first.data),
            ("train.steps", config.train.steps, first.train.steps),
        ):
            if mine != theirs:
                raise ConfigError(
                    f"compare: {path} and {paths[0]} differ in {what} ({mine!r} and "
                    f"{theirs!r}); compared configs share the model, the data and the budget"
                )
    variants = [(label, path, config, ())
                for label, path, config in zip(labels_of(paths), paths, configs, strict=True)]
    if ablate:
        label, path, config, _ = variants.pop()
        variants += [(name, path, config.with_disabled(removed), removed)
                     for name, removed in ablations(label, config)]
    # Seed by seed: a comparison cut short still has whole sweeps of every config.
    runs = []
    for index in range(len(seeds) if seeds is not None else 1):
        for label, path, config, removed in variants:
            seed = seeds[index] if seeds is not None else config.train.seed
            for lr in lrs or [config.train.lr]:
                run = config.with_overrides(lr=lr, seed=seed)
                where = Path(label) / f"lr_{lr:g}" / f"seed_{seed}"
                runs.append(Planned(label, path, run, out / where,
                                    out / "logs" / where.with_suffix(".log"), removed))
    return runs


def prepare_directory(out: Path, runs: Sequence[Planned], *, resume: bool,
                      overwrite: bool) -> None:
    """Check *out* against the flags and write its marker."""
    marker = out / MARKER
    if out.exists() and any(out.iterdir()) and not resume:
        if not overwrite:
            raise RunError(f"{out}: the output directory exists; pass --overwrite to replace "
                           "it, or --resume to reuse its finished runs and resume the others")
        if not marker.exists():
            raise RunError(f"{out}: --overwrite only replaces a comparison directory (one with "
                           f"{MARKER}) and this is not one, so nothing was deleted; choose "
                           "another --out")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic({"runs": [{"label": r.label, "config": str(r.path),
                                 "lr": r.config.train.lr, "seed": r.config.train.seed,
                                 "out": str(r.out.relative_to(out))} for r in runs]}, marker)


def finished_summary(run: Planned) -> dict[str, Any] | None:
    """The summary of a run that already ended with this config, else ``None``."""
    try:
        summary = json.loads((run.out / SUMMARY).read_text(encoding="utf-8"))
        saved = json.loads((run.out / CONFIG).read_text(encoding="utf-8"))["config"]
    except (OSError, ValueError, KeyError):
        return None
    if summary.get("status") == "interrupted" or differences(saved, run.config.to_dict()):
        return None
    return summary


def _changes(run: Planned) -> str:
    """What differs between *run*'s config and the one its directory started with ('' if
    nothing does, or the directory holds no run)."""
    try:
        saved = json.loads((run.out / CONFIG).read_text(encoding="utf-8"))["config"]
    except (OSError, ValueError, KeyError):
        return ""
    return "; ".join(line.replace(" in the checkpoint, ", " in the run, ")
                     .replace(" now", " in this command")
                     for line in differences(saved, run.config.to_dict()))


def check_report_options(runs: Sequence[Planned]) -> None:
    """Refuse a ``--report`` whose options differ from those its runs ended with.

    A run that ended with another config (another ``--device``, ``--lr-sweep`` or model
    option) would otherwise count as missing, and the table would be empty without a word.
    """
    for run in runs:
        try:
            summary = json.loads((run.out / SUMMARY).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if summary.get("status") != "interrupted" and (changed := _changes(run)):
            raise RunError(f"{run.out}: this run ended with another config ({changed}); "
                           "pass --report the configs and options the comparison ran with")


def check_resumable(runs: Sequence[Planned]) -> None:
    """Refuse a ``--resume`` that would continue a run with another config than it started
    with (each such run would fail on its own, and count as diverged), before any runs."""
    for run in runs:
        if changed := _changes(run):
            raise RunError(f"{run.out}: this run started with another config ({changed}), so "
                           "--resume cannot continue it; resume with the configs and options "
                           "the comparison started with, or start anew in another --out")


def command(run: Planned, *, threads: int, model: str | None,
            global_flags: Sequence[str]) -> list[str]:
    """The ``steadytrain run`` command line of *run*."""
    removed = [flag for name in run.removed for flag in ("-p", f"no:{name}")]
    args = [sys.executable, "-m", "steadytrain", *global_flags, *removed, "run", str(run.path),
            "--out", str(run.out), "--lr", repr(run.config.train.lr),
            "--seed", str(run.config.train.seed), "--threads", str(threads),
            "--device", run.config.train.device, "--quiet"]
    if model is not None:
        args += ["--model", model]
    if (run.out / CHECKPOINT).exists():
        args.append("--resume")
    elif (run.out / CONFIG).exists():
        args.append("--overwrite")
    return args


@attrs.define
class Outcome:
    """How one run of the comparison ended."""

    run: Planned
    summary: dict[str, Any] | None = None
    error: str | None = None
    interrupted: bool = False


def execute(runs: Sequence[Planned], *, jobs: int, threads: int, model: str | None,
            global_flags: Sequence[str], progress: Progress | None) -> list[Outcome]:
    """Run every planned run, *jobs* at a time; Ctrl-C stops them at a resumable point."""
    outcomes = {id(r): Outcome(r, summary=finished_summary(r)) for r in runs}
    waiting = [r for r in runs if outcomes[id(r)].summary is None]
    running: dict[int, tuple[Planned, subprocess.Popen[bytes]]] = {}
    stopping = False

    def stop(_signum: int, _frame: Any) -> None:
        nonlocal stopping
        stopping = True
        for _run, process in running.values():
            process.send_signal(signal.SIGINT)
        signal.signal(signal.SIGINT, signal.default_int_handler)

    previous = signal.signal(signal.SIGINT, stop)
    done = len(runs) - len(waiting)
    try:
        while waiting or running:
            while waiting and len(running) < jobs and not stopping:
                run = waiting.pop(0)
                run.log.parent.mkdir(parents=True, exist_ok=True)
                log = open(run.log, "ab")  # noqa: SIM115 - the child owns it
                process = subprocess.Popen(
                    command(run, threads=threads, model=model, global_flags=global_flags),
                    stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                )
                log.close()
                running[process.pid] = (run, process)
            for pid, (run, process) in list(running.items()):
                code = process.poll()
                if code is None:
                    continue
                del running[pid]
                done += 1
                outcomes[id(run)] = _outcome(run, code)
            if progress is not None:
                names = ", ".join(r.name for r, _ in running.values())
                progress.update(done, f"runs  running: {names}" if names else "runs")
            if stopping and not running:
                break
            time.sleep(0.1)
    finally:
        signal.signal(signal.SIGINT, previous)
        for _run, process in running.values():
            process.send_signal(signal.SIGINT)
        for _run, process in running.values():
            try:
                process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                process.kill()
        if progress is not None:
            progress.close()
    for run in waiting:
        outcomes[id(run)].interrupted = True
    return [outcomes[id(r)] for r in runs]


def _outcome(run: Planned, code: int) -> Outcome:
    summary = finished_summary(run) if code == 0 else None
    if code == 0 and summary is not None:
        return Outcome(run, summary=summary)
    if code == INTERRUPTED:
        return Outcome(run, interrupted=True)
    tail = run.log.read_text(encoding="utf-8", errors="replace")
    lines = [line for line in tail.splitlines() if line.strip()]
    return Outcome(run, error=lines[-1] if lines else f"exit status {code}")


# -- the measures of a comparison -----------------------------------------------------------


def _final(outcome: Outcome) -> float:
    if outcome.summary is None:
        return math.nan
    final = outcome.summary["final_loss"]
    return final if final is not None else math.nan


def config_measures(outcomes: Sequence[Outcome]) -> dict[str, Any]:
    """The measures of one config over its learning rates and seeds (``runs``: those ended).

    A seed counts when every learning rate of it has ended (finished, diverged or
    failed; a failed run counts as diverged): a sweep cut short says nothing about the
    learning rates it did not reach. Final losses are capped at the initial loss, and a
    non-finite one counts as the initial loss, as in the LR sensitivity.
    """
    by_seed: dict[int, dict[float, Outcome]] = {}
    for o in outcomes:
        by_seed.setdefault(o.run.config.train.seed, {})[o.run.config.train.lr] = o
    initial = {seed: next(o.summary["initial_loss"] for o in runs.values() if o.summary)
               for seed, runs in by_seed.items() if any(o.summary for o in runs.values())}
    complete = {seed: {lr: _final(o) for lr, o in runs.items()} for seed, runs in by_seed.items()
                if seed in initial and all(o.summary or o.error for o in runs.values())}
    sensitivity = [measures.lr_sensitivity(f, initial[s]) for s, f in complete.items()]
    best = [measures.best_loss(f) for f in complete.values()]
    largest = [measures.largest_converging_lr(f, initial[s]) for s, f in complete.items()]
    lrs = sorted({o.run.config.train.lr for o in outcomes})
    final_by_lr = {lr: measures.mean_and_spread([measures.capped(f[lr], initial[s])
                                                  for s, f in complete.items()]) for lr in lrs}
    mean_final = {lr: pair[0] for lr, pair in final_by_lr.items()}
    summaries = [o.summary for o in outcomes if o.summary is not None]
    at_best = [o.summary for o in outcomes if o.summary is not None
               and o.run.config.train.seed in complete
               and o.run.config.train.lr == measures.best_lr(mean_final)]

    def values(key: str) -> list[float]:
        return [float(s[key]) for s in summaries if s.get(key) is not None]

    def largest_of(key: str) -> float:
        finite = [v for v in values(key) if math.isfinite(v)]
        return max(finite) if finite else math.nan

    return {
        "lr_sensitivity": measures.mean_and_spread(sensitivity),
        "best_loss": measures.mean_and_spread(best),
        "best_lr": measures.best_lr(mean_final),
        "largest_converging_lr": measures.mean_and_spread(largest),
        "within_10": measures.lr_range_within(mean_final),
        "final_by_lr": final_by_lr,
        "seeds": (len(complete), len(by_seed)),
        "diverged": sum(1 for s in summaries if s["diverged"]),
        "failed": sum(1 for o in outcomes if o.error is not None),
        "runs": sum(1 for o in outcomes if o.summary or o.error),
        "spikes": int(sum(values("spikes"))),
        "skipped_steps": int(sum(values("skipped_steps"))),
        "max_grad_norm": largest_of("max_grad_norm"),
        "max_logit": largest_of("max_logit"),
        "max_attention_logit": largest_of("max_attention_logit"),
        "oscillation_ratio": measures.mean_and_spread(values("oscillation_ratio"))[0],
        "oscillation_floor": measures.mean_and_spread(values("oscillation_floor"))[0],
        "seconds_per_step": measures.mean_and_spread(values("seconds_per_step"))[0],
        "val_loss_raw_at_best": measures.mean_and_spread(
            [s["val_loss_raw"] for s in at_best])[0],
        "extras_at_best": {
            key: measures.mean_and_spread([s["extras"][key] for s in at_best])
            for key in sorted({k for s in summaries for k in s.get("extras", {})})
        },
    }


def _num(value: float, digits: int = 4) -> str:
    return "—" if value is None or not math.isfinite(value) else f"{value:.{digits}g}"


def _pm(pair: tuple[float, float], digits: int = 4) -> str:
    mean, spread = pair
    if not math.isfinite(mean):
        return "—"
    return f"{mean:.{digits}g} ± {spread:.2g}" if spread else f"{mean:.{digits}g}"


def tables(by_label: Mapping[str, dict[str, Any]], seeds: int) -> str:
    """The comparison as Markdown: the measures per config, then final loss per lr."""
    lines = [
        "| config | seeds | LR sensitivity | best loss | best lr | largest converging lr | lr "
        "within 10 % of best | diverged | spikes | skipped steps | max grad norm | max output "
        "logit | max attention logit | osc. ratio (floor) | s/step |",
        "|" + " --- |" * 15,
    ]
    for label, m in by_label.items():
        low, high = m["within_10"]
        span = f"{_num(low, 3)} – {_num(high, 3)}" if math.isfinite(low) else "—"
        done, seeds = m["seeds"]
        lines.append(
            f"| {label} | {done}/{seeds} | {_pm(m['lr_sensitivity'])} | {_pm(m['best_loss'])} | "
            f"{_num(m['best_lr'], 3)} | {_pm(m['largest_converging_lr'], 3)} | {span} | "
            f"{m['diverged']}/{m['runs']} | {m['spikes']} | {m['skipped_steps']} | "
            f"{_num(m['max_grad_norm'], 3)} | {_num(m['max_logit'], 3)} | "
            f"{_num(m['max_attention_logit'], 3)} | {_num(m['oscillation_ratio'], 3)} "
            f"({_num(m['oscillation_floor'], 3)}) | {_num(m['seconds_per_step'], 2)} |"
        )
    lrs = sorted({lr for m in by_label.values() for lr in m["final_by_lr"]})
    lines += ["", f"Final validation loss per learning rate (mean ± std over the complete "
              f"seeds, at most {seeds}; a diverged run counts as the initial loss):", "",
              "| config | " + " | ".join(f"{lr:g}" for lr in lrs) + " |",
              "|" + " --- |" * (len(lrs) + 1)]
    for label, m in by_label.items():
        cells = [_pm(m["final_by_lr"].get(lr, (math.nan, math.nan))) for lr in lrs]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    extras = sorted({k for m in by_label.values() for k in m["extras_at_best"]})
    lines += ["", "At each config's best learning rate (mean over seeds; the final loss is "
              "that of the weights the pipeline evaluates with, averaged where a plugin "
              "keeps an average):", "",
              "| config | best lr | final loss | raw weights | "
              + "".join(f"{k} | " for k in extras),
              "|" + " --- |" * (len(extras) + 4)]
    for label, m in by_label.items():
        cells = [_pm(m["extras_at_best"].get(k, (math.nan, math.nan))) for k in extras]
        lines.append(f"| {label} | {_num(m['best_lr'], 3)} | "
                     f"{_num(m['final_by_lr'].get(m['best_lr'], (math.nan,))[0])} | "
                     f"{_num(m['val_loss_raw_at_best'])} | " + "".join(f"{c} | " for c in cells))
    return "\n".join(lines) + "\n"


def terminal_table(by_label: Mapping[str, dict[str, Any]]) -> str:
    """The main measures as aligned plain text."""
    rows = [("config", "LR sensitivity", "best loss", "best lr", "within 10%", "diverged",
             "max attn logit", "s/step")]
    for label, m in by_label.items():
        low, high = m["within_10"]
        rows.append((label, _pm(m["lr_sensitivity"]), _pm(m["best_loss"]),
                     _num(m["best_lr"], 3),
                     f"{_num(low, 3)}–{_num(high, 3)}" if math.isfinite(low) else "—",
                     f"{m['diverged']}/{m['runs']}", _num(m["max_attention_logit"], 3),
                     _num(m["seconds_per_step"], 2)))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True))
                     for r in rows) + "\n"


def compare(
    paths: Sequence[str | Path], out: str | Path, *, lrs: Sequence[float] | None = None,
    seeds: Sequence[int] | None = None, jobs: int | None = None, threads: int = 1,
    resume: bool = False, overwrite: bool = False, model: str | None = None,
    disable: tuple[str, ...] = (), no_autoload: bool = False, ablate: bool = False,
    curve_lr: float | None = None, plot: bool = True, progress: bool = True,
    device: str | None = None, report: bool = False,
) -> dict[str, Any]:
    """Run the comparison and write its table and figure; return what it found.

    With *report*, nothing runs: the table and figure are made from the runs that have
    ended in *out* (the others count as missing).

    Returns ``{"measures": {label: ...}, "outcomes": [...], "table": markdown,
    "figure": path or None, "interrupted": bool}``.
    """
    out = Path(out)
    runs = plan([Path(p) for p in paths], out, lrs=lrs, seeds=seeds, model=model,
                disable=disable, no_autoload=no_autoload, ablate=ablate, device=device)
    global_flags = [*(f for name in disable for f in ("-p", f"no:{name}")),
                    *(["--no-autoload"] if no_autoload else [])]
    if plot:
        from .plots import require_matplotlib

        require_matplotlib()
    if report:
        if not (out / MARKER).exists():
            raise RunError(f"{out}: --report needs a comparison directory (one with {MARKER})")
        check_report_options(runs)
        outcomes = [Outcome(r, summary=finished_summary(r)) for r in runs]
    else:
        if resume:
            check_resumable(runs)
        prepare_directory(out, runs, resume=resume, overwrite=overwrite)
        jobs = jobs or max(1, (os.cpu_count() or 1) // threads)
        bar = Progress("compare", len(runs)) if progress else None
        outcomes = execute(runs, jobs=jobs, threads=threads, model=model,
                           global_flags=global_flags, progress=bar)
    interrupted = any(o.interrupted for o in outcomes)
    labels = list(dict.fromkeys(r.label for r in runs))
    by_label = {label: config_measures([o for o in outcomes if o.run.label == label])
                for label in labels}
    seed_count = len({r.config.train.seed for r in runs})
    table = tables(by_label, seed_count)
    failures = [f"- {o.run.name}: {o.error}" for o in outcomes if o.error]
    machines = sorted({o.summary.get("machine", "?") for o in outcomes if o.summary})
    text = table + (("\nFailed runs (counted as diverged):\n\n" + "\n".join(failures) + "\n")
                    if failures else "") + f"\nRuns on: {'; '.join(machines) or '-'}.\n"
    (out / RESULTS).write_text(text, encoding="utf-8")
    figure = None
    if plot and (report or not interrupted):
        from .plots import plot_comparison

        figure = out / FIGURE
        plot_comparison(outcomes, by_label, figure, curve_lr=curve_lr)
    return {"measures": by_label, "outcomes": outcomes, "table": table,
            "terminal": terminal_table(by_label), "failures": failures,
            "figure": figure, "interrupted": interrupted,
            "missing": sum(1 for o in outcomes if o.summary is None and o.error is None)}


def curves(outcome: Outcome) -> dict[str, list[float]]:
    """The per-step series of a run, for plots."""
    lines = read_metrics(outcome.run.out / METRICS)
    return {name: [float(x) for line in lines for x in line[name]]
            for name in ("loss", "grad_norm", "logit_max", "skipped")}
