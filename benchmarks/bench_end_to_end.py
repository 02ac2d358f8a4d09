"""End to end: the README's loop against the same techniques written inline by hand.

    python benchmarks/bench_end_to_end.py                        # GPT-2 small, 16×1024, CUDA
    python benchmarks/bench_end_to_end.py --no-compile --profile  # eager only, with kernels
    python benchmarks/bench_end_to_end.py --device cpu --layers 2 --dim 64 --heads 2 \\
        --vocab 512 --batch 2 --seq 32 --no-compile --rounds 2 --steps 3   # a smoke run

A GPT-2-small-sized decoder (12 layers, width 768, 12 heads, vocabulary 50257, tied
embeddings, ``scaled_dot_product_attention``) trains on random tokens with a fused AdamW,
its forward under bf16 autocast (on CUDA) and the loss taken from its bf16 logits. With
the non-finite/spike guard, label smoothing (ε = 0.1), clipping in two groups (the
attention parameters at 0.5, the rest at 1.0) and an EMA of the weights (decay 0.999):

* ``pipeline``: the README's loop verbatim, the techniques from a config
  (``steadytrain.step_optimizer``; metrics read once per round, off the clock);
* ``hand``: the same techniques inline, the way one would write them without the
  library: ``F.cross_entropy(label_smoothing=0.1)``, both groups' norms computed once
  and shared by the guard's finiteness check and the clipping, the same spike rule and
  counters on the device, the skip flag handed to the fused AdamW as ``found_inf``, and
  the skip-masked EMA update with the same per-tensor weight the plugin uses;
* ``plain``: none of the techniques (cross-entropy, fused AdamW), for scale.

Each variant has its own optimizer; all share one model (so ``torch.compile`` compiles it
once; it compiles the model only, and every variant takes its loss eagerly on the logits),
and they run interleaved: every round runs ``--steps`` steps of each variant in turn,
eager and with the model compiled, every other round in reverse order. Every phase of
every step is bracketed by CUDA events (the host never waits inside a round, so an event
pair times the GPU work of its phase) and by host clocks. The table gives medians over all
measured steps; the ratio is against ``hand`` in the same mode. Host syncs per step are
counted with ``torch.cuda.set_sync_debug_mode("warn")`` over steps after warm-up, each
with its file and line. ``--profile`` runs one more round of ``hand`` and ``pipeline`` in
each mode under ``torch.profiler`` and prints kernels and kernel time per step, how much
of each phase's GPU time was kernels and how much the GPU waited for the host, and the
kernels whose time differs most between ``pipeline`` and ``hand`` (``--trace-dir`` keeps
the traces).
"""

from __future__ import annotations

import argparse
import gzip
import json
import math
import os
import platform
import shutil
import statistics
import tempfile
import time
import warnings
from collections import Counter, defaultdict
from datetime import date

import torch
import torch.nn.functional as F
from torch import nn

import steadytrain

PHASES = ("forward", "backward", "after_backward", "optimizer", "consolidate")
SMOOTHING = 0.1
ATTENTION_MAX_NORM, REST_MAX_NORM = 0.5, 1.0
DECAY = 0.999

CONFIG = {"plugins": [
    {"plugin": "guard"},
    {"plugin": "label_smoothing", "smoothing": SMOOTHING},
    {"plugin": "grad_clip", "max_norm": REST_MAX_NORM,
     "groups": [{"name": "attention", "include": ["*attn*"], "max_norm": ATTENTION_MAX_NORM}]},
    {"plugin": "ema", "decay": DECAY},
]}


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, seq, dim = x.shape
        q, k, v = (t.view(batch, seq, self.heads, -1).transpose(1, 2)
                   for t in self.qkv(x).split(dim, dim=2))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(y.transpose(1, 2).reshape(batch, seq, dim))


