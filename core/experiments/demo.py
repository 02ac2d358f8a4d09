"""``steadytrain demo``: a byte-level GPT on the Python documentation, baseline against stabilized.

The two configs differ only in what Wortsman et al. 2023 found to widen the range of
learning rates a Transformer trains at: qk-layernorm in every attention layer (a model
option) and the z-loss on the output logits (the ``z_loss`` plugin, coefficient 1e-4).
Both train the same 2-layer, 64-wide GPT for 300 steps of 16 windows of 64 bytes, with
AdamW, 10 % linear warmup and cosine decay, at each learning rate of the sweep. The same
configs are ``examples/gpt/baseline.toml`` and ``examples/gpt/stabilized.toml``.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

from .compare import lr_sweep

BASELINE: dict[str, Any] = {
    "model": {"name": "gpt", "layers": 2, "width": 64, "heads": 4, "qk_layernorm": False},
    "data": {"source": "pydoc", "seq_len": 64, "batch_size": 16},
    "train": {"steps": 300, "lr": 0.01, "optimizer": "adamw", "warmup": 0.1,
              "schedule": "cosine", "seed": 0},
    "plugins": [],
}
STABILIZED: dict[str, Any] = copy.deepcopy(BASELINE)
STABILIZED["model"]["qk_layernorm"] = True
STABILIZED["plugins"] = [{"plugin": "z_loss", "coefficient": 1e-4}]

CONFIGS = {"baseline": BASELINE, "stabilized": STABILIZED}
QUICK = {"lrs": lr_sweep(1e-3, 3e-1, 4), "seeds": [0]}
FULL = {"lrs": lr_sweep(3e-4, 3e-1, 7), "seeds": [0, 1, 2]}


def write_configs(folder: Path) -> list[Path]:
    """The demo's configs as JSON files in *folder*; their paths."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, config in CONFIGS.items():
        path = folder / f"{name}.json"
        path.write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
        paths.append(path)
    return paths
