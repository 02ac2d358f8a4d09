"""The subcommands ``run``, ``compare`` and ``demo`` of the ``steadytrain`` command.

    steadytrain run CONFIG [--out DIR] [--resume | --overwrite] [--lr X] [--seed N] ...
    steadytrain compare A B ... [--lr-sweep LO HI N] [--seeds S ...] [--out DIR] ...
    steadytrain demo [--full]

Exit status: 0 when done, 130 when interrupted (Ctrl-C; the runs are resumable), 1 on an
error (the message names the file, option or directory at fault).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from . import demo as demo_configs
from .checkpoint import load_checkpoint
from .compare import INTERRUPTED, MARKER, compare, lr_sweep
from .events import configure
from .loop import CHECKPOINT, CONFIG, EVENTS, train
from .models import model_options
from .progress import Progress
from .settings import load_experiment

RUN_THREADS = min(2, os.cpu_count() or 1)


def _disabled(args: argparse.Namespace) -> tuple[str, ...]:
    from ..cli import _disabled as parse

    return tuple(parse(args))


def cmd_run(args: argparse.Namespace) -> int:
    config = load_experiment(args.config, model=args.model, model_options=model_options)
    config = config.with_overrides(lr=args.lr, seed=args.seed, steps=args.steps,
                                   device=args.device)
    config = config.with_disabled(_disabled(args), no_autoload=args.no_autoload)
    out = Path(args.out) if args.out else Path("runs") / Path(args.config).stem
    progress = None if args.quiet else Progress(f"run {out}", config.train.steps)
    restore = configure(out / EVENTS, None if progress is None else progress.write)
    try:
        summary = train(config, out, resume=args.resume, overwrite=args.overwrite,
                        threads=args.threads, progress=progress)
    except KeyboardInterrupt:  # a second Ctrl-C, or one before training: no clean stop
        if progress is not None:
            progress.close()
        if (out / CHECKPOINT).exists():
            kept = (f"the checkpoint of step {load_checkpoint(out / CHECKPOINT)['step']} is "
                    f"kept; resume with: steadytrain run {args.config} --out {out} --resume")
        else:
            again = " with --overwrite" if (out / CONFIG).exists() else ""
            kept = f"no checkpoint was written yet; start again{again}"
        print(f"{out}: stopped at once (Ctrl-C): {kept}", file=sys.stderr)
        return INTERRUPTED
    finally:
        restore()
    print(f"{out}: {summary['status']} after {summary['steps_done']} steps; "
          + (f"final validation loss {summary['final_loss']:.4f} (initial "
             f"{summary['initial_loss']:.4f}), {summary['spikes']} spikes, "
             f"{summary['skipped_steps']} skipped steps, {summary['seconds_per_step']:.3f} "
             "s/step" if summary["status"] != "interrupted"
             else f"resume with: steadytrain run {args.config} --out {out} --resume"))
    return INTERRUPTED if summary["status"] == "interrupted" else 0


def _report(result: dict[str, Any], out: Path, resume_hint: str) -> int:
    print(result["terminal"], end="")
    for failure in result["failures"]:
        print(f"failed: {failure[2:]}", file=sys.stderr)
    print(f"table: {out / 'results.md'}")
    if result["figure"] is not None:
        print(f"plot: {result['figure']}")
    if result["interrupted"]:
        print(f"interrupted: {result['missing']} run(s) did not end; they are resumable: "
              f"{resume_hint}", file=sys.stderr)
        return INTERRUPTED
    if result["missing"]:
        print(f"{result['missing']} run(s) have not ended: their seeds are left out of the "
              "measures", file=sys.stderr)
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    lrs = None
    if args.lr_sweep is not None:
        low, high, count = args.lr_sweep
        try:
            count = int(count)
        except ValueError:
            raise ConfigError(f"--lr-sweep: N must be an integer, got {count!r}") from None
        lrs = lr_sweep(float(low), float(high), count)
    out = Path(args.out)
    result = compare(args.configs, out, lrs=lrs, seeds=args.seeds, jobs=args.jobs,
                     threads=args.threads, resume=args.resume, overwrite=args.overwrite,
                     model=args.model, disable=_disabled(args), no_autoload=args.no_autoload,
                     ablate=args.ablate, curve_lr=args.curve_lr, plot=not args.no_plot,
                     progress=not args.quiet, device=args.device, report=args.report)
    return _report(result, out, "the same command with --resume")


def cmd_demo(args: argparse.Namespace) -> int:
    sweep = demo_configs.FULL if args.full else demo_configs.QUICK
    out = Path(args.out or ("steadytrain-demo-full" if args.full else "steadytrain-demo"))
    if out.exists() and any(out.iterdir()) and not (out / MARKER).exists():
        raise ConfigError(f"{out}: exists and is not a demo directory; pass --out elsewhere")
    paths = demo_configs.write_configs(out / "configs")
    lrs = ", ".join(f"{lr:g}" for lr in sweep["lrs"])
    print(f"steadytrain demo: a 2-layer byte-level GPT on Python's documentation, baseline "
          f"against qk-layernorm + z-loss, at learning rates {lrs}, seed(s) "
          f"{', '.join(map(str, sweep['seeds']))}.")
    result = compare(paths, out, lrs=sweep["lrs"], seeds=sweep["seeds"], jobs=args.jobs,
                     threads=args.threads, resume=True, plot=not args.no_plot,
                     progress=not args.quiet)
    code = _report(result, out, "steadytrain demo" + (" --full" if args.full else ""))
    if code == 0:
        print(_reading(result["measures"]))
    return code


def _reading(measures: dict[str, Any]) -> str:
    """One sentence on what the demo's table shows, from its own numbers."""
    base, stab = measures.get("baseline"), measures.get("stabilized")
    if base is None or stab is None:
        return ""
    b, s = base["lr_sensitivity"][0], stab["lr_sensitivity"][0]
    if not (math.isfinite(b) and math.isfinite(s)):
        return ""
    verb = "lowers" if s < b else "does not lower"
    return (f"Here qk-layernorm + z-loss {verb} the LR sensitivity ({b:.3f} -> {s:.3f}; "
            f"best loss {base['best_loss'][0]:.3f} -> {stab['best_loss'][0]:.3f}); the "
            "largest attention logit shows why.")


