"""The label-smoothing term's cost against torch's own ``F.cross_entropy(label_smoothing=ε)``.

    python benchmarks/bench_label_smoothing.py                    # 16×1024×50257 bf16, CUDA
    python benchmarks/bench_label_smoothing.py --device cpu --batch 2 --seq 64 --classes 1000

One forward and backward of the loss on the same logits (bf16 by default, a non-leaf made
by a view of a leaf, as a model's logits are), timed with CUDA events, the variants
interleaved, medians over ``--repeats`` rounds:

* ``cross_entropy``: plain ``F.cross_entropy``, the host's task loss;
* ``torch label_smoothing``: ``F.cross_entropy(..., label_smoothing=ε)``;
* ``cross_entropy + term``: the host's loss plus ``label_smoothing_term`` (what the
  ``label_smoothing`` plugin adds);
* ``cross_entropy + term, plain autograd``: the same formula written with autograd ops
  (a gather and ``mean(dtype=float32)``), as the term was computed before it had its own
  backward.

With ``--layout converted`` the losses read the logits as a Hugging Face model's do under
Accelerate's mixed precision: the cross-entropy (plain or smoothed) takes one float32
copy of the bf16 logits (autocast's), and the term another one (the float32 copy of the
model's outputs that Accelerate hands over), of which it is the only consumer, so its
gradient is written out whole instead of being added to the cross-entropy's.

The cost of smoothing is each variant's time minus ``cross_entropy``; the ratio of the
term's cost to torch's is the figure of merit. The script also checks that the term's loss
and gradient match torch's in the logits' dtype, and runs the term under
``torch.cuda.set_sync_debug_mode("error")``.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from steadytrain.plugins.label_smoothing import label_smoothing_term

SMOOTHING = 0.1


def plain_autograd_term(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    valid = targets != -100
    picked = logits.gather(-1, torch.where(valid, targets, 0).unsqueeze(-1)).squeeze(-1)
    mean = logits.mean(-1, dtype=torch.float32)
    return SMOOTHING * torch.where(valid, picked.float() - mean, 0.0).sum() / valid.sum()


def losses(y: torch.Tensor, layout: str) -> dict[str, Callable[[torch.Tensor], torch.Tensor]]:
    flat = y.flatten()
    converted = layout == "converted"

    def ce(x: torch.Tensor, **options: float) -> torch.Tensor:
        return F.cross_entropy((x.float() if converted else x).flatten(0, 1), flat, **options)

    def with_term(term: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> Callable:
        # Converted: the term reads the float32 copy of the outputs, cross-entropy its own.
        return lambda x: ce(x) + term(x.float() if converted else x, y)

    def alone(loss: Callable[[torch.Tensor], torch.Tensor]) -> Callable:
        # Converted: the copy of the outputs is made even though nothing reads it.
        return lambda x: (x.float(), loss(x))[1] if converted else loss(x)

    return {
        "cross_entropy": alone(ce),
        "torch label_smoothing": alone(lambda x: ce(x, label_smoothing=SMOOTHING)),
        "cross_entropy + term": with_term(lambda x, t: label_smoothing_term(x, t, SMOOTHING)),
        "cross_entropy + term, plain autograd": with_term(plain_autograd_term),
    }


def run(leaf: torch.Tensor, loss_of: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    leaf.grad = None
    loss = loss_of(leaf.view(leaf.shape))
    loss.backward()
    return loss.detach()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--classes", type=int, default=50257)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--layout", choices=("shared", "converted"), default="shared",
                        help="converted: as a Hugging Face model under Accelerate (above)")
    args = parser.parse_args()
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    cuda = device.type == "cuda"
    torch.manual_seed(0)
    leaf = (2 * torch.randn(args.batch, args.seq, args.classes, device=device)).to(
        dtype).requires_grad_()
    y = torch.randint(0, args.classes, (args.batch, args.seq), device=device)
    y[0, :7] = -100
    variants = losses(y, args.layout)

    reference = run(leaf, variants["torch label_smoothing"]), leaf.grad.clone()
    for name in ("cross_entropy + term", "cross_entropy + term, plain autograd"):
        loss = run(leaf, variants[name])
        error = ((leaf.grad.double() - reference[1].double()).norm()
                 / reference[1].double().norm()).item()
        print(f"{name}: loss {loss.item():.6f} against torch's {reference[0].item():.6f}; "
              f"relative difference of the gradient {error:.2e}")
    del reference
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            run(leaf, variants["cross_entropy + term"])
        finally:
            torch.cuda.set_sync_debug_mode("default")
        print("cross_entropy + term ran under set_sync_debug_mode('error') without a sync")

    times: dict[str, list[float]] = {name: [] for name in variants}
    for round_index in range(args.repeats + 2):
        for name, loss_of in variants.items():
            if cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(
                    enable_timing=True)
                torch.cuda.synchronize()
                start.record()
                run(leaf, loss_of)
                end.record()
                torch.cuda.synchronize()
                elapsed = start.elapsed_time(end)
            else:
                began = time.perf_counter()
                run(leaf, loss_of)
                elapsed = (time.perf_counter() - began) * 1e3
            if round_index >= 2:  # warm-up rounds
                times[name].append(elapsed)
    medians = {name: statistics.median(t) for name, t in times.items()}
    base = medians["cross_entropy"]
    torch_cost = medians["torch label_smoothing"] - base
    print(f"\nlogits {args.batch}×{args.seq}×{args.classes} {args.dtype}, {args.layout} layout, "
          "forward + backward, "
          f"median of {args.repeats} (ms); cost = time − cross_entropy")
    print(f"{'variant':40}{'ms':>9}{'cost':>9}{'÷ torch':>9}{'spread':>9}")
    for name, median in medians.items():
        cost = median - base
        spread = max(times[name]) - min(times[name])
        ratio = cost / torch_cost if name != "cross_entropy" else float("nan")
        print(f"{name:40}{median:9.3f}{cost:9.3f}{ratio:9.3f}{spread:9.3f}")


if __name__ == "__main__":
    main()