class Block(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.ln_1, self.attn = nn.LayerNorm(dim), Attention(dim, heads)
        self.ln_2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(approximate="tanh"),
                                 nn.Linear(4 * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, vocab: int, seq: int, layers: int, dim: int, heads: int) -> None:
        super().__init__()
        self.wte, self.wpe = nn.Embedding(vocab, dim), nn.Embedding(seq, dim)
        self.blocks = nn.ModuleList(Block(dim, heads) for _ in range(layers))
        self.ln_f = nn.LayerNorm(dim)
        self.lm_head = nn.Linear(dim, vocab, bias=False)
        self.lm_head.weight = self.wte.weight
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=0.02)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.wte(idx) + self.wpe(torch.arange(idx.shape[1], device=idx.device))
        for block in self.blocks:
            x = block(x)
        return self.lm_head(self.ln_f(x))


class Clock:
    """CUDA events (GPU time between marks) and host clocks at the phase marks of a step."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.marks: list[tuple[torch.cuda.Event | None, float]] = []

    def mark(self) -> None:
        event = None
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
        self.marks.append((event, time.perf_counter()))

    def phases(self) -> tuple[list[float], list[float]]:
        """GPU and host milliseconds between consecutive marks (GPU: host if no CUDA)."""
        host = [(b[1] - a[1]) * 1e3 for a, b in zip(self.marks, self.marks[1:], strict=False)]
        if not self.cuda:
            return host, host
        gpu = [a[0].elapsed_time(b[0]) for a, b in zip(self.marks, self.marks[1:], strict=False)]
        return gpu, host


def fused_adamw(model: nn.Module, lr: float) -> torch.optim.AdamW:
    return torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.1, fused=True)


def group_params(model: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    attention, rest = [], []
    for name, param in model.named_parameters():
        (attention if "attn" in name else rest).append(param)
    return attention, rest


class HandTechniques:
    """The config's techniques written inline, as one would without the library.

    The guard's finiteness check shares the two clipping groups' norms; the spike rule,
    re-baselining and skip counters stay on the device and are read every 10 steps
    without waiting; the skip flag goes to the fused AdamW as ``found_inf``; the EMA is
    the skip-masked update with the plugin's per-tensor weight. The host calls
    :meth:`after_backward` with the step's task loss, :meth:`step` instead of
    ``optimizer.step()``, then :meth:`consolidate`.
    """

    def __init__(self, model: nn.Module, device: torch.device) -> None:
        self.device = device
        self.attention, self.rest = group_params(model)
        self.params = list(model.parameters())
        self.window = 10
        self.history = torch.zeros(self.window, device=device)
        self.positions = torch.arange(self.window, device=device)
        self.count = torch.zeros((), dtype=torch.int64, device=device)
        self.spike_run = torch.zeros((), dtype=torch.int64, device=device)
        self.counters = torch.zeros(4, dtype=torch.int64, device=device)
        self.run_length = torch.zeros((), dtype=torch.int64, device=device)
        self.longest = torch.zeros((), dtype=torch.int64, device=device)
        self.pinned = torch.empty(6, dtype=torch.int64, pin_memory=device.type == "cuda")
        self.read_event: torch.cuda.Event | None = None
        self.steps = 0
        with torch.no_grad():
            self.shadow = [p.detach().clone() for p in self.params]
        self.ema_count = torch.zeros((), dtype=torch.int64, device=device)
        self.ema_weight = torch.zeros((), device=device)
        self.ema_weights = [self.ema_weight.expand_as(s) for s in self.shadow]

    @torch.no_grad()
    def after_backward(self, loss: torch.Tensor) -> torch.Tensor:
        """Clip both groups, judge the step; the skip flag (a device tensor)."""
        loss = loss.detach().float()
        groups = ((self.attention, ATTENTION_MAX_NORM), (self.rest, REST_MAX_NORM))
        norms = self.group_norms([params for params, _ in groups])
        for (params, max_norm), norm in zip(groups, norms, strict=True):
            torch.nn.utils.clip_grads_with_norm_(params, max_norm, norm, foreach=True)
        finite = torch.isfinite(loss)
        loss_bad, grads_bad = ~finite, ~torch.isfinite(norms).all()
        filled = self.count >= self.window
        limit = self.history.mean() * 4
        spike = filled & finite & (loss > limit)
        record = torch.where(filled, torch.minimum(loss, limit), loss)
        slot = (self.positions == self.count % self.window) & finite
        history = torch.where(slot, record, self.history)
        self.spike_run.add_(1).mul_(spike)
        rebaseline = self.spike_run >= 3
        self.history.copy_(torch.where(rebaseline, loss, history))
        self.spike_run.mul_(~rebaseline)
        self.count.add_(finite.to(torch.int64))
        skip = loss_bad | grads_bad | spike
        self.counters.add_(torch.stack([skip, loss_bad, grads_bad, spike]).to(torch.int64))
        skip = self.agree(skip)
        self.run_length.add_(1).mul_(skip.to(torch.int64))
        torch.maximum(self.longest, self.run_length, out=self.longest)
        return skip

    def group_norms(self, groups: list[list[nn.Parameter]]) -> torch.Tensor:
        """The gradient norm of each group of parameters, one tensor."""
        return torch.stack([
            torch.nn.utils.get_total_norm([p.grad for p in params], foreach=True)
            for params in groups])

    def agree(self, skip: torch.Tensor) -> torch.Tensor:
        """The step's skip decision from this process's verdict: the verdict itself."""
        return skip

    @staticmethod
    def hand_over(optimizer: torch.optim.Optimizer, skip: torch.Tensor) -> bool:
        """Give the fused AdamW the flag as ``found_inf`` for its next step; whether it was
        given (remove it after the step). A fresh fused AdamW ignores it on its first step."""
        if not optimizer.state:
            return False
        optimizer.found_inf = skip.float()
        return True

    def step(self, optimizer: torch.optim.Optimizer, skip: torch.Tensor) -> None:
        handed = self.hand_over(optimizer, skip)
        optimizer.step()
        if handed:
            del optimizer.found_inf

    def consolidate(self, skip: torch.Tensor) -> None:
        self._ema(skip)
        self._read_counters()

    @torch.no_grad()
    def _ema(self, skip: torch.Tensor) -> None:
        n = self.ema_count.to(torch.float64)
        decay = torch.where(n == 0, 0.0, ((1 + n) / (10 + n)).clamp(max=DECAY))
        keep = (~skip).to(torch.int64)
        self.ema_weight.copy_((1 - decay) * keep)
        torch._foreach_lerp_(self.shadow, self.params, self.ema_weights)
        self.ema_count.add_(keep)

    def _read_counters(self) -> None:
        """Every 10th step, copy the counters to pinned memory without waiting; look at
        them once a later step finds them arrived (a run of 10 skips would stop here)."""
        self.steps += 1
        if self.read_event is not None and self.read_event.query():
            if self.pinned[1] >= 10:
                raise RuntimeError("10 optimizer steps in a row were skipped")
            self.read_event = None
        if self.steps % 10 == 0 and self.read_event is None:
            counters = torch.cat([self.run_length.reshape(1), self.longest.reshape(1),
                                  self.counters])
            self.longest.copy_(self.run_length)
            self.pinned.copy_(counters, non_blocking=True)
            if self.device.type == "cuda":
                self.read_event = torch.cuda.Event()
                self.read_event.record()


class Variant:
    """One way of training: its optimizer, its technique state and its step.

    ``config``, ``hand_techniques``, :meth:`setup_pipeline` and :meth:`hand_loss` are what
    a variant of this benchmark (other techniques, several processes) changes.
    """

    config = CONFIG
    hand_techniques = HandTechniques

    def __init__(self, name: str, model: nn.Module, forward: nn.Module, device: torch.device,
                 total_steps: int, lr: float) -> None:
        self.name, self.model, self.forward, self.device = name, model, forward, device
        self.optimizer = fused_adamw(model, lr)
        self.autocast = torch.autocast(device.type, dtype=torch.bfloat16,
                                       enabled=device.type == "cuda")
        self.pipe = None
        if name == "pipeline":
            self.pipe = self.setup_pipeline(steadytrain.Pipeline.from_config(self.config),
                                            total_steps)
        if name == "hand":
            self.hand = self.hand_techniques(model, device)

    def setup_pipeline(self, pipe: steadytrain.Pipeline, total_steps: int) -> steadytrain.Pipeline:
        return pipe.setup(self.model, self.optimizer, total_steps=total_steps)

    # -- the README's loop --------------------------------------------------------

    def pipeline_step(self, x: torch.Tensor, y: torch.Tensor, clock: Clock) -> None:
        pipe, optimizer = self.pipe, self.optimizer
        clock.mark()
        pipe.before_step(batch=x, targets=y)
        with self.autocast:
            logits = self.forward(x)
        loss = pipe.compute_loss(F.cross_entropy(logits.flatten(0, 1), y.flatten()),
                                 outputs={"logits": logits})
        clock.mark()
        loss.backward()
        clock.mark()
        outcome = pipe.after_backward()
        clock.mark()
        steadytrain.step_optimizer(optimizer, outcome)
        clock.mark()
        pipe.consolidate()
        optimizer.zero_grad()
        clock.mark()

    # -- the same techniques by hand ----------------------------------------------

    def hand_step(self, x: torch.Tensor, y: torch.Tensor, clock: Clock) -> None:
        optimizer, hand = self.optimizer, self.hand
        clock.mark()
        with self.autocast:
            logits = self.forward(x)
        loss = self.hand_loss(logits, y)
        clock.mark()
        loss.backward()
        clock.mark()
        skip = hand.after_backward(loss)
        clock.mark()
        hand.step(optimizer, skip)
        clock.mark()
        hand.consolidate(skip)
        optimizer.zero_grad()
        clock.mark()

    def hand_loss(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The task loss with the techniques' terms, inline: torch's label smoothing."""
        return F.cross_entropy(logits.flatten(0, 1), y.flatten(), label_smoothing=SMOOTHING)

    # -- no techniques ------------------------------------------------------------

    def plain_step(self, x: torch.Tensor, y: torch.Tensor, clock: Clock) -> None:
        clock.mark()
        with self.autocast:
            logits = self.forward(x)
        loss = F.cross_entropy(logits.flatten(0, 1), y.flatten())
        clock.mark()
        loss.backward()
        clock.mark()
        clock.mark()
        self.optimizer.step()
        clock.mark()
        self.optimizer.zero_grad()
        clock.mark()

    def step(self, x: torch.Tensor, y: torch.Tensor, clock: Clock) -> None:
        getattr(self, f"{self.name}_step")(x, y, clock)

    def end_of_round(self) -> dict[str, float]:
        return self.pipe.metrics() if self.pipe is not None else {}


