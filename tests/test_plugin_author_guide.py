"""The plugin-author guide's sample, taken from the page as it is, installs and trains.

Every file of the sample is a fenced block right after a line holding its path in bold
(**`acme-regularizers/pyproject.toml`**); the tests write those blocks out unchanged.
"""

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

import steadytrain

ROOT = Path(__file__).resolve().parents[1]
GUIDE = ROOT / "docs" / "plugin-authors.md"
FILE_BLOCK = re.compile(r"^\*\*`(?P<path>[^`]+)`\*\*\n```[\w-]*\n(?P<text>.*?)^```$",
                        re.MULTILINE | re.DOTALL)
DISTRIBUTION = "acme-regularizers"

# Trains one step through the guide's run.toml and reports what a user would check.
USE_IT = """
import json, tomllib
import torch, torch.nn.functional as F
import steadytrain
from steadytrain.cli import main

assert main(["check", "run.toml"]) == 0
(options,) = tomllib.load(open("run.toml", "rb"))["plugins"]
entry = steadytrain.Registry.discover().entry(options["plugin"])
pipe = steadytrain.Pipeline.from_config("run.toml")
torch.manual_seed(0)
model = torch.nn.Linear(3, 4)
pipe.setup(model, torch.optim.SGD(model.parameters(), lr=0.1), total_steps=1)
x, y = torch.randn(8, 3), torch.randint(0, 4, (8,))
pipe.before_step(batch=x, targets=y)
logits = model(x)
task = F.cross_entropy(logits, y)
loss = pipe.compute_loss(task, outputs={"logits": logits})
expected = task + options["weight"] * (logits.abs() ** options["power"]).mean()
loss.backward()
pipe.after_backward()
pipe.consolidate()
print(json.dumps({"loss": loss.item(), "expected": expected.item(),
                  "distribution": entry.distribution, "version": entry.version,
                  "entry_point": entry.entry_point, "metrics": sorted(pipe.metrics())}))
"""


# Loads the plugin of an entry point whose name is not its class's name.
MISNAMED = """
import json, steadytrain
registry = steadytrain.Registry.discover()
try:
    registry.get("acme_l2")
except steadytrain.RegistryError as exc:
    message = str(exc)
listed = {entry.name: entry.error for entry in registry.entries()}
print(json.dumps({"message": message, "listed_as_broken": listed["acme_l2"] is not None}))
"""


def guide_files() -> dict[str, str]:
    files: dict[str, str] = {}
    for match in FILE_BLOCK.finditer(GUIDE.read_text()):
        assert match["path"] not in files, f"{match['path']} is shown twice in {GUIDE.name}"
        files[match["path"]] = match["text"]
    return files


@pytest.fixture(scope="module")
def sample(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("guide")
    for path, text in guide_files().items():
        (folder / path).parent.mkdir(parents=True, exist_ok=True)
        (folder / path).write_text(text)
    return folder


def entry_points(sample: Path) -> dict[str, str]:
    project = tomllib.loads((sample / DISTRIBUTION / "pyproject.toml").read_text())
    return project["project"]["entry-points"]["steadytrain.plugins"]


def pip_install(project: Path, site: Path) -> dict[str, str]:
    """Install *project* into the folder *site*; the environment that finds it there."""
    subprocess.run(
        [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q", "install",
         "--no-deps", "--no-build-isolation", "--target", str(site), str(project)],
        check=True, capture_output=True, text=True, timeout=300,
    )
    return {**os.environ, "PYTHONPATH": str(site)}


def load_module(path: Path):
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_guide_shows_every_file_of_its_sample(sample):
    shown = set(guide_files())
    assert f"{DISTRIBUTION}/pyproject.toml" in shown and "run.toml" in shown
    for value in entry_points(sample).values():
        module = value.split(":")[0]
        assert f"{DISTRIBUTION}/{module}.py" in shown, f"the module of {value} is not shown"


def test_each_entry_point_is_named_like_the_plugin_class_it_points_to(sample):
    for name, value in entry_points(sample).items():
        module, _, attribute = value.partition(":")
        plugin = getattr(load_module(sample / DISTRIBUTION / f"{module}.py"), attribute)
        assert issubclass(plugin, steadytrain.Plugin)
        assert plugin.name == name


def test_a_registry_built_by_hand_has_no_plugins_and_discover_has_the_built_ins(sample):
    assert steadytrain.Registry().names() == []
    assert "grad_norm" in steadytrain.Registry.discover()
    with pytest.raises(steadytrain.ConfigError, match="unknown plugin 'grad_norm'"):
        steadytrain.Pipeline.from_config({"plugins": [{"plugin": "grad_norm"}]},
                                         registry=steadytrain.Registry())


@pytest.mark.slow
def test_the_in_process_registration_snippet_runs(sample):
    (snippet,) = [block for block in re.findall(r"```python\n(.*?)```", GUIDE.read_text(),
                                                re.DOTALL) if "Registry.discover()" in block]
    check = snippet + "\nassert set(pipe.plugins) == {'acme_output_penalty'}\n"
    env = {**os.environ, "PYTHONPATH": str(sample / DISTRIBUTION)}
    result = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True,
                            cwd=sample, env=env, timeout=120)
    assert result.returncode == 0, result.stderr


@pytest.mark.slow
def test_the_sample_distribution_installs_and_trains_through_a_config(sample, tmp_path):
    env = pip_install(sample / DISTRIBUTION, tmp_path / "site")
    result = subprocess.run([sys.executable, "-c", USE_IT], capture_output=True, text=True,
                            cwd=sample, env=env, timeout=120)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.splitlines()[-1])
    project = tomllib.loads((sample / DISTRIBUTION / "pyproject.toml").read_text())["project"]
    assert (report["distribution"], report["version"]) == (project["name"], project["version"])
    assert report["entry_point"] == entry_points(sample)["acme_output_penalty"]
    assert report["loss"] == pytest.approx(report["expected"], rel=1e-6)
    assert {"reg/acme_output_penalty/penalty",
            "reg_weighted/acme_output_penalty/penalty"} <= set(report["metrics"])


@pytest.mark.slow
def test_an_entry_point_named_unlike_its_plugin_class_is_refused(sample, tmp_path):
    project = tmp_path / DISTRIBUTION
    shutil.copytree(sample / DISTRIBUTION, project,
                    ignore=shutil.ignore_patterns("build", "*.egg-info"))
    pyproject = project / "pyproject.toml"
    text = pyproject.read_text()
    assert "\nacme_output_penalty = " in text
    pyproject.write_text(text.replace("\nacme_output_penalty = ", "\nacme_l2 = "))
    env = pip_install(project, tmp_path / "site")
    result = subprocess.run([sys.executable, "-c", MISNAMED], capture_output=True, text=True,
                            env=env, timeout=120)
    assert result.returncode == 0, result.stderr
    refusal = json.loads(result.stdout.splitlines()[-1])
    assert "'acme_l2'" in refusal["message"]
    assert "OutputPenalty.name is 'acme_output_penalty'" in refusal["message"]
    assert refusal["listed_as_broken"]
