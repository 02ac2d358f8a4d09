"""Tracing: with STEADYTRAIN_TRACE=1 (or ``steadytrain --trace``) every hook call is logged with
its instance, hook, step, micro-batch and duration, in the order the hooks ran."""

import logging

import pytest
import structlog
import torch
from structlog.testing import capture_logs

import steadytrain
from steadytrain import HookError, Pipeline, hookimpl
from steadytrain.cli import main
from steadytrain.trace import TRACE_ENV


class Counter(steadytrain.Plugin):
    """Implements a lifecycle hook, every step hook, and one without its argument."""

    name = "counter"

    @hookimpl
    def setup(self, run):
        self.calls = 0

    @hookimpl
    def before_step(self, ctx):
        self.calls += 1

    @hookimpl
    def compute_regularizers(self, ctx):
        return {"square": ctx.outputs["y"].square().mean()}

    @hookimpl
    def after_backward(self):  # takes no ctx: the trace passes nothing on either
        self.calls += 1

    @hookimpl
    def consolidate(self, ctx):
        self.calls += 1


@pytest.fixture
def events():
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.INFO))
    with capture_logs() as logs:
        yield logs


def calls(logs):
    return [(e["id"], e["hook"], e["step"], e["micro_batch"]) for e in logs
            if e["event"] == "hook.call"]


def run_step(pipe, micro_batches=2):
    model = torch.nn.Linear(2, 1)
    pipe.setup(model, None)
    for i in range(micro_batches):
        pipe.before_step(micro_batch=i, num_micro_batches=micro_batches)
        pipe.compute_loss(None, outputs={"y": model(torch.ones(3, 2))}).backward()
    pipe.after_backward()
    pipe.consolidate()
    pipe.close()


def test_every_hook_call_is_logged_in_the_order_it_ran(monkeypatch, events):
    monkeypatch.setenv(TRACE_ENV, "1")
    pipe = Pipeline([Counter(id="a"), Counter(id="b")])
    run_step(pipe)
    assert calls(events) == [
        ("a", "setup", 0, None), ("b", "setup", 0, None),
        ("a", "before_step", 0, 0), ("b", "before_step", 0, 0),
        ("a", "compute_regularizers", 0, 0), ("b", "compute_regularizers", 0, 0),
        ("a", "before_step", 0, 1), ("b", "before_step", 0, 1),
        ("a", "compute_regularizers", 0, 1), ("b", "compute_regularizers", 0, 1),
        ("a", "after_backward", 0, 1), ("b", "after_backward", 0, 1),
        ("a", "consolidate", 0, 1), ("b", "consolidate", 0, 1),
    ]
    traced = [e for e in events if e["event"] == "hook.call"]
    assert all(e["plugin"] == "counter" and e["ms"] >= 0 and "error" not in e for e in traced)
    assert pipe.plugins["a"].calls == 4  # the traced hooks still ran, with their arguments


def test_a_hook_that_raises_is_logged_with_its_error(monkeypatch, events):
    class Broken(Counter):
        name = "broken"

        @hookimpl
        def consolidate(self, ctx):
            raise ZeroDivisionError("boom")

    monkeypatch.setenv(TRACE_ENV, "1")
    with pytest.raises(HookError, match="raised ZeroDivisionError in consolidate"):
        run_step(Pipeline([Broken(id="z")]), micro_batches=1)
    (last,) = [e for e in events if e.get("hook") == "consolidate"]
    assert (last["id"], last["error"]) == ("z", "ZeroDivisionError")


@pytest.mark.parametrize("value", [None, "", "0"])
def test_without_the_switch_nothing_is_traced(monkeypatch, events, value):
    if value is None:
        monkeypatch.delenv(TRACE_ENV, raising=False)
    else:
        monkeypatch.setenv(TRACE_ENV, value)
    run_step(Pipeline([Counter(id="a")]))
    assert calls(events) == []


def test_the_switch_is_read_when_the_pipeline_is_built(monkeypatch, events):
    monkeypatch.delenv(TRACE_ENV, raising=False)
    pipe = Pipeline([Counter(id="a")])
    monkeypatch.setenv(TRACE_ENV, "1")
    run_step(pipe)
    assert calls(events) == []


def test_the_cli_flag_traces_the_hooks_a_check_runs(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv(TRACE_ENV, "0")  # restored after the test: main() sets it
    (tmp_path / "run.toml").write_text('[[plugins]]\nplugin = "grad_norm"\nid = "gn"\n')
    (tmp_path / "tiny_model.py").write_text(
        "import torch\n\ndef build():\n    return torch.nn.Linear(2, 2)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert main(["--trace", "check", str(tmp_path / "run.toml"),
                 "--model", "tiny_model:build"]) == 0
    err = capsys.readouterr().err
    assert "hook.call" in err and "id=gn" in err and "hook=setup" in err
