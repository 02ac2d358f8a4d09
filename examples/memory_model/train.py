"""A small memory-augmented sequence model trained with and without the stability recipe.

    python examples/memory_model/train.py                     # baseline and stabilized
    python examples/memory_model/train.py --seeds 0 1 2       # the same, for three seeds
    python examples/memory_model/train.py --plot docs/img/memory_model.png

The data are sentences of a small language made here: a topic token opens each sentence
and picks one of four Markov transition tables for the rest of it, so predicting a token
needs the topic from far back (a long-range dependency) as well as the previous token.
The model follows the memory-model document (seed 000): embeddings and a GRU give the
current state; a short-/long-term memory (``steadytrain.nn.DualMemory``) that keeps the
states of earlier batches with the embedding of the token that followed them is read
for every token; a ``MemoryGate`` mixes the state with the two memories; a ``SoftTopK``
layer keeps about 15 % of a wider feature layer; a linear head predicts the next token.
Every training step stores some of the batch's states in short-term memory.

The two runs share the model, data, optimizer (AdamW), learning-rate schedule and seed;
they differ only in their config: ``baseline.toml`` only measures (gradient norm,
stability monitor), ``stabilized.toml`` is the document's recipe with its parameter
groups. The learning rate (1e-2 after a short warmup, then constant) is on the high side
for a model of this size on purpose.
The script prints the metrics of every log interval and a summary per run: validation
loss and accuracy (inside ``pipe.evaluating()``, so with the EMA weights where the run
has them), the monitor's oscillation ratio over the second half of training, and the
variance of the task loss over the last quarter.
"""

from __future__ import annotations

import argparse
import statistics
import time
import tomllib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

import steadytrain
from steadytrain.nn import DualMemory, MemoryGate, SoftTopK
from steadytrain.param_groups import param_groups

HERE = Path(__file__).resolve().parent
CONFIGS = ("baseline", "stabilized")
SHOWN = {
    "loss/task": "loss",
    "stability_monitor/loss_oscillation": "osc",
    "stability_monitor/loss_variance": "var",
    "stability_monitor/grad_norm": "grad",
    "grad_norm/norm": "grad_after",
    "stability_monitor/gate_entropy": "gate_H",
    "stability_monitor/sparsity": "density",
    "stability_monitor/memory_utilization/stm": "stm_use",
    "stability_monitor/memory_utilization/ltm": "ltm_use",
}


# -- the language -------------------------------------------------------------------------


class Language:
    """Topic tokens ``0..topics-1`` open a sentence; words follow the topic's Markov table.

    Each topic gives every word two likely successors (together ``peak`` of the
    probability) and spreads the rest over all words, so the best possible prediction
    needs both the previous word and the topic at the start of the sentence.
    """

    def __init__(self, topics: int, words: int, *, peak: float = 0.8, seed: int = 0) -> None:
        gen = torch.Generator().manual_seed(seed)
        self.topics, self.vocab = topics, topics + words
        table = torch.full((topics, words, words), (1 - peak) / words)
        for t in range(topics):
            for w in range(words):
                successors = torch.randperm(words, generator=gen)[:2]
                table[t, w, successors] += peak / 2
        self.table = table

    def sample(self, count: int, length: int, gen: torch.Generator) -> torch.Tensor:
        """``(count, length)`` token ids: a topic token, then ``length - 1`` words."""
        topic = torch.randint(self.topics, (count,), generator=gen)
        word = torch.randint(self.vocab - self.topics, (count,), generator=gen)
        tokens = [topic, word]
        for _ in range(length - 2):
            word = torch.multinomial(self.table[topic, word], 1, generator=gen).squeeze(1)
            tokens.append(word)
        ids = torch.stack(tokens, dim=1)
        ids[:, 1:] += self.topics
        return ids


# -- the model ----------------------------------------------------------------------------


