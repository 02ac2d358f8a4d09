"""The distillation demonstration: the student model, its teacher, the [teacher] table, a run."""

import json
import math

import pytest
import torch
import torch.nn.functional as F
from experiment_helpers import metrics_lines, tiny, write
from experiment_helpers import steadytrain as steadytrain_command

import steadytrain
from steadytrain.experiments import load_experiment
from steadytrain.experiments.distillation import DistillationTask
from steadytrain.experiments.gpt import GPT, GPTOptions
from steadytrain.experiments.loop import train
from steadytrain.experiments.models import build_task, model_options
from steadytrain.experiments.student import StudentGPT, StudentOptions, copy_matching

ARCHITECTURE = {"layers": 2, "width": 16, "heads": 2}
ALIGN = {"plugin": "hidden_alignment", "mse_weight": 1.0, "cosine_weight": 0.0}


@pytest.fixture(scope="module")
def teacher_run(tmp_path_factory):
    """A finished gpt run of 10 steps: the teacher of the students below."""
    out = tmp_path_factory.mktemp("teacher") / "run"
    train(experiment(tiny(steps=10, model=ARCHITECTURE)), out)
    return out


def student(teacher, plugins=(), model=None, teacher_table=None, **train_settings):
    """A gpt_student run config (block 1 made rank 4) that learns from *teacher*."""
    config = tiny(steps=10, plugins=plugins, model={"name": "gpt_student", **ARCHITECTURE,
                                                    "block": 1, "rank": 4, **(model or {})},
                  **train_settings)
    config["teacher"] = {"checkpoint": str(teacher), **(teacher_table or {})}
    return config


def experiment(config):
    return load_experiment(config, model_options=model_options)


def config_error(config):
    with pytest.raises(steadytrain.ConfigError) as caught:
        build_task(experiment(config), torch.device("cpu"))
    return str(caught.value)


# -- the student model ---------------------------------------------------------------------


def test_the_student_replaces_one_mlp_and_copies_everything_else_from_the_teacher():
    torch.manual_seed(0)
    teacher = GPT(GPTOptions(layers=3, width=16, heads=2), vocab=256, context=12)
    options = StudentOptions(layers=3, width=16, heads=2, block=1, rank=4)
    model = StudentGPT(options, vocab=256, context=12)
    assert options.teacher == GPTOptions(layers=3, width=16, heads=2)
    assert [m.out_features for m in model.blocks[1].mlp if isinstance(m, torch.nn.Linear)] \
        == [4, 16]
    kept = copy_matching(model, teacher)
    # the new MLP's output bias has the shape and role of the teacher's: it is copied
    assert kept == ["blocks.1.mlp.0.weight", "blocks.1.mlp.0.bias", "blocks.1.mlp.2.weight"]
    torch.testing.assert_close(model.blocks[1].mlp[2].bias, teacher.blocks[1].mlp[2].bias)
    ids = torch.randint(256, (2, 12))
    states, reference = model.block_states(ids), teacher.block_states(ids)
    torch.testing.assert_close(states[0], reference[0], rtol=0, atol=0)
    assert not torch.allclose(states[1], reference[1])
    # block 1 is the teacher's attention and the student's own MLP, by hand
    block, x = model.blocks[1], states[0]
    x = x + teacher.blocks[1].attn(teacher.blocks[1].attn_norm(x))
    torch.testing.assert_close(states[1], x + block.mlp(block.mlp_norm(x)))
    torch.testing.assert_close(model(ids), model.head(model.norm(states[-1])))


@pytest.mark.parametrize(("options", "message"), [
    ({"layers": 2, "block": 2}, r"model.block: must name one of the 2 blocks \(0 to 1\), got 2"),
    ({"rank": 0}, "model.rank: "),
    ({"width": 10, "heads": 4}, "model.width: must be a multiple of heads"),
])
def test_bad_student_options_name_the_option(options, message):
    with pytest.raises(steadytrain.ConfigError, match=message):
        model_options("gpt_student", options)


# -- the teacher: the [teacher] table and its checkpoint -----------------------------------


def test_the_teacher_is_the_runs_final_weights_frozen(teacher_run):
    task = build_task(experiment(student(teacher_run)), torch.device("cpu"))
    assert isinstance(task, DistillationTask)
    saved = torch.load(teacher_run / "checkpoint.pt", weights_only=True)["model"]
    for name, tensor in task.teacher.state_dict().items():
        torch.testing.assert_close(tensor, saved[name], rtol=0, atol=0)
    assert not task.teacher.training
    assert not any(p.requires_grad for p in task.teacher.parameters())
    # a run directory and its checkpoint.pt name the same teacher
    by_file = build_task(experiment(student(teacher_run / "checkpoint.pt")), torch.device("cpu"))
    assert by_file.teacher_loss == task.teacher_loss


