"""A training loop under Accelerate with a steadytrain pipeline, on data generated here.

    python examples/accelerate/train.py                          # one process
    torchrun --nproc-per-node 2 examples/accelerate/train.py     # two processes (gloo on CPU)
    python examples/accelerate/train.py --mixed-precision bf16
    python examples/accelerate/train.py --epochs 3 --output runs/acc
    python examples/accelerate/train.py --epochs 6 --output runs/acc --resume runs/acc/epoch-3

A small MLP learns to separate two interleaved spirals, with gradient accumulation over
two micro-batches. The plugins come from ``stability.toml`` next to this file (or the
config given): a guard, label smoothing, per-group clipping in place of
``accelerator.clip_grad_norm_``, and an EMA of the weights. One micro-batch of epoch 1 on
process 0 gets a NaN input: the gradients are all-reduced before the guard looks at them,
so every process skips that step. With ``--output`` the pipeline's state goes into
Accelerate's checkpoint at every epoch end (``accelerator.register_for_checkpointing``);
``--resume`` continues from one.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration

import steadytrain
from steadytrain.adapters.accelerate import step_optimizer

HERE = Path(__file__).resolve().parent


def spirals(n: int, noise: float = 0.2, seed: int = 0) -> torch.utils.data.TensorDataset:
    """Two interleaved spirals in the plane, labels 0 and 1."""
    g = torch.Generator().manual_seed(seed)
    t = torch.rand(n, generator=g) * 3 * math.pi + 0.5
    label = torch.randint(0, 2, (n,), generator=g)
    angle = t + label * math.pi
    x = torch.stack([t * torch.cos(angle), t * torch.sin(angle)], dim=1) / 5
    return torch.utils.data.TensorDataset(x + noise * torch.randn(n, 2, generator=g) / 5, label)


class Classifier(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = torch.nn.Sequential(torch.nn.Linear(2, 64), torch.nn.Tanh(),
                                        torch.nn.Linear(64, 64), torch.nn.Tanh())
        self.head = torch.nn.Linear(64, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config", nargs="?", default=HERE / "stability.toml")
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--accumulation", type=int, default=2)
    parser.add_argument("--mixed-precision", choices=("no", "bf16", "fp16"), default="no")
    parser.add_argument("--output", type=Path, help="save a checkpoint at every epoch end")
    parser.add_argument("--resume", type=Path, help="a checkpoint folder to continue from")
    parser.add_argument("--corrupt-epoch", type=int, default=1,
                        help="epoch whose 5th micro-batch gets a NaN on process 0 (-1: none)")
    args = parser.parse_args()

    accelerator = Accelerator(
        gradient_accumulation_steps=args.accumulation, mixed_precision=args.mixed_precision,
        # Without a GPU, Accelerate joins the processes torchrun started only when told to
        # run on the CPU.
        cpu=not torch.cuda.is_available(),
        # The order of an epoch follows from the seed and the epoch: a resumed run sees the
        # batches the uninterrupted one sees.
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
    )
    torch.manual_seed(0)
    model = Classifier()
    optimizer = torch.optim.AdamW(model.parameters(), lr=5e-2)
    loader = torch.utils.data.DataLoader(spirals(1024), batch_size=32, shuffle=True)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    k = accelerator.gradient_accumulation_steps

    pipe = steadytrain.Pipeline.from_config(args.config)
    # The plugins see the model's own parameter names, not those of the DDP wrapper.
    steps_per_epoch = math.ceil(len(loader) / k)
    pipe.setup(accelerator.unwrap_model(model), optimizer,
               total_steps=args.epochs * steps_per_epoch)
    accelerator.register_for_checkpointing(pipe)
    if args.resume:
        accelerator.load_state(args.resume)

    shown = ("loss/task", "loss/total", "grad_clip/input/pre_norm", "guard/skipped")
    for epoch in range(pipe.run.epoch, args.epochs):
        loader.set_epoch(epoch)
        pipe.epoch_start()
        for index, (x, y) in enumerate(loader):
            if epoch == args.corrupt_epoch and index == 4 and accelerator.is_main_process:
                x = x.clone()
                x[0, 0] = float("nan")
            with accelerator.accumulate(model):
                # The last window of an epoch may be shorter: Accelerate steps at the end
                # of the loader.
                window = index - index % k
                pipe.before_step(batch=x, targets=y, micro_batch=index - window,
                                 num_micro_batches=min(k, len(loader) - window),
                                 loss_scale=1.0)  # accelerator.backward divides by k
                logits = model(x)
                loss = pipe.compute_loss(F.cross_entropy(logits, y), outputs={"logits": logits})
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    accelerator.unscale_gradients()  # fp16: the plugins see true gradients
                    outcome = pipe.after_backward()  # grad_clip clips here
                    step_optimizer(optimizer, outcome)
                    pipe.consolidate()
                    optimizer.zero_grad()
        pipe.epoch_end()
        metrics = pipe.metrics()  # on every process: the means are averaged across them
        accelerator.print(f"epoch {epoch:2d}: " + ", ".join(
            f"{name}={metrics[name]:.4g}" for name in shown if name in metrics))
        if args.output:
            accelerator.save_state(args.output / f"epoch-{epoch + 1}")

    x_val, y_val = spirals(512, seed=1).tensors
    network = accelerator.unwrap_model(model)

    def accuracy() -> float:
        with torch.no_grad():
            logits = network(x_val.to(accelerator.device))
            return (logits.argmax(1).cpu() == y_val).float().mean().item()

    trained = accuracy()
    with pipe.evaluating():
        averaged = accuracy()
    accelerator.print(f"skipped steps: {pipe.run.skipped_steps} of {pipe.run.step}")
    accelerator.print(f"validation accuracy: {trained:.3f} (trained weights), {averaged:.3f} "
                      "(inside pipe.evaluating(), with the EMA weights)")
    pipe.close()


if __name__ == "__main__":
    main()
