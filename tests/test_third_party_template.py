"""The third-party template (examples/third_party_plugin) builds from a fresh copy, installs,
passes its own tests, and is found and checked by this project's suite once installed."""

import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

from steadytrain.testing import CHECKS

ROOT = Path(__file__).resolve().parents[1]
TEMPLATE = ROOT / "examples" / "third_party_plugin"
PROJECT = tomllib.loads((TEMPLATE / "pyproject.toml").read_text())["project"]

pytestmark = pytest.mark.slow


def run(*args, cwd, site=None, check=True):
    env = {k: v for k, v in os.environ.items() if k != "PYTEST_DISABLE_PLUGIN_AUTOLOAD"}
    if site is not None:
        env["PYTHONPATH"] = str(site)
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=600, check=check)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """A fresh copy of the template, its wheel, and a folder it is installed into."""
    root = tmp_path_factory.mktemp("template")
    copy = root / "copy"
    shutil.copytree(TEMPLATE, copy, ignore=shutil.ignore_patterns(
        "__pycache__", "*.egg-info", "build", "dist"))
    run("-m", "pip", "--disable-pip-version-check", "-q", "wheel", "--no-deps",
        "--no-build-isolation", "-w", str(root / "dist"), str(copy), cwd=root)
    (wheel,) = (root / "dist").glob("*.whl")
    run("-m", "pip", "--disable-pip-version-check", "-q", "install", "--no-deps", "--target",
        str(root / "site"), str(wheel), cwd=root)
    return copy, wheel, root / "site"


def test_the_wheel_carries_the_entry_point_and_the_metadata(built):
    _, wheel, _ = built
    files = zipfile.ZipFile(wheel)
    (entry_points,) = [n for n in files.namelist() if n.endswith("entry_points.txt")]
    (entry,) = PROJECT["entry-points"]["steadytrain.plugins"].items()
    assert f"{entry[0]} = {entry[1]}" in files.read(entry_points).decode()
    (meta,) = [n for n in files.namelist() if n.endswith("/METADATA")]
    text = files.read(meta).decode()
    assert f"Name: {PROJECT['name']}" in text and f"Version: {PROJECT['version']}" in text


def test_the_template_passes_its_own_tests_from_the_installed_wheel(built):
    copy, _, site = built
    result = run("-m", "pytest", "-q", "-p", "no:cacheprovider", "-rA", cwd=copy, site=site,
                 check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    for check in CHECKS:
        assert f"PASSED tests/test_orthogonality.py::test_conformance[{check}]" in result.stdout


def test_the_installed_plugin_is_listed_with_its_distribution(built):
    _, _, site = built
    listing = run("-m", "steadytrain", "plugins", "--json", cwd=site.parent, site=site)
    rows = {row["name"]: row for row in json.loads(listing.stdout)}
    (name, value) = next(iter(PROJECT["entry-points"]["steadytrain.plugins"].items()))
    assert rows[name]["distribution"] == PROJECT["name"]
    assert rows[name]["version"] == PROJECT["version"]
    assert rows[name]["entry_point"] == value and rows[name]["error"] is None


def test_the_project_suite_runs_the_kit_over_an_installed_third_party_plugin(built):
    _, _, site = built
    result = run("-m", "pytest", "-q", "-p", "no:cacheprovider", "-rA",
                 "tests/test_conformance_kit.py", "-k", "every_discovered and orthogonality",
                 cwd=ROOT, site=site, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    ran = re.findall(r"PASSED \S+\[orthogonality-(\w+)\]", result.stdout)
    assert sorted(ran) == sorted(CHECKS)
