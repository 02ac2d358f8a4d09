"""The memory-model example: its configs are the document's recipe on the memory LM."""

from pathlib import Path

import attrs
import pytest
import torch

import steadytrain
from steadytrain.experiments import load_experiment
from steadytrain.experiments.loop import build_optimizer
from steadytrain.experiments.memory_lm import HardTopK, MemoryLM, SoftmaxGate
from steadytrain.experiments.models import model_options

HERE = Path(__file__).resolve().parents[1] / "examples" / "memory_model"
RECIPE = {
    "guard", "label_smoothing", "gate_smoothness", "gate_entropy", "sparsity_target",
    "grad_clip", "ema", "scheduled_consolidation",
}


def load(name: str):
    return load_experiment(HERE / name, model_options=model_options)


def test_stabilized_config_is_every_part_of_the_recipe():
    config = load("stabilized.toml")
    options = config.model.options
    assert (options.gate, options.sparsity, options.consolidation, options.memory_norm) == (
        "stabilized", "soft_topk", "scheduled", True)
    assert options.target_sparsity == 0.15
    pipe = steadytrain.Pipeline.from_config(config.pipeline)
    assert {type(p).name for p in pipe.plugins.values()} == RECIPE
    model = MemoryLM(options, vocab=256, context=64)
    optimizer = build_optimizer(model, config)
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


def test_baseline_has_the_documents_starting_mechanisms_and_no_plugin():
    config = load("baseline.toml")
    model = MemoryLM(config.model.options, vocab=256, context=64)
    assert isinstance(model.memory_gate, SoftmaxGate) and isinstance(model.sparse, HardTopK)
    assert config.model.options.consolidation == "random"
    assert config.pipeline.plugins == () and config.pipeline.param_groups == ()


def differences(a, b) -> dict:
    return {k: (a[k], b[k]) for k in a if a[k] != b[k]}


@pytest.mark.parametrize(
    ("name", "changed"),
    [
        ("softmax_gate", {"model": {"gate": ("stabilized", "softmax")}}),
        ("hard_topk", {"model": {"sparsity": ("soft_topk", "hard_topk"),
                                 "target_sparsity": (0.15, 0.05)}}),
        ("no_memory_norm", {"model": {"memory_norm": (True, False)}}),
    ],
)
def test_each_model_ablation_undoes_one_building_block(name, changed):
    stabilized, ablation = load("stabilized.toml"), load(f"ablations/{name}.toml")
    assert ablation.train == stabilized.train
    # a hard mask has no gradient for the sparsity penalty to act on: it goes too
    penalties = [p for p in stabilized.pipeline.plugins
                 if name != "hard_topk" or p.plugin != "sparsity_target"]
    assert list(ablation.pipeline.plugins) == penalties
    assert differences(attrs.asdict(stabilized.model.options),
                       attrs.asdict(ablation.model.options)) == changed["model"]


def test_the_other_ablations_undo_the_parameter_groups_or_the_consolidation_schedule():
    stabilized = load("stabilized.toml")
    groups = load("ablations/no_param_groups.toml")
    assert groups.pipeline.param_groups == () and groups.pipeline.plugins == \
        stabilized.pipeline.plugins and groups.model == stabilized.model
    random = load("ablations/random_consolidation.toml")
    assert random.model.options.consolidation == "random"
    assert [p.plugin for p in random.pipeline.plugins] == [
        p.plugin for p in stabilized.pipeline.plugins if p.plugin != "scheduled_consolidation"]


def test_the_memory_model_reports_what_the_recipes_plugins_read():
    config = load("stabilized.toml")
    torch.manual_seed(0)
    model = MemoryLM(config.model.options, vocab=256, context=32)
    pipe = steadytrain.Pipeline().setup(model)
    ctx = pipe.before_step()
    logits = model(torch.randint(256, (2, 32)))
    assert logits.shape == (2, 32, 256)
    assert ctx.outputs["gates"].shape == (2, 32, 3)
    assert ctx.outputs["sparsity_mask"].shape == (2, 32, 256)
    assert set(ctx.outputs["memory_utilization"]) == {"stm", "ltm"}
    assert int(model.memory.stm.valid.sum()) == config.model.options.writes
