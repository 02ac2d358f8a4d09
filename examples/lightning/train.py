"""A steadytrain pipeline inside a PyTorch Lightning Trainer, on data generated here.

    python examples/lightning/train.py [CONFIG]          # default: examples/lightning/config.toml
    python examples/lightning/train.py --epochs 4 --resume runs/lightning/epoch=1.ckpt

A small MLP learns to separate two interleaved spirals, as in ``examples/quickstart.py``,
but the loop is Lightning's: ``PipelineCallback`` drives the pipeline and the module adds
the plugins' terms to its loss with ``self.pipeline_loss``. Gradients are accumulated over
two batches. One batch of epoch 2 is corrupted with a NaN: the guard skips that optimizer
step. Validation runs with the EMA average swapped in; the checkpoints ModelCheckpoint
writes (under ``--out``) hold the training weights, the pipeline's state, and with
``save_eval_weights`` the averaged weights too, so ``--resume`` continues the run exactly.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import lightning.pytorch as pl
import torch
import torch.nn.functional as F

from steadytrain.adapters.lightning import PipelineCallback, PipelineLossMixin

HERE = Path(__file__).resolve().parent


def spirals(n: int, noise: float = 0.2, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Two interleaved spirals in the plane, labels 0 and 1."""
    g = torch.Generator().manual_seed(seed)
    t = torch.rand(n, generator=g) * 3 * math.pi + 0.5
    label = torch.randint(0, 2, (n,), generator=g)
    angle = t + label * math.pi
    x = torch.stack([t * torch.cos(angle), t * torch.sin(angle)], dim=1) / 5
    return x + noise * torch.randn(n, 2, generator=g) / 5, label


class Corrupted(torch.utils.data.Dataset):
    """Batches of a tensor data set; batch *bad* of epoch *epoch* gets a NaN input, as a
    broken record would. It reads the epoch from *trainer*, set once the Trainer exists."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, batch: int, epoch: int,
                 bad: int = 4) -> None:
        self.batches = list(zip(x.split(batch), y.split(batch), strict=True))
        self.epoch, self.bad = epoch, bad
        self.trainer: pl.Trainer | None = None

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = self.batches[index]
        if self.trainer is not None and self.trainer.current_epoch == self.epoch and (
            index == self.bad
        ):
            x = x.clone()
            x[0, 0] = float("nan")
        return x, y


class Classifier(PipelineLossMixin, pl.LightningModule):
    def __init__(self, lr: float = 1e-2) -> None:
        super().__init__()
        self.lr = lr
        self.net = torch.nn.Sequential(
            torch.nn.Linear(2, 64), torch.nn.Tanh(), torch.nn.Linear(64, 64), torch.nn.Tanh(),
            torch.nn.Linear(64, 2),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        logits = self(x)
        # task loss + the plugins' terms (label smoothing here); Lightning divides the
        # returned loss by accumulate_grad_batches itself
        return self.pipeline_loss(F.cross_entropy(logits, y), outputs={"logits": logits})

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val/acc", (self(x).argmax(1) == y).float().mean(), prog_bar=True)

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=self.lr)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config", nargs="?", default=HERE / "config.toml")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--samples", type=int, default=2048, help="training points")
    parser.add_argument("--corrupt-epoch", type=int, default=2,
                        help="epoch whose 5th batch gets a NaN input (-1: none)")
    parser.add_argument("--out", type=Path, default=Path("runs/lightning"),
                        help="where the checkpoints go")
    parser.add_argument("--resume", type=Path, help="a checkpoint to continue from")
    args = parser.parse_args()

    pl.seed_everything(0, verbose=False)
    x, y = spirals(args.samples)
    train = Corrupted(x, y, batch=64, epoch=args.corrupt_epoch)
    val = list(zip(*(t.split(512) for t in spirals(512, seed=1)), strict=True))
    callback = PipelineCallback(args.config, save_eval_weights=True)
    checkpoints = pl.callbacks.ModelCheckpoint(dirpath=args.out, filename="{epoch}",
                                               save_top_k=-1)
    trainer = pl.Trainer(
        accelerator="cpu", devices=1, max_epochs=args.epochs, accumulate_grad_batches=2,
        callbacks=[callback, checkpoints], logger=False, enable_progress_bar=False,
        enable_model_summary=False, log_every_n_steps=16,
    )
    train.trainer = trainer
    model = Classifier()
    trainer.fit(
        model,
        torch.utils.data.DataLoader(train, batch_size=None, shuffle=False),
        torch.utils.data.DataLoader(val, batch_size=None),
        ckpt_path=args.resume,
    )

    pipe = callback.pipeline
    metrics = trainer.callback_metrics
    shown = ("loss/task", "loss/total", "guard/skipped", "grad_clip/head/pre_norm")
    print("last logged: " + ", ".join(
        f"{k}={float(metrics[k]):.4g}" for k in shown if k in metrics))
    x_val, y_val = val[0]
    with torch.no_grad():
        trained = (model(x_val).argmax(1) == y_val).float().mean().item()
    print(f"skipped steps: {pipe.run.skipped_steps} of {pipe.run.step}")
    print(f"validation accuracy: {float(metrics['val/acc']):.3f} (EMA weights, as Lightning "
          f"validated), {trained:.3f} (training weights)")
    print(f"checkpoints: {checkpoints.dirpath}")


if __name__ == "__main__":
    main()