def test_a_relative_teacher_path_is_taken_from_the_config_files_folder(teacher_run, tmp_path):
    folder = tmp_path / "configs"
    folder.mkdir()
    relative = "../" * len(folder.parts) + str(teacher_run).lstrip("/")
    path = write(folder / "student.json", student(relative))
    task = build_task(load_experiment(path, model_options=model_options), torch.device("cpu"))
    assert isinstance(task, DistillationTask)


def test_a_missing_teacher_checkpoint_is_an_error_naming_the_key(teacher_run, tmp_path):
    message = config_error(student(tmp_path / "nowhere"))
    assert message.startswith("teacher.checkpoint: ")
    assert "does not exist" in message and "steadytrain run" in message


def test_a_file_that_is_no_run_checkpoint_is_an_error_naming_the_key(tmp_path):
    junk = tmp_path / "checkpoint.pt"
    torch.save({"weights": torch.zeros(2)}, junk)
    message = config_error(student(junk))
    assert message.startswith("teacher.checkpoint: ") and "not a steadytrain run" in message


@pytest.mark.parametrize(("change", "expected"), [
    ({"model": {"width": 32, "heads": 2}}, "width = 16 there, 32 here"),
    ({"model": {"layers": 3}}, "layers = 2 there, 3 here"),
    ({"data": {"seq_len": 8}}, "data.seq_len = 16 there, 8 here"),
])
def test_a_teacher_of_another_architecture_is_an_error_naming_the_key(teacher_run, change,
                                                                      expected):
    config = student(teacher_run, model=change.get("model"))
    config["data"].update(change.get("data", {}))
    message = config_error(config)
    assert message.startswith("teacher.checkpoint: ")
    assert "another architecture" in message and expected in message


def test_a_teacher_of_another_model_is_an_error_naming_the_key(tmp_path):
    out = tmp_path / "memory"
    train(experiment(tiny(steps=2, model={"name": "memory_lm", "stm": 8, "ltm": 8,
                                          "writes": 4})), out)
    message = config_error(student(out))
    assert message.startswith("teacher.checkpoint: ") and "'memory_lm' model" in message


def test_the_teacher_table_belongs_to_students_only(teacher_run):
    without = student(teacher_run)
    del without["teacher"]
    assert config_error(without).startswith("teacher: the gpt_student model learns from")
    plain = tiny(model=ARCHITECTURE)
    plain["teacher"] = {"checkpoint": str(teacher_run)}
    assert config_error(plain).startswith("teacher: the gpt model does not learn")


@pytest.mark.parametrize(("table", "message"), [
    ({"checkpoint": "x", "task_weight": -1}, "teacher.task_weight: "),
    ({"task_weight": 0.5}, "teacher.checkpoint: missing required option"),
    ({"checkpoint": "x", "weight": 1}, "teacher: unknown key 'weight'"),
])
def test_bad_teacher_tables_name_the_key(table, message):
    config = tiny(model={"name": "gpt_student", **ARCHITECTURE})
    config["teacher"] = table
    with pytest.raises(steadytrain.ConfigError, match=message):
        experiment(config)


# -- the task: the outputs the plugins read, the evaluation --------------------------------


def test_the_task_passes_both_models_states_and_logits(teacher_run):
    task = build_task(experiment(student(teacher_run)), torch.device("cpu"))
    torch.manual_seed(0)
    model = task.build_model()
    inputs, targets = task.batch(0)
    loss, outputs = task.loss(model, inputs, targets)
    states = model.block_states(inputs)
    for mine, reference in zip(outputs["hidden_states"], states, strict=True):
        torch.testing.assert_close(mine, reference)
    for mine, reference in zip(outputs["teacher_hidden_states"],
                               task.teacher.block_states(inputs), strict=True):
        torch.testing.assert_close(mine, reference)
        assert not mine.requires_grad
    torch.testing.assert_close(outputs["teacher_logits"], task.teacher(inputs))
    torch.testing.assert_close(loss, F.cross_entropy(model(inputs).flatten(0, 1),
                                                     targets.flatten()))


