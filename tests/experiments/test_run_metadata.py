"""``metadata.json`` of ``steadytrain run``: versions, plugin origins, the whole resolved config."""

import json
import platform
from importlib import metadata

import pytest
import torch
from experiment_helpers import CtrlCAt, steadytrain, tiny, write

import steadytrain as st
from steadytrain.experiments import load_experiment, train
from steadytrain.experiments.metadata import VERSIONS
from steadytrain.experiments.models import model_options

PLUGINS = [{"plugin": "z_loss"}, {"plugin": "grad_clip", "id": "clip", "max_norm": 0.5}]


def read(run):
    return json.loads((run / "metadata.json").read_text())


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished run with two plugin instances, one of them switched off by ``-p no:``."""
    folder = tmp_path_factory.mktemp("metadata")
    config = write(folder / "tiny.json",
                   tiny(steps=10, plugins=[*PLUGINS, {"plugin": "ema", "id": "avg"}]))
    done = steadytrain("-p", "no:avg", "run", config, "--out", "run", "--quiet", cwd=folder)
    assert done.returncode == 0, done.stderr
    return folder


def test_the_versions_and_the_origin_of_every_plugin_instance_are_recorded(finished):
    recorded = read(finished / "run")
    assert recorded["steadytrain"] == metadata.version("steadytrain") == st.__version__
    assert recorded["torch"] == torch.__version__
    assert recorded["python"] == platform.python_version()
    registry = st.Registry.discover()
    assert recorded["plugins"] == [
        {"id": id, "plugin": name, "distribution": "steadytrain",
         "version": metadata.version("steadytrain"),
         "class": f"{registry.get(name).__module__}:{registry.get(name).__qualname__}"}
        for id, name in (("z_loss", "z_loss"), ("clip", "grad_clip"))
    ]


def test_the_config_is_recorded_whole_with_its_defaults_and_reads_back(finished):
    recorded = read(finished / "run")["config"]
    z_loss = st.Registry.discover().get("z_loss").Config()
    entry = recorded["plugins"][0]
    assert entry["coefficient"] == z_loss.coefficient and entry["weight"] == 1.0
    assert recorded["plugins"][1]["max_norm"] == 0.5
    assert recorded["disable"] == ["avg"]  # the instance left out is on record
    assert recorded["train"]["betas"] == [0.9, 0.95]  # a default the file did not give
    assert recorded["model"]["mlp_ratio"] == 4
    assert recorded == json.loads((finished / "run" / "config.json").read_text())["config"]
    again = load_experiment(recorded, model_options=model_options)
    original = load_experiment(finished / "tiny.json", model_options=model_options)
    assert again == original.with_disabled(("avg",))
    assert read(finished / "run")["data_sha256"] == \
        json.loads((finished / "run" / "config.json").read_text())["data_sha256"]


def test_a_resume_under_other_versions_is_recorded_and_warned(tmp_path):
    path = write(tmp_path / "tiny.json", tiny(steps=20, plugins=PLUGINS, log_every=5,
                                              checkpoint_every=5))
    config, run = load_experiment(path, model_options=model_options), tmp_path / "run"
    threads = torch.get_num_threads()
    try:
        assert train(config, run, threads=1, progress=CtrlCAt(5, 20))["status"] == "interrupted"
        started = read(run)
        resumed = train(config, run, resume=True, threads=1, progress=CtrlCAt(10, 20))
    finally:
        torch.set_num_threads(threads)
    assert resumed["status"] == "interrupted"
    assert read(run) == started  # the same versions: nothing to add
    older = {**started, "steadytrain": "0.0.9",
             "plugins": [{**started["plugins"][0], "version": "0.0.9"}, started["plugins"][1]]}
    (run / "metadata.json").write_text(json.dumps(older))
    done = steadytrain("run", path, "--out", run, "--resume", "--quiet", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    recorded = read(run)
    assert {k: v for k, v in recorded.items() if k != "resumed_with"} == older
    assert recorded["resumed_with"] == [{"step": 10, **{k: started[k] for k in VERSIONS}}]
    events = [json.loads(line) for line in (run / "events.jsonl").read_text().splitlines()]
    changed = [e for e in events if e["event"] == "run.versions_changed"]
    assert len(changed) == 1 and changed[0]["level"] == "warning"
    assert changed[0]["changed"] == ["steadytrain", "plugins"] and changed[0]["step"] == 10