def check_equivalence(args: argparse.Namespace, device: torch.device, batches: list,
                      steps: int = 5) -> float:
    """Train two copies of one model by hand and through the pipeline on the same batches;
    the largest relative difference of their weights and of their EMA shadows."""
    trained = {}
    for name in ("hand", "pipeline"):
        torch.manual_seed(1)
        model = GPT(args.vocab, args.seq, args.layers, args.dim, args.heads).to(device)
        variant = Variant(name, model, model, device, steps + 1, args.lr)
        for i in range(steps):
            variant.step(*batches[i % len(batches)], Clock(device))
        shadow = variant.hand.shadow if name == "hand" else variant.pipe.plugins["ema"].shadow
        trained[name] = [p.detach() for p in model.parameters()] + list(shadow)
    return max(((a - b).norm() / b.norm()).item()
               for a, b in zip(trained["hand"], trained["pipeline"], strict=True))


def sync_sites(caught: list[warnings.WarningMessage]) -> Counter:
    """The ``file:line`` of each synchronizing call among warnings that
    ``torch.cuda.set_sync_debug_mode("warn")`` raised."""
    return Counter(f"{os.path.basename(w.filename)}:{w.lineno}" for w in caught
                   if "synchroniz" in str(w.message))


def count_syncs(variant: Variant, batches: list, steps: int) -> tuple[float, Counter]:
    """Host syncs per step that the CUDA sync debug mode reports, and where they were."""
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            for i in range(steps):
                variant.step(*batches[i % len(batches)], Clock(variant.device))
        finally:
            torch.cuda.set_sync_debug_mode("default")
    variant.end_of_round()
    sites = sync_sites(caught)
    return sum(sites.values()) / steps, sites


