"""A complete training loop with a steadytrain pipeline, on data generated here.

    python examples/quickstart.py [CONFIG]      # default: examples/quickstart.toml

A small MLP learns to separate two interleaved spirals. The pipeline's plugins come from
the config file; every epoch prints the metrics they recorded, and the final evaluation
runs inside ``pipe.evaluating()`` so that a weight-averaging plugin evaluates its average.
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
    parser.add_argument("--epochs", type=int, default=20)
    args = parser.parse_args()

    torch.manual_seed(0)
    x, y = spirals(2048)
    x_val, y_val = spirals(512, seed=1)
    model = torch.nn.Sequential(
        torch.nn.Linear(2, 64), torch.nn.Tanh(), torch.nn.Linear(64, 64), torch.nn.Tanh(),
        torch.nn.Linear(64, 2),
    )
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    batches = list(zip(x.split(64), y.split(64), strict=True))

    pipe = steadytrain.Pipeline.from_config(args.config)
    pipe.setup(model, optimizer, total_steps=args.epochs * len(batches))
    for epoch in range(args.epochs):
        pipe.epoch_start(epoch)
        for xb, yb in batches:
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
        shown = ", ".join(f"{k}={v:.4g}" for k, v in sorted(metrics.items()))
        print(f"epoch {epoch:2d}: {shown}")
    with torch.no_grad(), pipe.evaluating():
        accuracy = (model(x_val).argmax(1) == y_val).float().mean().item()
    pipe.close()
    print(f"validation accuracy: {accuracy:.3f}")


if __name__ == "__main__":
    main()
