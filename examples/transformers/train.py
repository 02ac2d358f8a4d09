"""The Hugging Face ``Trainer`` with a steadytrain pipeline, on data generated here.

    python examples/transformers/train.py
    python examples/transformers/train.py --bf16
    python examples/transformers/train.py --epochs 4 --output runs/hf
    python examples/transformers/train.py --epochs 8 --output runs/hf --resume

A small MLP learns to separate two interleaved spirals with ``SteadytrainTrainer``, the
``Trainer`` with the pipeline of ``stability.toml`` next to this file (or the config
given): a guard, label smoothing, per-group clipping in place of the Trainer's
``max_grad_norm`` (which must then be 0), and an EMA of the weights. Gradients accumulate
over two micro-batches. During epoch 1 one training sample has a NaN input, as a broken
record would: the guard skips the step that holds it. The Trainer's logs carry the plugins'
metrics;
``trainer.evaluate()`` runs with the EMA weights. With ``--output`` every epoch ends with a
checkpoint that holds the pipeline's state (``checkpoint-N/steadytrain.pt``);
``--resume`` continues from the last one.
"""

from __future__ import annotations

import argparse
import math
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import TrainerCallback, TrainingArguments

import steadytrain
from steadytrain.adapters.transformers import SteadytrainTrainer

HERE = Path(__file__).resolve().parent


class Spirals(torch.utils.data.Dataset):
    """Two interleaved spirals in the plane, labels 0 and 1, as the Trainer's dicts."""

    def __init__(self, n: int, noise: float = 0.2, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        t = torch.rand(n, generator=g) * 3 * math.pi + 0.5
        self.labels = torch.randint(0, 2, (n,), generator=g)
        angle = t + self.labels * math.pi
        x = torch.stack([t * torch.cos(angle), t * torch.sin(angle)], dim=1) / 5
        self.x = x + noise * torch.randn(n, 2, generator=g) / 5

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"x": self.x[index], "labels": self.labels[index]}


class BreakOneRecord(TrainerCallback):
    """Puts a NaN into one sample of *data* for the epoch *epoch* only."""

    def __init__(self, data: Spirals, epoch: int, index: int = 100) -> None:
        self.data, self.epoch, self.index = data, epoch, index
        self.clean = data.x[index, 0].item()

    def on_epoch_begin(self, args, state, control, **kwargs) -> None:
        broken = round(state.epoch or 0) == self.epoch
        self.data.x[self.index, 0] = float("nan") if broken else self.clean


class Classifier(torch.nn.Module):
    """Returns ``{"logits", "loss"}``, what the Trainer expects of a model."""

    def __init__(self) -> None:
        super().__init__()
        self.body = torch.nn.Sequential(torch.nn.Linear(2, 64), torch.nn.Tanh(),
                                        torch.nn.Linear(64, 64), torch.nn.Tanh())
        self.head = torch.nn.Linear(64, 2)

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> dict:
        logits = self.head(self.body(x))
        if labels is None:
            return {"logits": logits}
        return {"logits": logits, "loss": F.cross_entropy(logits, labels)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config", nargs="?", default=HERE / "stability.toml")
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast")
    parser.add_argument("--output", type=Path, help="save a checkpoint at every epoch end")
    parser.add_argument("--resume", action="store_true",
                        help="continue from the last checkpoint in --output")
    args = parser.parse_args()
    if args.resume and not args.output:
        parser.error("--resume needs --output, the folder that holds the checkpoints")

    train, val = Spirals(1024), Spirals(512, seed=1)
    torch.manual_seed(0)
    model = Classifier()
    training = TrainingArguments(
        output_dir=str(args.output or tempfile.mkdtemp()),
        num_train_epochs=args.epochs,
        per_device_train_batch_size=32,
        gradient_accumulation_steps=2,
        learning_rate=5e-2,
        lr_scheduler_type="constant",
        max_grad_norm=0.0,  # the grad_clip plugin clips
        bf16=args.bf16,
        use_cpu=not torch.cuda.is_available(),
        logging_strategy="epoch",
        save_strategy="epoch" if args.output else "no",
        report_to="none",
        disable_tqdm=True,
    )
    pipe = steadytrain.Pipeline.from_config(args.config)
    trainer = SteadytrainTrainer(model=model, args=training, train_dataset=train,
                                 eval_dataset=val, pipeline=pipe,
                                 callbacks=[BreakOneRecord(train, epoch=1)])
    trainer.train(resume_from_checkpoint=args.resume or None)

    averaged = trainer.evaluate()  # inside pipe.evaluating(): the EMA weights
    def accuracy() -> float:
        with torch.no_grad():
            logits = model(val.x.to(training.device))["logits"]
            return (logits.argmax(1).cpu() == val.labels).float().mean().item()

    trained = accuracy()
    with pipe.evaluating():
        ema = accuracy()
    print(f"skipped steps: {pipe.run.skipped_steps} of {pipe.run.step}")
    print(f"eval_loss with the EMA weights: {averaged['eval_loss']:.4f}")
    print(f"validation accuracy: {trained:.3f} (trained weights), {ema:.3f} (EMA weights)")
    pipe.close()


if __name__ == "__main__":
    main()
