"""A complete training loop with a steadytrain pipeline, on data generated here.

    python examples/quickstart.py [CONFIG]      # default: examples/quickstart.toml

A small MLP learns to separate two interleaved spirals. The pipeline's plugins come from
the config file; every epoch prints a few of the metrics they recorded. One batch of
epoch 3 is corrupted with a NaN, as a broken record in a data set would be: the guard
skips that step instead of letting the NaN into the weights. The final evaluation runs
both outside and inside ``pipe.evaluating()``, where the EMA plugin swaps its average in.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import torch
import torch.nn.functional as F

import steadytrain

HERE = Path(__file__).resolve().parent


def spirals(n: int, noise: float = 0.2, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Two interleaved spirals in the plane, labels 0 and 1."""
    g = torch.Generator().manual_seed(seed)
    t = torch.rand(n, generator=g) * 3 * math.pi + 0.5
    label = torch.randint(0, 2, (n,), generator=g)
    angle = t + label * math.pi
    x = torch.stack([t * torch.cos(angle), t * torch.sin(angle)], dim=1) / 5
    return x + noise * torch.randn(n, 2, generator=g) / 5, label


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config", nargs="?", default=HERE / "quickstart.toml")
    parser.add_argument("--epochs", type=int, default=25)
    parser.add_argument("--corrupt-epoch", type=int, default=3,
                        help="epoch whose 5th batch gets a NaN input (-1: none)")
    args = parser.parse_args()

    torch.manual_seed(0)
    x, y = spirals(2048)
    x_val, y_val = spirals(512, seed=1)
    model = torch.nn.Sequential(
        torch.nn.Linear(2, 64), torch.nn.Tanh(), torch.nn.Linear(64, 64), torch.nn.Tanh(),
        torch.nn.Linear(64, 2),
    )
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    batches = list(zip(x.split(64), y.split(64), strict=True))

    pipe = steadytrain.Pipeline.from_config(args.config)
    pipe.setup(model, optimizer, total_steps=args.epochs * len(batches))
    shown = ("loss/task", "loss/total", "stability_monitor/grad_norm", "guard/skipped",
             "stability_monitor/loss_oscillation")
    for epoch in range(args.epochs):
        pipe.epoch_start(epoch)
        for index, (xb, yb) in enumerate(batches):
            if epoch == args.corrupt_epoch and index == 4:
                xb = xb.clone()
                xb[0, 0] = float("nan")
            pipe.before_step(batch=xb, targets=yb)
            logits = model(xb)
            loss = pipe.compute_loss(F.cross_entropy(logits, yb), outputs={"logits": logits})
            loss.backward()
            if not pipe.after_backward().skip:
                optimizer.step()
            pipe.consolidate()
            optimizer.zero_grad()
        pipe.epoch_end()
        metrics = pipe.metrics()
        print(f"epoch {epoch:2d}: " + ", ".join(
            f"{k}={metrics[k]:.4g}" for k in shown if k in metrics))

    def accuracy() -> float:
        with torch.no_grad():
            return (model(x_val).argmax(1) == y_val).float().mean().item()

    trained = accuracy()
    with pipe.evaluating():
        averaged = accuracy()
    print(f"skipped steps: {pipe.run.skipped_steps} of {pipe.run.step}")
    print(f"validation accuracy: {trained:.3f} (trained weights), {averaged:.3f} "
          "(inside pipe.evaluating(), with the plugins' evaluation weights)")
    pipe.close()


if __name__ == "__main__":
    main()
