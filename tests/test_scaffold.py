"""``steadytrain new-plugin``: the template's layout, a distribution that installs and passes
its tests as written, and clear refusals of names and folders it cannot use."""

import json
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from expect import raises

from steadytrain import ConfigError
from steadytrain.cli import main
from steadytrain.scaffold import new_plugin
from steadytrain.testing import CHECKS

ROOT = Path(__file__).resolve().parents[1]
TEMPLATE = ROOT / "examples" / "third_party_plugin"
BUILT = {"__pycache__", "build", "dist", ".pytest_cache"}
HEADINGS = ("What it does", "When to use it", "Hyperparameters", "Source", "Caveats")


def layout(folder: Path, package: str, test: str) -> set[str]:
    """The distribution's files, with its package and test module named generically."""
    files = {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()
             and not any(part in BUILT or part.endswith(".egg-info") for part in p.parts)}
    return {f.replace(test, "TEST").replace(package, "PACKAGE") for f in files}


def keys(table: dict, prefix: str = "") -> set[str]:
    found = set()
    for key, value in table.items():
        found.add(prefix + key)
        if isinstance(value, dict) and key != "steadytrain.plugins":
            found |= keys(value, f"{prefix}{key}.")
    return found


def test_the_scaffold_writes_the_template_s_layout(tmp_path):
    folder = new_plugin("acme_decay", tmp_path)
    assert folder == tmp_path / "acme-decay"
    assert layout(folder, "acme_decay", "test_acme_decay") == layout(
        TEMPLATE, "steadytrain_orthogonality", "test_orthogonality")
    ours = tomllib.loads((folder / "pyproject.toml").read_text())
    template = tomllib.loads((TEMPLATE / "pyproject.toml").read_text())
    assert keys(ours) - {"project.license"} == keys(template) - {"project.license"}
    assert ours["project"]["name"] == "acme-decay"
    assert ours["project"]["entry-points"]["steadytrain.plugins"] == {
        "acme_decay": "acme_decay:AcmeDecay"}


def test_the_written_plugin_is_documented_like_the_built_ins(tmp_path):
    module = (new_plugin("acme_decay", tmp_path) / "src/acme_decay/__init__.py").read_text()
    assert all(heading in module for heading in HEADINGS)
    assert 'name = "acme_decay"' in module and "class AcmeDecay(steadytrain.Plugin)" in module


@pytest.mark.slow
def test_the_written_distribution_installs_and_passes_its_tests_as_written(tmp_path):
    assert main(["new-plugin", "acme_decay", "--dir", str(tmp_path)]) == 0
    folder, site = tmp_path / "acme-decay", tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "--disable-pip-version-check", "-q", "install",
                    "--no-deps", "--no-build-isolation", "--target", str(site), str(folder)],
                   check=True, capture_output=True, timeout=300)
    env = {k: v for k, v in os.environ.items() if k != "PYTEST_DISABLE_PLUGIN_AUTOLOAD"}
    env["PYTHONPATH"] = str(site)
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                             "-rA"], cwd=folder, env=env, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    for check in CHECKS:
        assert f"PASSED tests/test_acme_decay.py::test_conformance[{check}]" in result.stdout
    listing = subprocess.run([sys.executable, "-m", "steadytrain", "plugins", "--json"],
                             env=env, capture_output=True, text=True, check=True).stdout
    (row,) = [r for r in json.loads(listing) if r["name"] == "acme_decay"]
    assert (row["distribution"], row["error"]) == ("acme-decay", None)


@pytest.mark.parametrize("name", ["AcmeDecay", "acme-decay", "1acme", "", "class", "acme decay"])
def test_a_name_that_is_no_lowercase_identifier_is_refused(tmp_path, name):
    with raises(ConfigError, f"new-plugin {name!r}", "lowercase Python identifier"):
        new_plugin(name, tmp_path)
    assert not any(tmp_path.iterdir())


def test_the_name_of_an_installed_plugin_is_refused(tmp_path):
    with raises(ConfigError, "new-plugin 'ema'", "a plugin of that name is installed",
                "distribution steadytrain", "choose another name"):
        new_plugin("ema", tmp_path)


def test_an_existing_folder_is_left_alone(tmp_path, capsys):
    (tmp_path / "acme-decay").mkdir()
    (tmp_path / "acme-decay" / "notes.txt").write_text("mine")
    assert main(["new-plugin", "acme_decay", "--dir", str(tmp_path)]) == 1
    assert f"{tmp_path / 'acme-decay'} exists" in capsys.readouterr().err
    assert [p.name for p in (tmp_path / "acme-decay").iterdir()] == ["notes.txt"]
