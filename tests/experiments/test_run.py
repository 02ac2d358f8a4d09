"""``steadytrain run`` end to end: outputs, refusals, bad input; Ctrl-C and SIGKILL for real."""

import json
import math
import random
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from experiment_helpers import final_weights, metrics_lines, start, tiny, write

from steadytrain import CheckpointError
from steadytrain.experiments.checkpoint import load_checkpoint, save_atomic

MEMORY_RECIPE = {
    "model": {"name": "memory_lm", "layers": 1, "width": 16, "heads": 2, "stm": 16, "ltm": 16,
              "writes": 8, "gate": "stabilized", "sparsity": "soft_topk",
              "target_sparsity": 0.15, "consolidation": "random", "consolidation_rate": 0.2},
    "plugins": [{"plugin": "guard"}, {"plugin": "gate_entropy", "weight": 0.05, "target": 1.0},
                {"plugin": "grad_clip", "max_norm": 1.0}, {"plugin": "ema", "decay": 0.9},
                {"plugin": "scheduled_consolidation", "interval": 7}],
}


def documented_run_files():
    """The files of the run-directory table of docs/experiments.md."""
    text = (Path(__file__).resolve().parents[2] / "docs" / "experiments.md").read_text()
    table = text.split("## `steadytrain run CONFIG`")[1].split("\n\n")[2]
    return sorted(re.findall(r"^\| `([\w.]+)` \|", table, flags=re.MULTILINE))


def wait_for_lines(run, count, process, timeout=120):
    """Wait until the run has written *count* metrics lines (or stopped)."""
    deadline = time.monotonic() + timeout
    while len(metrics_lines(run)) < count:
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, "the run did not log in time"
        time.sleep(0.02)


def test_run_writes_metrics_a_checkpoint_a_summary_and_events(tmp_path, cli):
    config = write(tmp_path / "tiny.json", tiny(steps=20, plugins=[{"plugin": "z_loss"}]))
    code, out, err = cli("run", config, "--out", "run")
    assert code == 0, err
    run = tmp_path / "run"
    lines = metrics_lines(run)
    assert [line["step"] for line in lines] == [5, 10, 15, 20]
    for line in lines:
        for name in ("loss", "grad_norm", "logit_max", "attention_logit_max", "skipped"):
            assert len(line[name]) == 5, name
        assert "reg/z_loss/z" in line["pipeline"] and "z_loss/log_z" in line["pipeline"]
    assert lines[0]["lr"] > lines[-1]["lr"]  # warmup to 0.01, then cosine decay
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "finished" and summary["steps_done"] == 20
    assert summary["final_loss"] < summary["initial_loss"]
    assert summary["initial_loss"] == pytest.approx(math.log(256), abs=0.1)
    assert summary["max_attention_logit"] == max(x for line in lines
                                                 for x in line["attention_logit_max"])
    assert load_checkpoint(run / "checkpoint.pt")["finished"] is True
    events = [json.loads(e)["event"] for e in (run / "events.jsonl").read_text().splitlines()]
    assert {"run.started", "pipeline.assembled", "checkpoint.saved", "run.ended"} <= set(events)
    assert sorted(p.name for p in run.iterdir()) == documented_run_files()
    assert "run: finished after 20 steps; final validation loss" in out
    assert "run.started" in err  # events are shown unless --quiet
    code, out, err = cli("run", config, "--out", "quiet", "--quiet")
    assert code == 0 and err == "" and out.count("\n") == 1


def test_an_existing_output_directory_is_refused_unless_overwrite(tmp_path, cli):
    config = write(tmp_path / "tiny.json", tiny(steps=5))
    assert cli("run", config, "--out", "run", "--quiet")[0] == 0
    code, _, err = cli("run", config, "--out", "run", "--quiet")
    assert code == 1 and "run: the output directory exists; pass --overwrite" in err
    assert cli("run", config, "--out", "run", "--overwrite", "--quiet")[0] == 0
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    code, _, err = cli("run", config, "--out", "mine", "--overwrite")
    assert code == 1 and "this is not one, so nothing was deleted" in err
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"
    code, _, err = cli("run", config, "--out", "fresh", "--resume")
    assert code == 1 and "nothing to resume" in err