def add_commands(sub: Any) -> None:
    """Add ``run``, ``compare`` and ``demo`` to the ``steadytrain`` subcommands."""
    run = sub.add_parser("run", help="train one config: progress, metrics, checkpoints",
                         description="Train the model of CONFIG with its pipeline.")
    run.add_argument("config", help="a run config (TOML, YAML or JSON)")
    run.add_argument("--out", help="the run directory (default: runs/<config name>)")
    _run_flags(run, threads=RUN_THREADS)
    run.add_argument("--lr", type=float, help="override train.lr")
    run.add_argument("--seed", type=int, help="override train.seed")
    run.add_argument("--steps", type=int, help="override train.steps")
    run.set_defaults(func=cmd_run)

    comp = sub.add_parser("compare", help="several configs over learning rates and seeds",
                          description="Train each config at each learning rate and seed, "
                          "in parallel processes, and compare their stability.")
    comp.add_argument("configs", nargs="+", help="run configs sharing model, data and steps")
    comp.add_argument("--lr-sweep", nargs=3, metavar=("LO", "HI", "N"), type=str,
                      help="N learning rates from LO to HI, log-spaced (default: each "
                      "config's train.lr)")
    comp.add_argument("--seeds", nargs="+", type=int, help="seeds (default: each config's)")
    comp.add_argument("--out", default="steadytrain-compare", help="the comparison directory")
    comp.add_argument("--jobs", type=int, help="runs at a time (default: CPU cores / threads)")
    comp.add_argument("--curve-lr", type=float,
                      help="learning rate of the loss and gradient curves (default: the largest)")
    comp.add_argument("--ablate", action="store_true",
                      help="also run the last config once without each of its plugins")
    comp.add_argument("--no-plot", action="store_true", help="write no figure")
    comp.add_argument("--report", action="store_true",
                      help="run nothing: tabulate and plot the runs that ended in --out")
    _run_flags(comp, threads=1)
    comp.set_defaults(func=cmd_compare)

    dem = sub.add_parser("demo", help="baseline against stabilized GPT over a small LR sweep",
                         description=demo_configs.__doc__.splitlines()[0])
    dem.add_argument("--full", action="store_true",
                     help="the complete sweep (7 learning rates, 3e-4 to 0.3) with 3 seeds")
    dem.add_argument("--out", help="the demo directory (default: steadytrain-demo[-full])")
    dem.add_argument("--jobs", type=int, help="runs at a time (default: CPU cores / threads)")
    dem.add_argument("--threads", type=int, default=1, help="torch threads per run (default 1)")
    dem.add_argument("--no-plot", action="store_true", help="write no figure")
    dem.add_argument("--quiet", action="store_true", help="no progress line")
    dem.set_defaults(func=cmd_demo)


def _run_flags(parser: argparse.ArgumentParser, *, threads: int) -> None:
    parser.add_argument("--resume", action="store_true", help="continue from the checkpoint")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an existing run directory")
    parser.add_argument("--model", help="a model of your own, 'package.module:callable'")
    parser.add_argument("--device", choices=("cpu", "cuda"), help="override train.device")
    parser.add_argument("--threads", type=int, default=threads,
                        help=f"torch threads per run (default {threads})")
    parser.add_argument("--quiet", action="store_true",
                        help="no progress line and no events on the terminal")
