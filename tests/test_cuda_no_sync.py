"""On CUDA, the documented loop and a step with every built-in plugin never sync the host.

The README's loop runs verbatim; the other test's model uses the ``steadytrain.nn``
building blocks (which report gates and masks) and records a corrector's changes. Both
step with ``steadytrain.step_optimizer`` and read metrics only at the end. Plugins that
sync on purpose do it on their first step (documented), so the check starts after it.
Skipped without CUDA.
"""

import re
from pathlib import Path

import pytest
import torch

import steadytrain
from steadytrain import Pipeline, Registry
from steadytrain.nn import DualMemory, MemoryGate, SoftTopK
from steadytrain.plugins.corrector.corrector_penalty import apply_corrector

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

CONFIG = {
    "plugins": [
        {"plugin": "guard", "check_every": 1000},
        {"plugin": "label_smoothing"},
        {"plugin": "gate_smoothness", "weight": 0.1},
        {"plugin": "gate_entropy", "weight": 0.05, "target": 1.0},
        {"plugin": "sparsity_target", "weight": 0.1},
        {"plugin": "corrector_penalty", "std": {"ice": 0.3}},
        {"plugin": "pre_corrector_optimization"},
        {"plugin": "grad_clip", "groups": [{"name": "memory", "include": ["gate.*"],
                                            "max_norm": 0.5}]},
        {"plugin": "grad_norm"},
        {"plugin": "stability_monitor", "check_every": 1000},
        {"plugin": "ema", "decay": 0.99},
        {"plugin": "scheduled_consolidation", "interval": 1000},
        {"plugin": "hidden_alignment", "weighting": "decay"},
        {"plugin": "logit_distillation", "ignore_index": -100, "top_k": 3, "temperature": {
            "kind": "cosine_warmup", "start": 3.0, "value": 1.0, "warmup_steps": 10}},
        {"plugin": "gradient_penalty", "mode": "wgan_gp"},
        {"plugin": "l2_sp"},
        {"plugin": "z_loss"},
    ]
}


class Toy(torch.nn.Module):
    def __init__(self, dim: int = 16, classes: int = 5) -> None:
        super().__init__()
        self.embed = torch.nn.Linear(dim, dim)
        self.memory = DualMemory(dim, 32, 64)
        self.gate = MemoryGate(dim)
        self.sparse = SoftTopK(dim)
        self.head = torch.nn.Linear(dim, classes)
        self.field = torch.nn.Linear(dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.embed(x))
        stm, ltm = self.memory.retrieve(h)
        mixed, _ = self.gate(h, stm, ltm)
        sparse, _ = self.sparse(mixed)
        self.memory.store(h.detach()[0, :4], sparse.detach()[0, :4])
        self.fields = apply_corrector(lambda f: {"ice": f["ice"].clamp(0, 1)},
                                      {"ice": 10 * self.field(sparse).squeeze(-1) - 2})
        return self.head(sparse)


def test_every_plugin_together_causes_no_host_sync_per_step():
    registry = Registry.discover(autoload=False)
    assert {p["plugin"] for p in CONFIG["plugins"]} == set(registry.names())
    torch.manual_seed(0)
    model = Toy().cuda()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
    pipe = Pipeline.from_config(CONFIG, registry=registry)
    pipe.plugins["gradient_penalty"].bind(critic=torch.nn.Linear(16, 1).cuda())
    pipe.setup(model, optimizer, total_steps=100)
    x = torch.randn(4, 12, 16, device="cuda")
    y = torch.randint(0, 5, (4, 12), device="cuda")
    y[0, :3] = -100

    def step() -> None:
        pipe.before_step(batch=x, targets=y)
        logits = model(x)
        fields = pipe.plugins["pre_corrector_optimization"].for_loss(model.fields)
        task = torch.nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten())
        teacher = logits.detach() + 0.1  # a teacher for the distillation plugins
        loss = pipe.compute_loss(task + fields["ice"].square().mean(), outputs={
            "logits": logits, "teacher_logits": teacher, "hidden_states": [logits, logits],
            "teacher_hidden_states": [teacher, teacher], "real": x, "fake": x.flip(0)})
        loss.backward()
        steadytrain.step_optimizer(optimizer, pipe.after_backward())
        pipe.consolidate()
        optimizer.zero_grad()

    for _ in range(3):  # first-step checks and allocations
        step()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(3):
            step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    metrics = pipe.metrics()
    assert metrics["loss/task"] > 0 and metrics["guard/skipped"] == 0
    assert pipe.run.step == 6


def readme_loop() -> str:
    text = (ROOT / "README.md").read_text()
    return re.search(r"## A training loop with a pipeline\n\n```python\n(.*?)```", text,
                     re.S).group(1)


def test_the_readme_loop_causes_no_host_sync_after_its_first_step(monkeypatch):
    """The README's block, verbatim: from the second step on, no call may sync the host."""
    closed = []
    consolidate, metrics = Pipeline.consolidate, Pipeline.metrics

    def consolidate_then_watch(self):
        consolidate(self)
        closed.append(self.run.step)
        if self.run.step == 1:  # first-step checks are documented to sync once
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("error")

    def metrics_unwatched(self, **kwargs):
        torch.cuda.set_sync_debug_mode("default")  # reading numbers is the one sync
        return metrics(self, **kwargs)

    monkeypatch.setattr(Pipeline, "consolidate", consolidate_then_watch)
    monkeypatch.setattr(Pipeline, "metrics", metrics_unwatched)
    try:
        exec(compile(readme_loop(), "README.md", "exec"), {})
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert closed == list(range(1, 11))