def test_resuming_a_finished_run_reports_it_and_another_config_is_refused(tmp_path, cli):
    config = write(tmp_path / "tiny.json", tiny(steps=10))
    assert cli("run", config, "--out", "run", "--quiet")[0] == 0
    weights = final_weights(tmp_path / "run")
    code, out, _ = cli("run", config, "--out", "run", "--resume", "--quiet")
    assert code == 0 and "finished after 10 steps" in out
    assert all(torch.equal(weights[k], v) for k, v in final_weights(tmp_path / "run").items())
    code, _, err = cli("run", config, "--out", "run", "--resume", "--lr", "0.02")
    assert code == 1 and "the config differs from the checkpoint's" in err
    assert "train.lr: 0.01 in the checkpoint, 0.02 now" in err


@pytest.mark.parametrize("recipe", [{}, MEMORY_RECIPE], ids=["gpt", "memory_lm_recipe"])
def test_ctrl_c_leaves_a_resumable_run_that_reaches_the_same_weights(tmp_path, cli, recipe):
    config = tiny(steps=300)
    config["model"] = recipe.get("model", config["model"])
    config["plugins"] = recipe.get("plugins", [])
    path = write(tmp_path / "run.json", config)
    assert cli("run", path, "--out", "straight", "--threads", 1, "--quiet")[0] == 0
    process = start("run", path, "--out", "cut", "--threads", 1, cwd=tmp_path)
    wait_for_lines(tmp_path / "cut", 3, process)
    process.send_signal(signal.SIGINT)
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == 130, stderr
    assert "resume with: steadytrain run" in stdout and "run.interrupted" in stderr
    cut = tmp_path / "cut"
    lines = metrics_lines(cut)
    state = load_checkpoint(cut / "checkpoint.pt")
    assert state["step"] == lines[-1]["step"] < 300
    assert json.loads((cut / "summary.json").read_text())["status"] == "interrupted"
    assert cli("run", path, "--out", "cut", "--resume", "--threads", 1, "--quiet")[0] == 0
    straight, ours = final_weights(tmp_path / "straight"), final_weights(cut)
    assert straight.keys() == ours.keys()
    for name in straight:
        assert torch.equal(straight[name], ours[name]), name
    steps = [line["step"] for line in metrics_lines(cut)]
    assert steps == sorted(set(steps)) and steps[-1] == 300


def test_sigterm_stops_like_ctrl_c(tmp_path):
    path = write(tmp_path / "run.json", tiny(steps=3000))
    process = start("run", path, "--out", "cut", "--threads", 1, cwd=tmp_path)
    wait_for_lines(tmp_path / "cut", 2, process)
    process.terminate()
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == 130, stderr
    assert "resume with: steadytrain run" in stdout and "signal=SIGTERM" in stderr
    state = load_checkpoint(tmp_path / "cut" / "checkpoint.pt")
    assert state["step"] == metrics_lines(tmp_path / "cut")[-1]["step"] < 3000


#: A model of one's own whose training forward pass number ``stall`` touches ``in_step``
#: and sleeps: a step that a first Ctrl-C cannot end soon.
STALLING_MODEL = textwrap.dedent("""
    import time
    from pathlib import Path

    import torch


    class Stalling(torch.nn.Module):
        def __init__(self, vocab_size, stall):
            super().__init__()
            self.embed = torch.nn.Embedding(vocab_size, 8)
            self.head = torch.nn.Linear(8, vocab_size)
            self.stall, self.calls = stall, 0

        def forward(self, ids):
            self.calls += self.training
            if self.calls == self.stall:
                Path("in_step").touch()
                time.sleep(120)
            return self.head(self.embed(ids))


    def make(vocab_size, stall=0):
        return Stalling(vocab_size, stall)
""")