def gpu_intervals(trace_path: str) -> tuple[list[tuple[float, float]], Counter, Counter]:
    """The busy intervals (µs, merged), and the calls and µs by name, of the GPU work in a
    chrome trace that ``torch.profiler`` exported."""
    opener = gzip.open if trace_path.endswith(".gz") else open
    with opener(trace_path, "rt") as file:
        events = json.load(file)["traceEvents"]
    work = sorted((e["ts"], e["ts"] + e.get("dur", 0), e["name"]) for e in events
                  if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset"))
    calls, spent = Counter(), Counter()
    merged: list[list[float]] = []
    for begin, end, name in work:
        calls[name] += 1
        spent[name] += end - begin
        if merged and begin <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], end)
        else:
            merged.append([begin, end])
    return [(b, e) for b, e in merged], calls, spent


def busy_between(intervals: list[tuple[float, float]], begin: float, end: float) -> float:
    return sum(max(0.0, min(e, end) - max(b, begin)) for b, e in intervals)


def profile(variants: list[Variant], batches: list, steps: int, folder: str | None) -> dict:
    """Run one round of *steps* steps of each variant under ``torch.profiler``, from an
    empty GPU queue as in the measured rounds, and say where each phase's GPU time went:
    kernels (busy) or waiting for the host (idle).

    The phases' windows on the GPU are the CUDA-event times of the round laid end to end
    from its first kernel. Each variant's trace is written to *folder* (gzip'd chrome
    trace) when given.
    """
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    report = {}
    for variant in variants:
        key = f"{'compiled' if variant.forward is not variant.model else 'eager'}/{variant.name}"
        cuda = variant.device.type == "cuda"
        # On the CPU (a smoke run of this code) the trace holds no GPU work.
        activity = ProfilerActivity.CUDA if cuda else ProfilerActivity.CPU
        synchronize = torch.cuda.synchronize if cuda else (lambda: None)
        synchronize()
        clocks = []
        with torch_profile(activities=[activity]) as prof:
            for i in range(steps):
                clock = Clock(variant.device)
                variant.step(*batches[i % len(batches)], clock)
                clocks.append(clock)
            synchronize()
        variant.end_of_round()
        path = os.path.join(folder or tempfile.mkdtemp(), f"trace_{key.replace('/', '_')}.json")
        prof.export_chrome_trace(path)
        if folder:
            with open(path, "rb") as raw, gzip.open(path + ".gz", "wb") as packed:
                shutil.copyfileobj(raw, packed)
        intervals, calls, spent = gpu_intervals(path)
        os.remove(path)
        edge = intervals[0][0] if intervals else 0.0
        busy = [[0.0] * len(PHASES) for _ in range(steps)]
        idle = [[0.0] * len(PHASES) for _ in range(steps)]
        for step, clock in enumerate(clocks):
            for phase, length in enumerate(clock.phases()[0]):
                used = busy_between(intervals, edge, edge + length * 1e3) / 1e3
                busy[step][phase], idle[step][phase] = used, length - used
                edge += length * 1e3
        report[key] = {"kernels_per_step": sum(calls.values()) / steps,
                       "kernel_ms_per_step": sum(spent.values()) / steps / 1e3,
                       "busy_ms": busy, "idle_ms": idle, "calls": dict(calls),
                       "spent_us": dict(spent)}
        print(f"profile {key}: {sum(calls.values()) / steps:.0f} kernels/step, "
              f"{sum(spent.values()) / steps / 1e3:.3f} ms of kernel time/step; GPU idle "
              f"per step {' '.join(f'{sum(s):.2f}' for s in idle)} ms")
        print("    median busy/idle ms per phase: " + ", ".join(
            f"{phase} {statistics.median(s[i] for s in busy):.3f}/"
            f"{statistics.median(s[i] for s in idle):.3f}" for i, phase in enumerate(PHASES)))
    for mode in ("eager", "compiled"):
        hand, pipe = report.get(f"{mode}/hand"), report.get(f"{mode}/pipeline")
        if hand is None or pipe is None:
            continue
        names = set(hand["spent_us"]) | set(pipe["spent_us"])

        def extra(name: str, pipe: dict = pipe, hand: dict = hand) -> float:
            return pipe["spent_us"].get(name, 0.0) - hand["spent_us"].get(name, 0.0)

        ordered = sorted(names, key=extra)
        print(f"{mode}: kernels with the most more time per step in pipeline than in hand:")
        for name in [*ordered[::-1][:10], *ordered[:3]]:
            calls = pipe["calls"].get(name, 0) - hand["calls"].get(name, 0)
            print(f"  {extra(name) / steps / 1e3:+.3f} ms  {calls / steps:+.0f} calls  {name[:90]}")
    return report


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """The GPT's and the batch's options, GPT-2 small by default (shared by the scripts)."""
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--vocab", type=int, default=50257)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--dim", type=int, default=768)
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--lr", type=float, default=1e-4)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_model_arguments(parser)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--steps", type=int, default=10, help="steps per variant per round")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--variants", nargs="+", default=["plain", "hand", "pipeline"])
    parser.add_argument("--no-compile", action="store_true")
    parser.add_argument("--profile", action="store_true",
                        help="one more round of hand and pipeline under torch.profiler, per mode")
    parser.add_argument("--trace-dir", help="write the profiled rounds' traces here (gzip)")
    parser.add_argument("--check", action="store_true",
                        help="first check that hand and pipeline train alike")
    parser.add_argument("--json", help="write every step's phase times here")
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    torch.manual_seed(0)
    model = GPT(args.vocab, args.seq, args.layers, args.dim, args.heads).to(device)
    params = sum(p.numel() for p in model.parameters())
    modes = {"eager": model}
    if not args.no_compile:
        modes["compiled"] = torch.compile(model)
    total = (args.warmup + args.rounds * args.steps + 40) * len(modes)
    variants = {(mode, name): Variant(name, model, forward, device, total, args.lr)
                for mode, forward in modes.items() for name in args.variants}
    batches = [(torch.randint(0, args.vocab, (args.batch, args.seq), device=device),
                torch.randint(0, args.vocab, (args.batch, args.seq), device=device))
               for _ in range(4)]
    print(f"torch {torch.__version__}, {platform.python_version()}, "
          f"{torch.cuda.get_device_name() if device.type == 'cuda' else platform.processor()}, "
          f"{date.today()}; {params / 1e6:.1f}M parameters, batch {args.batch}×{args.seq}")

    if args.check:
        difference = check_equivalence(args, device, batches)
        print(f"hand vs pipeline after 5 steps from one initialization: largest relative "
              f"difference of a weight or EMA tensor {difference:.2e}")
    started = time.perf_counter()
    for (mode, name), variant in variants.items():
        for i in range(args.warmup):
            variant.step(*batches[i % len(batches)], Clock(device))
        variant.end_of_round()
        if device.type == "cuda":
            torch.cuda.synchronize()
        print(f"warm-up {mode} {name}: {time.perf_counter() - started:.1f} s", flush=True)

    gpu: dict[tuple[str, str], list[list[float]]] = defaultdict(list)
    host: dict[tuple[str, str], list[list[float]]] = defaultdict(list)
    for round_index in range(args.rounds):
        # Every other round in reverse order: no variant always follows the same one, at
        # the same point of a round (the GPU's clocks follow the load of the last seconds).
        order = list(variants.items())
        for key, variant in order if round_index % 2 == 0 else order[::-1]:
            clocks = []
            for i in range(args.steps):
                clock = Clock(device)
                variant.step(*batches[(round_index + i) % len(batches)], clock)
                clocks.append(clock)
            if device.type == "cuda":
                torch.cuda.synchronize()
            for clock in clocks:
                g, h = clock.phases()
                gpu[key].append(g)
                host[key].append(h)
            metrics = variant.end_of_round()
            if metrics and not math.isfinite(metrics["loss/task"]):
                raise RuntimeError(f"{key}: the loss is not finite: {metrics}")

    syncs, sites = {}, {}
    if device.type == "cuda":
        for key, variant in variants.items():
            syncs[key], sites[key] = count_syncs(variant, batches, 10)

    print(f"\nmedian ms per step over {args.rounds}×{args.steps} steps; GPU time per phase "
          "(CUDA events), host time per step")
    header = (f"{'mode':9}{'variant':10}{'step':>9}{'ratio':>8}{'host':>9}"
              + "".join(f"{p[:12]:>13}" for p in PHASES) + f"{'syncs':>7}")
    print(header)
    results = {}
    for (mode, name) in variants:
        steps_gpu = [sum(p) for p in gpu[mode, name]]
        step = statistics.median(steps_gpu)
        hand = statistics.median(sum(p) for p in gpu[mode, "hand"]) if (
            mode, "hand") in gpu else float("nan")
        phases = [statistics.median(p[i] for p in gpu[mode, name]) for i in range(len(PHASES))]
        host_step = statistics.median(sum(p) for p in host[mode, name])
        sync = syncs.get((mode, name), float("nan"))
        results[f"{mode}/{name}"] = {
            "step_ms": step, "ratio": step / hand, "host_ms": host_step, "syncs": sync,
            "sync_sites": dict(sites.get((mode, name), {})),
            "phases_ms": dict(zip(PHASES, phases, strict=True)), "steps_gpu_ms": steps_gpu}
        print(f"{mode:9}{name:10}{step:9.3f}{step / hand:8.4f}{host_step:9.3f}"
              + "".join(f"{v:13.3f}" for v in phases) + f"{sync:7.2f}")
    if "compiled" in modes:
        from torch._dynamo.utils import counters
        print(f"torch.compile: {counters['stats']['unique_graphs']} graphs, "
              f"{sum(counters['graph_break'].values())} graph breaks, "
              f"{sum(counters['recompiles'].values())} recompiles")
    for (mode, name), where in sites.items():
        if where:
            print(f"syncs of {mode} {name}: " + ", ".join(f"{n} at {site}"
                                                      for site, n in where.most_common()))
    print("median GPU ms per step by its position in the round (the queue is empty at 1):")
    for key, times in gpu.items():
        steps_gpu = [sum(p) for p in times]
        medians = [statistics.median(steps_gpu[i::args.steps]) for i in range(args.steps)]
        print(f"  {key[0]:9}{key[1]:10}" + " ".join(f"{m:7.2f}" for m in medians))
    profiled = {}
    if args.profile:
        profiled = profile([v for (_, name), v in variants.items() if name != "plain"],
                           batches, args.steps, args.trace_dir)
    if args.json:
        with open(args.json, "w") as out:
            json.dump({"args": vars(args), "torch": torch.__version__, "results": results,
                       "host_phases": {f"{m}/{n}": v for (m, n), v in host.items()},
                       "profile": profiled}, out)


if __name__ == "__main__":
    main()
