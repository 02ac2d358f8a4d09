"""The memory-model example runs as its page says, and its configs are the document's recipe."""

import importlib.util
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import steadytrain

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "examples" / "memory_model" / "train.py"
RECIPE = {
    "guard", "label_smoothing", "gate_smoothness", "gate_entropy", "sparsity_target",
    "grad_clip", "ema", "scheduled_consolidation", "grad_norm", "stability_monitor",
}


@pytest.fixture(scope="module")
def example():
    spec = importlib.util.spec_from_file_location("memory_model_train", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def tiny_run(example, name: str) -> dict:
    language = example.Language(topics=4, words=16)
    val = language.sample(16, 9, torch.Generator().manual_seed(1))
    return example.train(example.HERE / f"{name}.toml", language, val, steps=8, batch=4,
                         length=8, lr=1e-2, seed=0, log_every=4, verbose=False)


def test_tiny_command_prints_a_finite_summary_for_both_configs(tmp_path):
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--tiny", "--out", str(tmp_path / "table.md")],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stderr
    rows = [line.split("|")[1:-1] for line in (tmp_path / "table.md").read_text().splitlines()]
    assert [r[0].strip() for r in rows[2:]] == ["baseline", "stabilized"]
    for row in rows[2:]:
        val_loss, val_acc, osc_mean, osc_max, variance = map(float, row[2:7])
        assert math.isfinite(val_loss) and 0 < val_loss < 2 * math.log(20)
        assert 0 <= val_acc <= 1
        assert 1 <= osc_mean <= osc_max and variance >= 0
    assert result.stdout.count("| baseline | 0 |") == 1


def test_stabilized_config_assembles_every_plugin_of_the_recipe(example):
    raw, groups = example.load(example.HERE / "stabilized.toml")
    pipe = steadytrain.Pipeline.from_config(raw)
    assert {type(p).name for p in pipe.plugins.values()} == RECIPE
    model = example.MemoryModel(vocab=20)
    optimizer = torch.optim.AdamW(example.param_groups(model, groups, lr=1e-2,
                                                       weight_decay=0.01))
    memory, rest = optimizer.param_groups
    assert memory["lr"] == pytest.approx(1e-3) and memory["weight_decay"] == 0.001
    assert rest["lr"] == 1e-2 and rest["weight_decay"] == 0.01
    names = {id(p): n for n, p in model.named_parameters()}
    assert {names[id(p)] for p in memory["params"]} == {
        "memory_gate.gate_proj.weight", "memory_gate.gate_proj.bias",
        "memory_gate.temperature", "memory_gate.gate_bias", "memory_norm.weight",
        "memory_norm.bias",
    }
    pipe.setup(model, optimizer, total_steps=10)
    pipe.close()


def test_baseline_config_only_measures(example):
    raw, groups = example.load(example.HERE / "baseline.toml")
    assert groups == []
    pipe = steadytrain.Pipeline.from_config(raw)
    assert {type(p).name for p in pipe.plugins.values()} == {"grad_norm", "stability_monitor"}


def test_runs_log_the_stability_metrics_with_finite_losses(example):
    baseline, stabilized = tiny_run(example, "baseline"), tiny_run(example, "stabilized")
    for row in (baseline, stabilized):
        assert len(row["losses"]) == 8 and all(map(math.isfinite, row["losses"]))
        assert [h["step"] for h in row["history"]] == [4, 8]
        for metrics in row["history"]:
            assert set(example.SHOWN) <= set(metrics)
    for metrics in baseline["history"]:
        # Both measure the same raw gradients when nothing clips them.
        assert metrics["grad_norm/norm"] == pytest.approx(
            metrics["stability_monitor/grad_norm"], rel=1e-5)
        assert not any(k.startswith("reg/") for k in metrics)
    for metrics in stabilized["history"]:
        # Memory clipped at 0.5 and the rest at 1.0 bound the total norm by √(0.5² + 1²).
        assert metrics["grad_norm/norm"] <= math.sqrt(1.25) + 1e-5
        for term in ("gate_smoothness", "gate_entropy", "sparsity_target", "label_smoothing"):
            assert any(k.startswith(f"reg/{term}/") for k in metrics), term


def test_sentences_follow_their_topic_table(example):
    language = example.Language(topics=4, words=16)
    ids = language.sample(4000, 12, torch.Generator().manual_seed(3))
    assert ((ids[:, 0] >= 0) & (ids[:, 0] < 4)).all() and (ids[:, 1:] >= 4).all()
    topic, word, successor = ids[:, :1].expand(-1, 10), ids[:, 1:-1] - 4, ids[:, 2:] - 4
    counts = torch.zeros(4, 16, 16)
    counts.index_put_((topic.flatten(), word.flatten(), successor.flatten()),
                      torch.ones(topic.numel()), accumulate=True)
    frequencies = counts / counts.sum(-1, keepdim=True)
    assert torch.allclose(frequencies, language.table, atol=0.1)
    assert torch.allclose(language.table.sum(-1), torch.ones(4, 16))


def test_too_few_steps_for_a_summary_is_refused(example, capsys):
    with pytest.raises(SystemExit):
        example.main(["--steps", "4"])
    assert "--steps must be at least 8" in capsys.readouterr().err


def test_a_plot_without_matplotlib_is_refused_before_training(example, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if it were not installed
    with pytest.raises(SystemExit):
        example.main(["--tiny", "--plot", "curves.png"])
    assert "--plot needs matplotlib: pip install 'steadytrain[plots]'" in capsys.readouterr().err