@pytest.mark.parametrize(("stall", "kept"), [
    (13, "the checkpoint of step 10 is kept; resume with: steadytrain run {path} --out cut "
         "--resume"),
    (3, "no checkpoint was written yet; start again with --overwrite"),
], ids=["after_a_checkpoint", "before_any"])
def test_a_second_ctrl_c_stops_at_once_and_keeps_the_last_checkpoint(tmp_path, stall, kept):
    (tmp_path / "stalling.py").write_text(STALLING_MODEL)
    config = tiny(steps=20, log_every=5, checkpoint_every=5)
    config["model"] = {"name": "stalling:make", "stall": stall}
    path = write(tmp_path / "run.json", config)
    process = start("run", path, "--out", "cut", "--threads", 1, "--quiet", cwd=tmp_path)
    deadline = time.monotonic() + 120
    while not (tmp_path / "in_step").exists():
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, "the run did not reach the stalling step"
        time.sleep(0.02)
    process.send_signal(signal.SIGINT)  # asks for a stop after this step, which stalls
    time.sleep(0.5)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=20)
    assert process.returncode == 130, stderr
    assert stderr == f"cut: stopped at once (Ctrl-C): {kept.format(path=path)}\n"
    checkpoint = tmp_path / "cut" / "checkpoint.pt"
    assert (load_checkpoint(checkpoint)["step"] if checkpoint.exists() else None) == (
        10 if stall > 10 else None)


def test_sigkill_at_any_moment_leaves_a_loadable_checkpoint_and_resume_is_exact(tmp_path, cli):
    path = write(tmp_path / "run.json", tiny(steps=300, log_every=2, checkpoint_every=2))
    assert cli("run", path, "--out", "straight", "--threads", 1, "--quiet")[0] == 0
    gen = random.Random(0)
    flags: list = []
    for _kill in range(2):
        process = start("run", path, "--out", "killed", "--threads", 1, "--quiet", *flags,
                        cwd=tmp_path)
        before = len(metrics_lines(tmp_path / "killed")) if flags else 0
        wait_for_lines(tmp_path / "killed", before + 2, process)
        time.sleep(gen.uniform(0.0, 0.05))  # anywhere in a step, a checkpoint write included
        process.kill()
        process.communicate()
        load_checkpoint(tmp_path / "killed" / "checkpoint.pt")  # never torn
        flags = ["--resume"]
    assert cli("run", path, "--out", "killed", "--resume", "--threads", 1, "--quiet")[0] == 0
    straight, ours = final_weights(tmp_path / "straight"), final_weights(tmp_path / "killed")
    for name in straight:
        assert torch.equal(straight[name], ours[name]), name


#: ``python -c TORN MARKER ARGS``: ``steadytrain ARGS`` that stops inside its second
#: checkpoint write, with half of the new checkpoint in the temporary file, touches MARKER
#: and waits to be killed.
TORN = textwrap.dedent("""
    import sys
    import time
    from pathlib import Path

    from steadytrain.cli import main
    from steadytrain.experiments import checkpoint

    write_whole, writes = checkpoint._replace, []

    def torn(path, write):
        writes.extend([path] if path.name == "checkpoint.pt" else [])
        if path.name != "checkpoint.pt" or len(writes) < 2:
            return write_whole(path, write)

        def half(handle):
            write(handle)
            handle.truncate(handle.tell() // 2)
            handle.flush()
            Path(sys.argv[1]).touch()
            time.sleep(600)

        return write_whole(path, half)

    checkpoint._replace = torn
    sys.exit(main(sys.argv[2:]))
""")


