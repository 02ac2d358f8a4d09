"""The distribution: the wheel and the editable install expose the same names, and a
third-party distribution with a ``steadytrain.plugins`` entry point is found and used."""

import json
import os
import subprocess
import sys
import textwrap
import tomllib
import zipfile
from pathlib import Path

import pytest

import steadytrain
import steadytrain.plugins

ROOT = Path(__file__).resolve().parents[1]
PROBE = """
import json, steadytrain, steadytrain.plugins, steadytrain.nn
from steadytrain import Registry
print(json.dumps({"core": steadytrain.__file__, "plugins": steadytrain.plugins.__file__,
                  "all": sorted(steadytrain.__all__),
                  "names": Registry.discover(autoload=False).names()}))
"""


def pip(*args, cwd=None):
    subprocess.run([sys.executable, "-m", "pip", "--disable-pip-version-check", "-q", *args],
                   check=True, cwd=cwd, capture_output=True, text=True)


def probe(pythonpath):
    env = {**os.environ, "PYTHONPATH": str(pythonpath)}
    out = subprocess.run([sys.executable, "-c", PROBE], check=True, capture_output=True,
                         text=True, env=env, cwd="/").stdout
    return json.loads(out)


def test_every_package_folder_is_listed_in_pyproject():
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(config["packages"])
    found = {"steadytrain"} | {
        "steadytrain." + str(p.parent.relative_to(ROOT / "core")).replace("/", ".")
        for p in (ROOT / "core").rglob("__init__.py") if p.parent != ROOT / "core"
    } | {
        "steadytrain.plugins" + ("." + str(p.parent.relative_to(ROOT / "plugins")).replace(
            "/", ".") if p.parent != ROOT / "plugins" else "")
        for p in (ROOT / "plugins").rglob("__init__.py")
    }
    assert listed == found


@pytest.mark.slow
def test_wheel_and_editable_install_expose_the_same_names(tmp_path):
    pip("wheel", "--no-deps", "--no-build-isolation", "-w", str(tmp_path / "dist"), str(ROOT))
    (wheel,) = (tmp_path / "dist").glob("steadytrain-*.whl")
    files = zipfile.ZipFile(wheel).namelist()
    assert "steadytrain/hookspecs.py" in files and "steadytrain/plugins/grad_norm.py" in files
    entry_points = next(f for f in files if f.endswith("entry_points.txt"))
    assert "grad_norm = steadytrain.plugins.grad_norm:GradNorm" in zipfile.ZipFile(wheel).read(
        entry_points).decode()
    pip("install", "--no-deps", "--target", str(tmp_path / "site"), str(wheel))
    from_wheel = probe(tmp_path / "site")
    assert from_wheel["core"].startswith(str(tmp_path / "site"))
    assert from_wheel["plugins"].startswith(str(tmp_path / "site"))
    here = probe("")
    assert here["core"] == steadytrain.__file__
    assert from_wheel["all"] == here["all"] == sorted(steadytrain.__all__)
    assert from_wheel["names"] == here["names"]


THIRD_PARTY_PYPROJECT = """
[build-system]
requires = ["setuptools"]
build-backend = "setuptools.build_meta"

[project]
name = "acme-regularizers"
version = "2.0.1"
dependencies = ["steadytrain"]

[project.entry-points."steadytrain.plugins"]
acme_l1 = "acme_regularizers:L1Outputs"
"""

THIRD_PARTY_MODULE = '''
import attrs
import steadytrain
from steadytrain import validators


class L1Outputs(steadytrain.Plugin):
    """Mean absolute value of a named output."""

    name = "acme_l1"

    @attrs.frozen
    class Config:
        key: str = "logits"
        power: float = attrs.field(default=1.0, validator=validators.positive)

    @steadytrain.hookimpl
    def compute_regularizers(self, ctx):
        return {"l1": ctx.outputs[self.config.key].abs().pow(self.config.power).mean()}
'''

RUN_WITH_IT = """
import torch, steadytrain
pipe = steadytrain.Pipeline.from_config("run.toml")
model = torch.nn.Linear(3, 2)
pipe.setup(model, None)
pipe.before_step()
out = model(torch.ones(4, 3))
loss = pipe.compute_loss(torch.zeros(()), outputs={"logits": out})
expected = 0.5 * out.abs().pow(2).mean()
assert torch.allclose(loss, expected), (loss, expected)
print("ok", pipe.versions)
"""


@pytest.mark.slow
def test_a_third_party_distribution_is_listed_and_used(tmp_path):
    project = tmp_path / "acme"
    (project / "acme_regularizers").mkdir(parents=True)
    (project / "pyproject.toml").write_text(THIRD_PARTY_PYPROJECT)
    (project / "acme_regularizers" / "__init__.py").write_text(THIRD_PARTY_MODULE)
    pip("install", "--no-deps", "--no-build-isolation", "--target", str(tmp_path / "site"),
        str(project))
    env = {**os.environ, "PYTHONPATH": str(tmp_path / "site")}
    listing = subprocess.run(
        [sys.executable, "-m", "steadytrain", "plugins", "--json"],
        check=True, capture_output=True, text=True, env=env,
    ).stdout
    rows = {row["name"]: row for row in json.loads(listing)}
    assert rows["acme_l1"] == {
        "name": "acme_l1", "distribution": "acme-regularizers", "version": "2.0.1",
        "entry_point": "acme_regularizers:L1Outputs", "hooks": ["compute_regularizers"],
        "summary": "Mean absolute value of a named output.", "error": None,
    }
    (tmp_path / "run.toml").write_text(textwrap.dedent("""
        [[plugins]]
        plugin = "acme_l1"
        weight = 0.5
        power = 2.0
        """))
    result = subprocess.run([sys.executable, "-c", RUN_WITH_IT], capture_output=True, text=True,
                            env=env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "'acme_l1': '2.0.1'" in result.stdout
