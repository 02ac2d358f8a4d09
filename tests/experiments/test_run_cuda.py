"""``steadytrain run --device cuda`` on a tiny budget, and ``--resume`` on CUDA reaching the
weights of a run never interrupted. Skipped without CUDA."""

import json

import pytest
import torch
from experiment_helpers import CtrlCAt, final_weights, metrics_lines, steadytrain, tiny, write

from steadytrain.experiments import load_experiment, train
from steadytrain.experiments.checkpoint import load_checkpoint
from steadytrain.experiments.models import model_options

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

#: The guard decides on the device; grad_clip and the EMA keep their state there.
PLUGINS = [{"plugin": "guard"}, {"plugin": "z_loss"}, {"plugin": "grad_clip", "max_norm": 1.0},
           {"plugin": "ema", "decay": 0.9}]


def test_a_run_on_cuda_trains_and_says_where_it_ran(tmp_path):
    path = write(tmp_path / "tiny.json", tiny(steps=20, plugins=PLUGINS))
    done = steadytrain("run", path, "--out", "run", "--device", "cuda", "--quiet", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    run = tmp_path / "run"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "finished" and summary["steps_done"] == 20
    assert summary["final_loss"] < summary["initial_loss"]
    assert torch.cuda.get_device_name() in summary["machine"]
    state = load_checkpoint(run / "checkpoint.pt")
    assert state["cuda_rng"].dtype == torch.uint8 and state["finished"] is True
    assert json.loads((run / "metadata.json").read_text())["config"]["train"]["device"] == "cuda"
    line = metrics_lines(run)[-1]
    assert "reg/z_loss/z" in line["pipeline"] and "guard/skipped" in line["pipeline"]
    assert line["pipeline"]["grad_clip/default/post_norm"] <= 1.0 + 1e-4  # max_norm holds
    assert len(line["loss"]) == 5 and all(x == x for x in line["loss"])


def test_resume_on_cuda_reaches_the_weights_of_a_run_never_interrupted(tmp_path):
    path = write(tmp_path / "tiny.json", tiny(steps=60, plugins=PLUGINS, device="cuda"))
    done = steadytrain("run", path, "--out", "straight", "--quiet", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    cut = tmp_path / "cut"
    config = load_experiment(path, model_options=model_options)
    threads = torch.get_num_threads()
    try:
        assert train(config, cut, progress=CtrlCAt(25, 60))["status"] == "interrupted"
    finally:
        torch.set_num_threads(threads)
    assert load_checkpoint(cut / "checkpoint.pt")["step"] == 25
    done = steadytrain("run", path, "--out", cut, "--resume", "--quiet", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    straight, ours = final_weights(tmp_path / "straight"), final_weights(cut)
    assert straight.keys() == ours.keys()
    for name in straight:
        assert ours[name].is_cuda, name
        difference = (straight[name] - ours[name]).abs().max().item()
        assert torch.equal(straight[name], ours[name]), f"{name}: differs by up to {difference}"
