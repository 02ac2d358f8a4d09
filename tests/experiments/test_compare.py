"""``steadytrain compare`` and ``demo`` end to end on tiny budgets, with real run processes."""

import json
import math
import re
import signal
import time
from pathlib import Path

import torch
from experiment_helpers import metrics_lines, start, tiny, write

from steadytrain.experiments import demo, measures
from steadytrain.experiments.compare import lr_sweep


def summaries(out, label):
    found = {}
    for path in (out / label).glob("lr_*/seed_*/summary.json"):
        summary = json.loads(path.read_text())
        found[(summary["lr"], summary["seed"])] = summary
    return found


def test_compare_runs_every_config_lr_and_seed_and_writes_the_table_and_plot(tmp_path, cli):
    base = write(tmp_path / "base.json", tiny(steps=10))
    stab = write(tmp_path / "stab.json", tiny(steps=10, plugins=[{"plugin": "z_loss"}],
                                              model={"qk_layernorm": True}))
    args = ("compare", base, stab, "--lr-sweep", "1e-3", "1e-1", "2", "--seeds", "0", "1",
            "--out", "cmp", "--jobs", "2", "--quiet")
    code, out, err = cli(*args)
    assert code == 0, err
    cmp = tmp_path / "cmp"
    assert (cmp / "comparison.png").stat().st_size > 10_000
    assert "plot: cmp/comparison.png" in out and "table: cmp/results.md" in out
    table = (cmp / "results.md").read_text()
    for label in ("base", "stab"):
        runs = summaries(cmp, label)
        assert sorted(runs) == [(0.001, 0), (0.001, 1), (0.1, 0), (0.1, 1)]
        sensitivity = [measures.lr_sensitivity(
            {lr: runs[(lr, seed)]["final_loss"] for lr in (0.001, 0.1)},
            runs[(0.001, seed)]["initial_loss"]) for seed in (0, 1)]
        mean, spread = measures.mean_and_spread(sensitivity)
        row = next(line for line in table.splitlines() if line.startswith(f"| {label} |"))
        assert row.split("|")[2].strip() == "2/2"
        assert row.split("|")[3].strip() == f"{mean:.4g} ± {spread:.2g}"
        assert label in out  # the terminal table
    assert re.search(r"Runs on: \S+ \d+ cores, 1 thread\(s\), torch ", table)
    recorded = json.loads((cmp / "stab" / "lr_0.1" / "seed_1" / "metadata.json").read_text())
    assert recorded["config"]["train"]["lr"] == 0.1 and recorded["config"]["train"]["seed"] == 1
    assert [p["plugin"] for p in recorded["plugins"]] == ["z_loss"]
    # The same command again is refused; with --resume the finished runs are reused.
    code, _, err = cli(*args)
    assert code == 1 and "cmp: the output directory exists" in err
    stamps = {p: p.stat().st_mtime_ns for p in cmp.glob("*/lr_*/seed_*/summary.json")}
    code, out, _ = cli(*args, "--resume")
    assert code == 0 and (cmp / "results.md").read_text() == table
    assert stamps == {p: p.stat().st_mtime_ns for p in cmp.glob("*/lr_*/seed_*/summary.json")}
    # --report tabulates the ended runs again without running anything ...
    code, _, err = cli(*args, "--report")
    assert code == 0, err
    assert (cmp / "results.md").read_text() == table
    # ... and refuses options other than those the runs ended with, naming the difference.
    other = [{"plugin": "z_loss", "coefficient": 1e-3}]
    write(tmp_path / "stab.json", tiny(steps=10, plugins=other, model={"qk_layernorm": True}))
    code, _, err = cli(*args, "--report")
    assert code == 1 and "this run ended with another config" in err
    assert "plugins" in err and "pass --report the configs and options" in err
    assert (cmp / "results.md").read_text() == table


def test_ablate_adds_a_row_per_plugin_of_the_last_config(tmp_path, cli):
    base = write(tmp_path / "base.json", tiny(steps=5))
    stab = write(tmp_path / "stab.json", tiny(steps=5, plugins=[
        {"plugin": "z_loss"}, {"plugin": "grad_clip", "id": "clip", "max_norm": 1.0}]))
    code, _, err = cli("compare", base, stab, "--ablate", "--out", "abl", "--no-plot",
                         "--quiet")
    assert code == 0, err
    rows = [line.split("|")[1].strip() for line in
            (tmp_path / "abl" / "results.md").read_text().splitlines()[2:6]]
    assert rows == ["base", "stab", "stab-no_z_loss", "stab-no_clip"]
    config = json.loads((tmp_path / "abl" / "stab-no_clip" / "lr_0.01" / "seed_0" /
                         "config.json").read_text())["config"]
    assert config["disable"] == ["clip"]
    lines = metrics_lines(tmp_path / "abl" / "stab-no_clip" / "lr_0.01" / "seed_0")
    assert "reg/z_loss/z" in lines[-1]["pipeline"]
    assert not any(k.startswith("clip/") for k in lines[-1]["pipeline"])