class MemoryModel(torch.nn.Module):
    """Embedding → GRU → dual memory → memory gate → soft top-k layer → head.

    ``*memory*`` selects the memory parameters for the per-group options: the gate
    (``memory_gate.*``) and the norm of what the memories return (``memory_norm.*``);
    the memories themselves (``memory``) hold buffers only.
    """

    def __init__(self, vocab: int, dim: int = 32, *, stm: int = 128, ltm: int = 256,
                 writes: int = 64) -> None:
        super().__init__()
        self.writes = writes
        self.embed = torch.nn.Embedding(vocab, dim)
        self.rnn = torch.nn.GRU(dim, dim, batch_first=True)
        self.memory = DualMemory(dim, stm, ltm, threshold=3)
        self.memory_norm = torch.nn.LayerNorm(dim)
        self.memory_gate = MemoryGate(dim)
        self.up = torch.nn.Linear(dim, 4 * dim)
        self.sparse = SoftTopK(4 * dim, target_sparsity=0.15)
        self.down = torch.nn.Linear(4 * dim, dim)
        self.output_norm = torch.nn.LayerNorm(dim)
        self.head = torch.nn.Linear(dim, vocab)

    def forward(
        self, ids: torch.Tensor, targets: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Next-token logits ``(batch, length, vocab)`` and the gates ``(batch, length, 3)``.

        In training, with *targets*, the states of ``writes`` random tokens go into
        short-term memory, each with the embedding of the token that followed it.
        """
        current, _ = self.rnn(self.embed(ids))
        stm, ltm = self.memory.retrieve(current)
        mixed, gates = self.memory_gate(current, self.memory_norm(stm), self.memory_norm(ltm))
        sparse, _ = self.sparse(F.gelu(self.up(mixed)))
        logits = self.head(self.output_norm(mixed + self.down(sparse)))
        if self.training and targets is not None:
            with torch.no_grad():
                flat = current.flatten(0, 1)
                pick = torch.randperm(flat.shape[0], device=flat.device)[: self.writes]
                self.memory.store(flat[pick], self.embed(targets.flatten()[pick]))
        return logits, gates


# -- training -----------------------------------------------------------------------------


def load(config: Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The pipeline config and the ``param_groups`` specs of a TOML file."""
    raw = tomllib.loads(config.read_text(encoding="utf-8"))
    return raw, raw.pop("param_groups", [])


def train(
    config: Path, language: Language, val: torch.Tensor, *, steps: int, batch: int,
    length: int, lr: float, seed: int, log_every: int, verbose: bool = True,
) -> dict[str, Any]:
    """Train one run; its summary row, with the per-step task losses and logged metrics."""
    began = time.perf_counter()
    torch.manual_seed(seed)
    model = MemoryModel(language.vocab)
    raw, groups = load(config)
    optimizer = torch.optim.AdamW(param_groups(model, groups, lr=lr, weight_decay=0.01))
    warmup = max(1, steps // 20)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min(1.0, (step + 1) / warmup)
    )
    pipe = steadytrain.Pipeline.from_config(raw)
    pipe.setup(model, optimizer, total_steps=steps)
    gen = torch.Generator().manual_seed(seed)
    task_losses: list[torch.Tensor] = []
    history: list[dict[str, float]] = []
    for step in range(steps):
        ids = language.sample(batch, length + 1, gen)
        x, y = ids[:, :-1], ids[:, 1:]
        pipe.before_step(batch=x, targets=y)
        logits, gates = model(x, y)
        task = F.cross_entropy(logits.flatten(0, 1), y.flatten())
        task_losses.append(task.detach())
        # The weight the gate gives each memory: the monitor logs it as memory use.
        used = {"stm": gates[..., 1], "ltm": gates[..., 2]}
        loss = pipe.compute_loss(task, outputs={"logits": logits, "memory_utilization": used})
        loss.backward()
        if not pipe.after_backward().skip:
            optimizer.step()
        pipe.consolidate()
        optimizer.zero_grad()
        scheduler.step()
        if (step + 1) % log_every == 0:
            metrics = {"step": step + 1, **pipe.metrics()}
            history.append(metrics)
            if verbose:
                print(f"  {config.stem} step {step + 1:4d}: " + ", ".join(
                    f"{short}={metrics[k]:.4g}" for k, short in SHOWN.items() if k in metrics
                ) + f", skipped={pipe.run.skipped_steps}", flush=True)
    with pipe.evaluating():
        val_loss, val_acc = evaluate(model, val)
    pipe.close()
    losses = torch.stack(task_losses)
    late = [h["stability_monitor/loss_oscillation"] for h in history
            if h["step"] > steps // 2]
    return {
        "config": config.stem, "seed": seed, "val_loss": val_loss, "val_acc": val_acc,
        "osc_mean": statistics.fmean(late), "osc_max": max(late),
        "var_last": losses[-(steps // 4):].var().item(),
        "skipped": pipe.run.skipped_steps, "seconds": time.perf_counter() - began,
        "losses": losses.tolist(), "history": history,
    }


@torch.no_grad()
def evaluate(model: MemoryModel, val: torch.Tensor) -> tuple[float, float]:
    """Cross-entropy and accuracy of the next word (the topic token is not predicted)."""
    model.eval()
    x, y = val[:, :-1], val[:, 1:]
    logits, _ = model(x)
    model.train()
    return (F.cross_entropy(logits.flatten(0, 1), y.flatten()).item(),
            (logits.argmax(-1) == y).float().mean().item())


# -- report -------------------------------------------------------------------------------


def table(rows: Sequence[Mapping[str, Any]]) -> str:
    lines = [
        "| config | seed | val loss | val acc | osc. ratio mean (2nd half) | osc. ratio max "
        "(2nd half) | loss variance (last 25%) | skipped | seconds |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        lines.append(
            f"| {r['config']} | {r['seed']} | {r['val_loss']:.4f} | {r['val_acc']:.4f} | "
            f"{r['osc_mean']:.3f} | {r['osc_max']:.3f} | {r['var_last']:.5f} | "
            f"{r['skipped']} | {r['seconds']:.0f} |"
        )
    return "\n".join(lines) + "\n"


def spread(rows: Sequence[Mapping[str, Any]]) -> str:
    """Mean ± sample std over seeds, per config, of the summary columns."""
    lines = []
    for name in dict.fromkeys(r["config"] for r in rows):
        mine = [r for r in rows if r["config"] == name]
        cells = []
        for key in ("val_loss", "val_acc", "osc_mean", "osc_max", "var_last"):
            values = [r[key] for r in mine]
            std = statistics.stdev(values) if len(values) > 1 else 0.0
            cells.append(f"{key} {statistics.fmean(values):.4g} ± {std:.2g}")
        lines.append(f"{name} over {len(mine)} seeds: " + ", ".join(cells))
    return "\n".join(lines) + "\n"


def plot(rows: Sequence[Mapping[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, middle, right) = plt.subplots(1, 3, figsize=(14, 3.8))
    shown = [r for r in rows if r["seed"] == rows[0]["seed"]]
    for index, r in enumerate(shown):
        color = f"C{index % 10}"
        left.plot(r["losses"], lw=0.6, alpha=0.8, color=color, label=r["config"])
        steps = [h["step"] for h in r["history"]]
        middle.plot(steps, [h["stability_monitor/loss_oscillation"] for h in r["history"]],
                    marker="o", color=color, label=r["config"])
        for part, style in (("stm", "-o"), ("ltm", "--s")):
            right.plot(steps, [h[f"stability_monitor/memory_utilization/{part}"]
                               for h in r["history"]], style, color=color,
                       label=f"{r['config']} {part}")
    left.set_title(f"task loss per step (seed {rows[0]['seed']})")
    middle.set_title("oscillation ratio max/min over the monitor's window")
    right.set_title("mean gate weight on each memory")
    for ax in (left, middle, right):
        ax.set_xlabel("step")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS),
                        help="config names in this folder, or paths to TOML files")
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--batch", type=int, default=32, help="sentences per step")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--plot", type=Path, help="write the loss curves here (matplotlib)")
    parser.add_argument("--out", type=Path, help="write the summary table (markdown) here")
    parser.add_argument("--quiet", action="store_true", help="print only the summary")
    parser.add_argument("--tiny", action="store_true", help="a seconds-long smoke run")
    args = parser.parse_args(argv)
    if args.steps < 8:
        parser.error("--steps must be at least 8 (the summary needs a few log intervals)")
    if args.plot is not None:
        try:
            import matplotlib  # noqa: F401 - checked before training, not after it
        except ImportError:
            parser.error("--plot needs matplotlib: pip install 'steadytrain[plots]'")

    steps, batch, length, log_every = args.steps, args.batch, 32, max(1, min(50, args.steps // 4))
    if args.tiny:
        steps, batch, length, log_every = 8, 4, 8, 4
    torch.set_num_threads(min(torch.get_num_threads(), 4))
    language = Language(topics=4, words=16)
    configs = [Path(c) if c.endswith(".toml") else HERE / f"{c}.toml" for c in args.configs]
    rows = []
    for seed in args.seeds:
        val = language.sample(512, length + 1, torch.Generator().manual_seed(10_000 + seed))
        for config in configs:
            rows.append(train(config, language, val, steps=steps, batch=batch,
                              length=length, lr=args.lr, seed=seed, log_every=log_every,
                              verbose=not args.quiet))
            r = rows[-1]
            print(f"{r['config']} seed {seed}: val loss {r['val_loss']:.4f}, val acc "
                  f"{r['val_acc']:.4f}, {r['seconds']:.0f} s", flush=True)
    print(table(rows), end="")
    if len(args.seeds) > 1:
        print(spread(rows), end="")
    if args.out is not None:
        args.out.write_text(table(rows), encoding="utf-8")
    if args.plot is not None:
        plot(rows, args.plot)
    return rows


if __name__ == "__main__":
    main()
