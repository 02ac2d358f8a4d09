"""The built-in models and the example configs that use them."""

import json
import tomllib
from pathlib import Path

import attrs
import pytest
import torch

import steadytrain
from steadytrain.experiments import demo, load_experiment
from steadytrain.experiments.emulator import NAMES, EmulationTask, EmulatorOptions
from steadytrain.experiments.gpt import GPT, GPTOptions
from steadytrain.experiments.loop import train
from steadytrain.experiments.memory_lm import HardTopK, MemoryLM, MemoryLMOptions
from steadytrain.experiments.models import model_options

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def test_gpt_is_causal_and_qk_layernorm_is_a_model_option():
    torch.manual_seed(0)
    plain = GPT(GPTOptions(layers=2, width=16, heads=2), vocab=256, context=12)
    normed = GPT(GPTOptions(layers=2, width=16, heads=2, qk_layernorm=True), vocab=256,
                 context=12)
    ids = torch.randint(256, (3, 12))
    changed = ids.clone()
    changed[:, 8:] = (changed[:, 8:] + 1) % 256
    torch.testing.assert_close(plain(ids)[:, :8], plain(changed)[:, :8])
    assert plain(ids).shape == (3, 12, 256)
    extra = {n for n, _ in normed.named_parameters()} - {n for n, _ in plain.named_parameters()}
    assert extra == {f"blocks.{i}.attn.{w}_norm.{p}" for i in range(2) for w in "qk"
                     for p in ("weight", "bias")}
    with pytest.raises(ValueError, match="longer than the context of 12"):
        plain(torch.zeros(1, 13, dtype=torch.long))


def test_hard_topk_keeps_k_features_and_gives_its_scores_no_gradient():
    torch.manual_seed(1)
    layer = HardTopK(20, 0.15)
    x = torch.randn(4, 20, requires_grad=True)
    out, mask = layer(x)
    assert (mask.sum(-1) == 3).all()
    out.sum().backward()
    assert layer.importance.weight.grad is None
    torch.testing.assert_close(x.grad, mask)


def test_random_consolidation_happens_in_training_at_the_configured_rate():
    torch.manual_seed(2)
    options = MemoryLMOptions(layers=1, width=16, heads=2, stm=32, ltm=32, writes=4,
                              threshold=1, consolidation_rate=1.0)
    model = MemoryLM(options, vocab=256, context=8)
    ids = torch.randint(256, (2, 8))
    for _ in range(3):  # the retrievals count accesses, consolidation moves them
        model(ids)
    assert int(model.memory.ltm.valid.sum()) > 0
    quiet = MemoryLM(attrs.evolve(options, consolidation="scheduled"), vocab=256, context=8)
    for _ in range(3):
        quiet(ids)
    assert int(quiet.memory.ltm.valid.sum()) == 0


def test_the_emulator_reports_its_corrections_and_its_evaluation():
    options = EmulatorOptions(width=4, grid=8, trajectories=2, length=6, rollout=2, horizon=3)
    task = EmulationTask(options, batch_size=2, seed=0, device=torch.device("cpu"))
    model = task.build_model()
    inputs, targets = task.batch(0)
    assert inputs.shape == (2, 3, 8, 8) and targets.shape == (2, 2, 3, 8, 8)
    pipe = steadytrain.Pipeline().setup(model)
    ctx = pipe.before_step()
    task.loss(model, inputs, targets)
    corrections = ctx.outputs["corrections"]
    assert len(corrections) == 2 and set(corrections[0]) == set(NAMES)
    scores = task.evaluate(model)
    assert set(scores) == {"loss", "correction", "rmse_3_steps"}


def test_the_demo_configs_are_the_examples():
    for name, config in demo.CONFIGS.items():
        example = tomllib.loads((EXAMPLES / "gpt" / f"{name}.toml").read_text())
        assert load_experiment(example, model_options=model_options).to_dict() == \
            load_experiment(json.loads(json.dumps(config)),
                            model_options=model_options).to_dict(), name


RUN_CONFIGS = sorted(p for p in EXAMPLES.rglob("*.toml") if p.name != "pyproject.toml")


@pytest.mark.parametrize("path", RUN_CONFIGS, ids=lambda p: p.name)
def test_every_example_run_config_loads(path):
    if path.parent.name in ("lightning",) or path.name == "quickstart.toml":
        pytest.skip("a pipeline config of a script, not a run config")
    config = load_experiment(path, model_options=model_options)
    steadytrain.Pipeline.from_config(config.pipeline)


def test_the_emulator_config_trains_with_the_corrector_penalty(tmp_path):
    raw = tomllib.loads((EXAMPLES / "emulator" / "stabilized.toml").read_text())
    raw["model"].update(grid=8, trajectories=2, length=6, horizon=3, width=4)
    raw["train"].update(steps=4, log_every=2, checkpoint_every=2)
    summary = train(load_experiment(raw, model_options=model_options), tmp_path / "run")
    assert summary["status"] == "finished"
    assert set(summary["extras"]) == {"correction", "rmse_3_steps"}
    line = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[-1])
    assert any(k.startswith("reg/corrector_penalty/") for k in line["pipeline"])