def test_lr_sweeps_are_log_spaced_and_bad_ones_are_refused(tmp_path, cli):
    assert lr_sweep(3e-4, 0.3, 7) == [3e-4, 0.0009487, 0.003, 0.009487, 0.03, 0.09487, 0.3]
    config = write(tmp_path / "a.json", tiny(steps=5))
    for sweep, message in (
        (("0.1", "0.01", "3"), "--lr-sweep: LO must be below HI, got LO=0.1 >= HI=0.01"),
        (("0.1", "0.1", "3"), "--lr-sweep: LO must be below HI"),
        (("0.001", "0.1", "1"), "--lr-sweep: N must be at least 2, got 1"),
        (("0.001", "0.1", "x"), "--lr-sweep: N must be an integer, got 'x'"),
        (("-1", "0.1", "3"), "--lr-sweep: LO and HI must be positive numbers"),
    ):
        code, _, err = cli("compare", config, "--lr-sweep", *sweep, "--out", "x")
        assert code == 1 and message in err, err
    assert not (tmp_path / "x").exists()


def test_configs_that_cannot_be_compared_are_refused(tmp_path, cli):
    a = write(tmp_path / "a.json", tiny(steps=5))
    b = write(tmp_path / "b.json", tiny(steps=6))
    code, _, err = cli("compare", a, b, "--out", "x")
    assert code == 1 and "differ in train.steps (6 and 5)" in err
    (tmp_path / "other").mkdir()
    c = write(tmp_path / "other" / "a.json", tiny(steps=5, data={"seq_len": 8}))
    code, _, err = cli("compare", a, c, "--out", "x")
    assert code == 1 and "differ in data" in err
    code, _, err = cli("compare", a, tmp_path / "missing.toml", "--out", "x")
    assert code == 1 and "missing.toml: no such config file" in err


def test_resuming_with_another_config_is_refused_before_anything_runs(tmp_path, cli):
    config = write(tmp_path / "a.json", tiny(steps=5))
    assert cli("compare", config, "--out", "cmp", "--no-plot", "--quiet")[0] == 0
    summary = tmp_path / "cmp" / "a" / "lr_0.01" / "seed_0" / "summary.json"
    stamp = summary.stat().st_mtime_ns
    write(tmp_path / "a.json", tiny(steps=5, model={"qk_layernorm": True}))
    code, _, err = cli("compare", config, "--out", "cmp", "--no-plot", "--quiet", "--resume")
    assert code == 1, err
    assert "cmp/a/lr_0.01/seed_0: this run started with another config (model.qk_layernorm: " \
        "False in the run, True in this command)" in err
    assert "start anew in another --out" in err and summary.stat().st_mtime_ns == stamp


def test_ctrl_c_stops_every_run_at_a_resumable_point(tmp_path, cli):
    config = write(tmp_path / "a.json", tiny(steps=3000, log_every=10, checkpoint_every=10))
    process = start("compare", config, "--seeds", "0", "1", "--jobs", "2", "--out", "cmp",
                    "--no-plot", cwd=tmp_path)
    runs = [tmp_path / "cmp" / "a" / "lr_0.01" / f"seed_{s}" for s in (0, 1)]
    deadline = time.monotonic() + 180
    while not all(len(metrics_lines(r)) >= 2 for r in runs):
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline
        time.sleep(0.05)
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 130, err
    assert "interrupted: 2 run(s) did not end; they are resumable" in err
    for run in runs:
        state = torch.load(run / "checkpoint.pt", weights_only=True)
        assert state["step"] == metrics_lines(run)[-1]["step"] < 3000
        assert json.loads((run / "summary.json").read_text())["status"] == "interrupted"


def test_demo_prints_the_table_and_the_plot_path(tmp_path, cli, monkeypatch):
    small = {name: tiny(steps=8, model=config["model"] | {"layers": 1, "width": 16,
                                                         "heads": 2},
                        plugins=config["plugins"])
             for name, config in demo.CONFIGS.items()}
    monkeypatch.setattr(demo, "CONFIGS", small)
    monkeypatch.setattr(demo, "QUICK", {"lrs": [1e-3, 1e-1], "seeds": [0]})
    code, out, err = cli("demo", "--quiet")
    assert code == 0, err
    assert "baseline against qk-layernorm + z-loss" in out
    assert "plot: steadytrain-demo/comparison.png" in out
    assert (tmp_path / "steadytrain-demo" / "comparison.png").exists()
    reading = out.strip().splitlines()[-1]
    assert reading.startswith("Here qk-layernorm + z-loss ") and "LR sensitivity" in reading
    again = cli("demo", "--quiet")  # a second demo reuses the finished runs
    assert again[0] == 0 and again[1] == out
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "file").write_text("x")
    code, _, err = cli("demo", "--out", "mine")
    assert code == 1 and "mine: exists and is not a demo directory" in err
    assert math.isfinite(json.loads(next((tmp_path / "steadytrain-demo").glob(
        "baseline/lr_*/seed_0/summary.json")).read_text())["final_loss"])


def test_the_readmes_first_command_is_the_demo():
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    first = re.findall(r"```bash\n(.*?)```", readme, flags=re.DOTALL)[0].splitlines()[0]
    assert first.split("#")[0].strip().endswith("&& steadytrain demo")
    assert "'.[plots]'" in first  # the figure needs matplotlib
