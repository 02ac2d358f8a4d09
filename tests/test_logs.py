"""Where steadytrain's events go: the host's structlog configuration if it has one, otherwise
the standard library's logging tree; never the host's standard output."""

import logging
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import structlog
import torch
from structlog.testing import capture_logs

import steadytrain

#: A host that configures nothing, takes a step, then configures logging and takes another.
HOST = textwrap.dedent("""
    import logging
    import sys

    from test_logs import one_step

    one_step()
    print("the host's own output", flush=True)
    logging.basicConfig(level=logging.INFO, stream=sys.stdout,
                        format="%(name)s|%(levelname)s|%(message)s")
    one_step()
""")


class Warner(steadytrain.Plugin):
    """Logs a warning at every step, as a third-party plugin would."""

    name = "acme_warner"
    uses_filter = False

    @steadytrain.hookimpl
    def before_step(self, ctx):
        steadytrain.get_logger().warning("acme.warned", id=self.id, step=ctx.step)


def one_step():
    """Build a pipeline with :class:`Warner` and start a step: one info, one warning."""
    registry = steadytrain.Registry()
    registry.register(Warner)
    pipe = steadytrain.Pipeline.from_config({"plugins": [{"plugin": "acme_warner"}]},
                                            registry=registry)
    model = torch.nn.Linear(2, 1)
    pipe.setup(model, torch.optim.SGD(model.parameters(), lr=0.1), total_steps=1)
    pipe.before_step(batch=torch.zeros(1, 2))


@pytest.fixture
def unconfigured():
    """structlog as a host that never configures it has it (the suite configures it)."""
    structlog.reset_defaults()
    assert not structlog.is_configured()


def test_a_host_that_configures_nothing_keeps_its_stdout_and_sees_warnings_on_stderr():
    """Then, once the host configures logging, every event is a record of its handlers."""
    done = subprocess.run([sys.executable, "-c", HOST], capture_output=True, text=True,
                          timeout=120, cwd=Path(__file__).parent)
    assert done.returncode == 0, done.stderr
    assert done.stderr == "acme.warned id='acme_warner' step=0\n"  # info stays below
    lines = done.stdout.splitlines()
    assert lines[0] == "the host's own output"
    assert lines[1].startswith("steadytrain|INFO|pipeline.assembled plugins=")
    assert lines[2:] == ["steadytrain|WARNING|acme.warned id='acme_warner' step=0"]


def test_records_carry_the_event_fields_and_follow_the_logger_level(unconfigured, caplog):
    caplog.set_level(logging.INFO, logger="steadytrain")
    one_step()
    records = [r for r in caplog.records if r.name == "steadytrain"]
    assert [(r.levelno, r.steadytrain["event"]) for r in records] == [
        (logging.INFO, "pipeline.assembled"), (logging.WARNING, "acme.warned")]
    assert records[1].steadytrain == {"event": "acme.warned", "id": "acme_warner", "step": 0}
    assert records[0].steadytrain["plugins"][0]["plugin"] == "acme_warner"
    caplog.clear()
    caplog.set_level(logging.ERROR, logger="steadytrain")
    one_step()
    assert [r for r in caplog.records if r.name == "steadytrain"] == []


def test_a_host_that_configures_structlog_gets_the_events_there(unconfigured, caplog):
    caplog.set_level(logging.DEBUG)
    with capture_logs() as events:
        one_step()
    assert [(e["event"], e["log_level"]) for e in events] == [
        ("pipeline.assembled", "info"), ("acme.warned", "warning")]
    assert [r for r in caplog.records if r.name.startswith("steadytrain")] == []
