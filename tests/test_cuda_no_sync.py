"""On CUDA, a training step with every built-in plugin enabled never syncs the host.

The model uses the ``steadytrain.nn`` building blocks (which report gates and masks) and
records a corrector's changes; the host steps with ``guarded_step`` and reads metrics only
at the end. Plugins that sync on purpose do it on their first step or every N steps
(documented), so the check runs on steps in between. Skipped without CUDA.
"""

import pytest
import torch

from steadytrain import Pipeline, Registry
from steadytrain.nn import DualMemory, MemoryGate, SoftTopK
from steadytrain.plugins.corrector_penalty import apply_corrector
from steadytrain.plugins.guard import guarded_step

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

CONFIG = {
    "plugins": [
        {"plugin": "guard", "check_every": 1000},
        {"plugin": "label_smoothing"},
        {"plugin": "gate_smoothness", "weight": 0.1},
        {"plugin": "gate_entropy", "weight": 0.05, "target": 1.0},
        {"plugin": "sparsity_target", "weight": 0.1},
        {"plugin": "corrector_penalty", "std": {"ice": 0.3}},
        {"plugin": "grad_clip", "groups": [{"name": "memory", "include": ["gate.*"],
                                            "max_norm": 0.5}]},
        {"plugin": "grad_norm"},
        {"plugin": "stability_monitor", "check_every": 1000},
        {"plugin": "ema", "decay": 0.99},
        {"plugin": "scheduled_consolidation", "interval": 1000},
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
        apply_corrector(lambda f: {"ice": f["ice"].clamp(0, 1)},
                        {"ice": 10 * self.field(sparse).squeeze(-1) - 2})
        return self.head(sparse)


def test_every_plugin_together_causes_no_host_sync_per_step():
    registry = Registry.discover(autoload=False)
    assert {p["plugin"] for p in CONFIG["plugins"]} == set(registry.names())
    torch.manual_seed(0)
    model = Toy().cuda()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
    pipe = Pipeline.from_config(CONFIG, registry=registry).setup(model, optimizer,
                                                                 total_steps=100)
    x = torch.randn(4, 12, 16, device="cuda")
    y = torch.randint(0, 5, (4, 12), device="cuda")

    def step() -> None:
        pipe.before_step(batch=x, targets=y)
        logits = model(x)
        loss = pipe.compute_loss(
            torch.nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten()),
            outputs={"logits": logits},
        )
        loss.backward()
        guarded_step(optimizer, pipe.after_backward())
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