def test_the_evaluation_measures_the_student_against_the_teacher(teacher_run):
    task = build_task(experiment(student(teacher_run)), torch.device("cpu"))
    torch.manual_seed(0)
    model = task.build_model().eval()
    measures = task.evaluate(model)
    ids, targets = task.val[:, :-1], task.val[:, 1:]
    with torch.no_grad():
        logits, reference = model(ids), task.teacher(ids)
        states, teacher_states = model.block_states(ids), task.teacher.block_states(ids)
    ce = F.cross_entropy(logits.flatten(0, 1), targets.flatten()).item()
    teacher_ce = F.cross_entropy(reference.flatten(0, 1), targets.flatten()).item()
    assert measures["loss"] == pytest.approx(ce, rel=1e-5)
    assert measures["teacher_loss"] == pytest.approx(teacher_ce, rel=1e-5)
    assert measures["perplexity_ratio"] == pytest.approx(math.exp(ce - teacher_ce), rel=1e-5)
    kl = F.kl_div(F.log_softmax(logits, -1), F.log_softmax(reference, -1), log_target=True,
                  reduction="none").sum(-1).mean().item()
    assert measures["kl"] == pytest.approx(kl, rel=1e-4)
    assert measures["mse/0"] == 0.0  # block 0 is the teacher's
    assert measures["mse/1"] == pytest.approx(F.mse_loss(states[1], teacher_states[1]).item(),
                                              rel=1e-5)
    assert measures["mse/1"] > 0


def test_taps_on_a_bound_teacher_align_as_the_outputs_do(teacher_run, tmp_path):
    tapped = {**ALIGN, "student_taps": ["blocks.#"], "teacher_taps": ["blocks.#"]}
    runs = {}
    for name, plugin in (("outputs", ALIGN), ("taps", tapped)):
        train(experiment(student(teacher_run, plugins=[plugin])), tmp_path / name)
        runs[name] = metrics_lines(tmp_path / name)
    for mine, reference in zip(runs["taps"], runs["outputs"], strict=True):
        assert mine["pipeline"]["loss/total"] == pytest.approx(
            reference["pipeline"]["loss/total"], rel=1e-5)
    # the taps name the layers by module
    assert "hidden_alignment/mse/blocks.1" in runs["taps"][-1]["pipeline"]


def test_task_weight_weighs_the_cross_entropy_in_the_objective(teacher_run, tmp_path):
    config = student(teacher_run, plugins=[ALIGN], teacher_table={"task_weight": 0.5})
    train(experiment(config), tmp_path / "run")
    for line in metrics_lines(tmp_path / "run"):
        metrics = line["pipeline"]
        assert metrics["loss/task"] == pytest.approx(0.5 * sum(line["loss"]) / len(line["loss"]),
                                                     rel=1e-5)
        assert metrics["loss/total"] == pytest.approx(
            metrics["loss/task"] + metrics["reg_weighted/hidden_alignment/alignment"], rel=1e-5)


# -- a run, end to end ---------------------------------------------------------------------


def test_a_distillation_run_records_layers_ratio_and_learnt_weights(teacher_run, tmp_path):
    plugin = {**ALIGN, "weighting": "uncertainty", "layers": ["0", "1"]}
    config = write(tmp_path / "student.json",
                   student(teacher_run, plugins=[plugin], pipeline_lr=0.05))
    done = steadytrain_command("run", config, "--out", "run", "--quiet", "--threads", "1",
                               cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    extras = summary["extras"]
    assert set(extras) == {"teacher_loss", "perplexity_ratio", "kl", "mse/0", "mse/1"}
    assert extras["perplexity_ratio"] == pytest.approx(
        math.exp(summary["final_loss"] - extras["teacher_loss"]))
    lines = metrics_lines(tmp_path / "run")
    weights = [line["pipeline"]["hidden_alignment/weight/1"] for line in lines]
    assert summary["final_metrics"] == lines[-1]["pipeline"]
    # the learnt weights are in the optimizer: they moved from exp(-0) = 1
    assert weights[-1] != 1.0
    saved = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)
    group = saved["optimizer"]["param_groups"][-1]
    assert (group["name"], group["weight_decay"], group["base_lr"]) == ("pipeline", 0.0, 0.05)
    assert len(group["params"]) == 1
    assert saved["optimizer"]["param_groups"][0]["base_lr"] == 0.01
    assert all(line["pipeline"]["loss/task"] == 0.0 for line in lines)


def test_pipeline_lr_is_left_out_of_the_run_identity_when_unset():
    assert "pipeline_lr" not in experiment(tiny()).to_dict()["train"]
    assert experiment(tiny(pipeline_lr=0.1)).to_dict()["train"]["pipeline_lr"] == 0.1
    with pytest.raises(steadytrain.ConfigError, match=r"train\.pipeline_lr: must be a positive"):
        experiment(tiny(pipeline_lr=0))
