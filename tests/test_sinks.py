"""Metric sinks and run metadata: what a run writes is what it measured, read back from disk,
and the metadata is enough to rebuild the config."""

import csv
import json
import math
import sys

import pytest
import torch
import torch.nn.functional as F
from distributions import install
from expect import raises

import steadytrain
from steadytrain import ConfigError, Pipeline, Registry, load_config, structure_config
from steadytrain.sinks import CsvSink, JsonLinesSink, MetricLogger, TensorBoardSink, run_metadata

CONFIG = {"plugins": [{"plugin": "grad_norm", "id": "norm", "include": ["0.*"]}]}


def train(pipe, steps, logger=None):
    """Steps of a tiny classifier; returns, per step, the task loss and the norm of the
    gradients of ``0.*`` computed by hand."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    pipe.setup(model, optimizer, total_steps=steps)
    logger = logger(pipe) if logger else None
    expected = []
    for _ in range(steps):
        x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
        pipe.before_step(batch=x, targets=y)
        task = F.cross_entropy(model(x), y)
        pipe.compute_loss(task).backward()
        grads = [model[0].weight.grad, model[0].bias.grad]
        expected.append({"loss/task": task.item(),
                         "norm/norm": torch.cat([g.flatten() for g in grads]).norm().item()})
        steadytrain.step_optimizer(optimizer, pipe.after_backward())
        pipe.consolidate()
        optimizer.zero_grad()
        if logger:
            logger.after_step()
    return expected, logger


def window_means(expected, start, stop):
    return {k: sum(e[k] for e in expected[start:stop]) / (stop - start) for k in expected[0]}


def test_json_lines_hold_the_metadata_and_each_interval_s_means(tmp_path):
    path = tmp_path / "run" / "metrics.jsonl"
    pipe = Pipeline.from_config(CONFIG)
    expected, logger = train(pipe, 5, lambda p: MetricLogger(p, [JsonLinesSink(path)], every=2))
    logger.close()
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert lines[0] == {"metadata": json.loads(json.dumps(run_metadata(pipe)))}
    assert [line["step"] for line in lines[1:]] == [2, 4, 5]  # close() writes the last step
    for line, (start, stop) in zip(lines[1:], [(0, 2), (2, 4), (4, 5)], strict=True):
        means = window_means(expected, start, stop)
        for name, value in means.items():
            assert line["metrics"][name] == pytest.approx(value, rel=1e-5)


def test_metrics_stay_on_the_device_between_log_intervals():
    seen = []

    def logger(pipe):
        log = MetricLogger(pipe, [], every=3)
        original = log.after_step

        def after_step():
            window_start = pipe.run.metrics.first_step  # reset only when metrics are read
            seen.append((pipe.run.step, window_start, original()))

        log.after_step = after_step
        return log

    train(Pipeline.from_config(CONFIG), 4, logger)
    assert [(step, start) for step, start, _ in seen] == [(1, 0), (2, 0), (3, 0), (4, 3)]
    assert [step for step, _, written in seen if written is not None] == [3]


def test_the_metadata_rebuilds_the_config_with_every_default(tmp_path):
    config_file = tmp_path / "run.toml"
    config_file.write_text('[[plugins]]\nplugin = "ema"\ndecay = 0.9\n')
    pipe = Pipeline.from_config(config_file)
    meta = run_metadata(pipe)
    assert structure_config(meta["config"]) == load_config(config_file)
    (ema,) = meta["config"]["plugins"]
    assert ema["warmup"] is steadytrain.plugins.ema.EMA.Config().warmup  # a default, written out
    assert meta["plugins"] == [{"id": "ema", "plugin": "ema",
                                "class": "steadytrain.plugins.ema:EMA",
                                "distribution": "steadytrain",
                                "version": steadytrain.__version__}]
    assert (meta["steadytrain"], meta["torch"]) == (steadytrain.__version__, torch.__version__)
    with_file = run_metadata(pipe, config=config_file)["config"]
    assert with_file == steadytrain.unstructure_config(load_config(config_file))


def test_the_metadata_names_a_third_party_distribution(tmp_path, monkeypatch):
    install(tmp_path, "acme-meta", "acme_meta", """
        import steadytrain

        class Nop(steadytrain.Plugin):
            name = "acme_nop"

            @steadytrain.hookimpl
            def before_step(self, ctx):
                pass
        """, {"acme_nop": "Nop"})
    monkeypatch.syspath_prepend(str(tmp_path))
    pipe = Pipeline.from_config({"plugins": [{"plugin": "acme_nop"}]},
                                registry=Registry.discover())
    (entry,) = run_metadata(pipe)["plugins"]
    assert (entry["distribution"], entry["version"], entry["class"]) == (
        "acme-meta", "1.0", "acme_meta:Nop")


def test_the_metadata_of_an_in_process_plugin_has_no_distribution(l2_outputs):
    pipe = Pipeline([l2_outputs(id="mine")])
    (entry,) = run_metadata(pipe)["plugins"]
    assert entry["id"] == "mine" and entry["distribution"] is None and entry["version"] is None


def test_csv_rows_are_long_format_with_the_metadata_beside_them(tmp_path):
    path = tmp_path / "metrics.csv"
    pipe = Pipeline.from_config(CONFIG)
    expected, logger = train(pipe, 4, lambda p: MetricLogger(p, [CsvSink(path)], every=2))
    logger.close()
    with path.open(newline="") as file:
        rows = list(csv.reader(file))
    assert rows[0] == ["step", "metric", "value"]
    values = {(int(s), m): float(v) for s, m, v in rows[1:]}
    for step, start in ((2, 0), (4, 2)):
        for name, value in window_means(expected, start, step).items():
            assert values[step, name] == pytest.approx(value, rel=1e-5)
    meta = json.loads((tmp_path / "metrics.metadata.json").read_text())
    assert meta["plugins"][0]["id"] == "norm"


def test_an_appending_csv_sink_keeps_one_header(tmp_path):
    path = tmp_path / "metrics.csv"
    for step in (1, 2):
        sink = CsvSink(path, append=True)
        sink.write(step, {"loss/task": 0.5, "loss/total": math.nan})
        sink.close()
    with path.open(newline="") as file:
        rows = list(csv.reader(file))
    assert rows[0] == ["step", "metric", "value"] and rows.count(rows[0]) == 1
    assert [r[:2] for r in rows[1:]] == [["1", "loss/task"], ["1", "loss/total"],
                                         ["2", "loss/task"], ["2", "loss/total"]]
    assert math.isnan(float(rows[2][2]))


def test_an_appending_json_lines_sink_adds_to_the_file(tmp_path):
    path = tmp_path / "m.jsonl"
    for step in (1, 2):
        sink = JsonLinesSink(path, append=step > 1)
        sink.write(step, {"loss/task": float(step)})
        sink.close()
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [1, 2]


def test_tensorboard_holds_the_scalars_and_the_metadata(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    pipe = Pipeline.from_config(CONFIG)
    expected, logger = train(pipe, 4,
                             lambda p: MetricLogger(p, [TensorBoardSink(tmp_path)], every=2))
    logger.close()
    events = EventAccumulator(str(tmp_path), size_guidance={"tensors": 0, "scalars": 0})
    events.Reload()
    loss = [(e.step, e.value) for e in events.Scalars("loss/task")]
    assert [s for s, _ in loss] == [2, 4]
    assert loss[0][1] == pytest.approx(window_means(expected, 0, 2)["loss/task"], rel=1e-5)
    (tag,) = [t for t in events.Tags()["tensors"] if t.startswith("steadytrain/run_metadata")]
    (text,) = events.Tensors(tag)
    assert '"id": "norm"' in text.tensor_proto.string_val[0].decode()


def test_tensorboard_without_the_package_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # as if not installed
    with raises(ConfigError, "TensorBoardSink needs the tensorboard package",
                "pip install tensorboard"):
        TensorBoardSink("runs")


@pytest.mark.parametrize("every", [0, -1, 1.5, True])
def test_a_log_interval_below_one_step_is_refused(every):
    with raises(ConfigError, "MetricLogger(every=...)", "integer >= 1", repr(every)):
        MetricLogger(Pipeline([]), [], every=every)
