"""What the guard saves: the same training run with and without it, side by side.

    python examples/quickstart.py [CONFIG] [--epochs N] [--threads N] [--quiet]

A small MLP learns to separate two interleaved spirals, on data generated here. Two copies
of it, with the same initial weights and the same batches, train through pipelines built
from one config (default: ``examples/quickstart.toml``): the first with every instance of
the config, the second with the ``guard`` left out (``disable=["guard"]``). One batch of
epoch 3 carries a NaN, as a broken record in a data set would. The guard skips that
optimizer step; without it the NaN reaches the weights and that model's outputs are NaN
from then on. Every epoch prints both runs' validation loss and accuracy, evaluated inside
``pipe.evaluating()`` (where the EMA plugin swaps its average in); the last lines add the
number of steps each run skipped (``pipe.run.skipped_steps``).

Torch uses one thread unless ``--threads`` says otherwise: the model is too small to gain
from more, and on a busy CPU more threads only contend for its cores. ``--quiet`` prints
only the final comparison and silences the library's log events below ERROR.
"""

from __future__ import annotations

import argparse
import copy
import logging
import math
import warnings
from pathlib import Path

# torch warns at import when NumPy is not installed; nothing here uses NumPy.
warnings.filterwarnings("ignore", message="Failed to initialize NumPy")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import steadytrain  # noqa: E402

HERE = Path(__file__).resolve().parent
BATCH = 64
COLUMN = 21  # the width of one run's columns in the table


def spirals(n: int, noise: float = 0.2, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Two interleaved spirals in the plane, labels 0 and 1."""
    g = torch.Generator().manual_seed(seed)
    t = torch.rand(n, generator=g) * 3 * math.pi + 0.5
    label = torch.randint(0, 2, (n,), generator=g)
    angle = t + label * math.pi
    x = torch.stack([t * torch.cos(angle), t * torch.sin(angle)], dim=1) / 5
    return x + noise * torch.randn(n, 2, generator=g) / 5, label


def mlp() -> torch.nn.Module:
    return torch.nn.Sequential(
        torch.nn.Linear(2, 64), torch.nn.Tanh(), torch.nn.Linear(64, 64), torch.nn.Tanh(),
        torch.nn.Linear(64, 2),
    )


class Training:
    """One model, its optimizer and its pipeline."""

    def __init__(self, model: torch.nn.Module, pipe: steadytrain.Pipeline, steps: int) -> None:
        self.model = model
        self.optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
        self.pipe = pipe
        pipe.setup(model, self.optimizer, total_steps=steps)

    def epoch(self, epoch: int, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        pipe, optimizer = self.pipe, self.optimizer
        pipe.epoch_start(epoch)
        for x, y in batches:
            pipe.before_step(batch=x, targets=y)
            logits = self.model(x)
            loss = pipe.compute_loss(F.cross_entropy(logits, y), outputs={"logits": logits})
            loss.backward()
            outcome = pipe.after_backward()
            steadytrain.step_optimizer(optimizer, outcome)  # steps unless a plugin asked to skip
            pipe.consolidate()
            optimizer.zero_grad()
        pipe.epoch_end()

    def evaluate(self, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
        """Validation loss and accuracy, with the weights the plugins evaluate with."""
        with torch.no_grad(), self.pipe.evaluating():
            logits = self.model(x)
            loss = F.cross_entropy(logits, y).item()
            accuracy = (logits.argmax(1) == y).float().mean().item()
        return loss, accuracy

    def summary(self, x: torch.Tensor, y: torch.Tensor) -> str:
        loss, accuracy = self.evaluate(x, y)
        skipped = self.pipe.run.skipped_steps
        return (f"validation loss {loss:.4f}, accuracy {accuracy:.3f}, "
                f"{skipped} step{'' if skipped == 1 else 's'} skipped")


def corrupt(batches: list[tuple[torch.Tensor, torch.Tensor]], index: int) -> None:
    """Put a NaN into one input of batch *index*, as a broken record would."""
    x, y = batches[index]
    x = x.clone()
    x[0, 0] = float("nan")
    batches[index] = (x, y)


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config", nargs="?", default=HERE / "quickstart.toml")
    parser.add_argument("--epochs", type=positive_int, default=12)
    parser.add_argument("--corrupt-epoch", type=int, default=3,
                        help="epoch whose 5th batch gets a NaN input (-1: none)")
    parser.add_argument("--threads", type=positive_int, default=1, help="torch threads (default 1)")
    parser.add_argument("--quiet", action="store_true",
                        help="print only the final comparison; no log events below ERROR")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    # steadytrain's events go to the standard logging tree: show them, or only errors.
    logging.basicConfig(level=logging.ERROR if args.quiet else logging.INFO,
                        format="%(name)s: %(message)s")

    x, y = spirals(2048)
    x_val, y_val = spirals(512, seed=1)
    train = list(zip(x.split(BATCH), y.split(BATCH), strict=True))
    steps = args.epochs * len(train)
    torch.manual_seed(0)
    model = mlp()
    runs = {  # the same initial weights for both
        "with the guard": Training(
            copy.deepcopy(model), steadytrain.Pipeline.from_config(args.config), steps),
        "without the guard": Training(
            model, steadytrain.Pipeline.from_config(args.config, disable=["guard"]), steps),
    }
    if not args.quiet:
        print(" " * 8 + "".join(f"{name:<{COLUMN}}" for name in runs).rstrip())
        print(("epoch   " + f"{'loss':<9}{'accuracy':<12}" * len(runs)).rstrip())
    for epoch in range(args.epochs):
        batches = list(train)
        if epoch == args.corrupt_epoch:
            corrupt(batches, 4)
        for run in runs.values():
            run.epoch(epoch, batches)
        if not args.quiet:
            row = "".join("{:<9.4f}{:<12.3f}".format(*run.evaluate(x_val, y_val))
                          for run in runs.values())
            print(f"{epoch:5d}   {row.rstrip()}")
    print(f"after {args.epochs} epochs ({steps} steps each):")
    for name, run in runs.items():
        print(f"  {name + ':':<{COLUMN - 2}}{run.summary(x_val, y_val)}")
        run.pipe.close()


if __name__ == "__main__":
    main()