def test_sigkill_during_a_checkpoint_write_leaves_the_previous_one_and_resume_is_exact(
        tmp_path, cli):
    path = write(tmp_path / "run.json", tiny(steps=30, log_every=5, checkpoint_every=10))
    assert cli("run", path, "--out", "straight", "--threads", 1, "--quiet")[0] == 0
    marker, killed = tmp_path / "in_the_write", tmp_path / "killed"
    process = subprocess.Popen(
        [sys.executable, "-c", TORN, marker, "run", path, "--out", killed, "--threads", "1",
         "--quiet"], cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not marker.exists():
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, "the run did not reach its second checkpoint"
        time.sleep(0.02)
    process.kill()
    process.communicate()
    assert load_checkpoint(killed / "checkpoint.pt")["step"] == 10  # the previous one, whole
    with pytest.raises(CheckpointError, match="not a readable checkpoint"):
        load_checkpoint(killed / ".checkpoint.pt.tmp")  # the write it was killed in
    assert [line["step"] for line in metrics_lines(killed)] == [5, 10, 15, 20]
    assert cli("run", path, "--out", killed, "--resume", "--threads", 1, "--quiet")[0] == 0
    straight, ours = final_weights(tmp_path / "straight"), final_weights(killed)
    for name in straight:
        assert torch.equal(straight[name], ours[name]), name
    assert [line["step"] for line in metrics_lines(killed)] == [5, 10, 15, 20, 25, 30]


def test_a_checkpoint_write_that_fails_midway_leaves_the_previous_one(tmp_path):
    path = tmp_path / "checkpoint.pt"
    save_atomic({"format": 1, "weights": torch.arange(4.0)}, path)
    with pytest.raises(Exception, match="lambda"):  # pickling fails after writing has begun
        save_atomic({"format": 1, "weights": torch.zeros(1000), "bad": lambda: 0}, path)
    assert torch.equal(load_checkpoint(path)["weights"], torch.arange(4.0))


@pytest.mark.parametrize(
    ("config", "args", "message"),
    [
        (None, [], "missing.toml: no such config file"),
        ("[train\n", [], "bad.toml: not valid TOML"),
        ('[model]\nname = "gtp"\n', [], "model.name: unknown model 'gtp' (did you mean 'gpt'?)"),
        ('[data]\nsource = "pydocs"\n', [],
         "data.source: 'pydocs' is neither built-in data (pydoc, simulation)"),
        ('[data]\nsource = "no/such/dir"\n', [], "nor an existing file or directory"),
        ("", ["--model", "no_such_module:make"], "model.name: cannot import 'no_such_module'"),
        ("", ["--lr", "-1"], "train.lr: must be a positive number, got -1"),
    ],
)
def test_bad_input_is_a_clear_error(tmp_path, cli, config, args, message):
    path = tmp_path / ("missing.toml" if config is None else "bad.toml")
    if config is not None:
        path.write_text(config)
    code, _, err = cli("run", path, "--out", "run", *args)
    assert code == 1 and err.startswith("error: ") and message in err


def test_a_model_of_ones_own_by_module_and_callable(tmp_path, cli):
    (tmp_path / "my_byte_model.py").write_text(
        "import torch\n\n"
        "def make(vocab_size, width=8):\n"
        "    return torch.nn.Sequential(torch.nn.Embedding(vocab_size, width),\n"
        "                               torch.nn.Linear(width, vocab_size))\n"
        "def wrong():\n    return 3\n"
    )
    config = tiny(steps=5)
    config["model"] = {"width": 12}
    path = write(tmp_path / "mine.json", config)
    code, _, err = cli("run", path, "--model", "my_byte_model:make", "--out", "run", "--quiet")
    assert code == 0, err
    assert final_weights(tmp_path / "run")["0.weight"].shape == (256, 12)
    code, _, err = cli("run", path, "--model", "my_byte_model:wrong", "--out", "w")
    assert code == 1 and "model: calling my_byte_model:wrong(width) failed" in err
    code, _, err = cli("run", path, "--model", "my_byte_model:absent", "--out", "a")
    assert code == 1 and "module 'my_byte_model' has no 'absent'" in err
