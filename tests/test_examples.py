"""The examples run as the README says and show what they claim."""

import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "examples" / "quickstart.py"
# Runs a script as `python SCRIPT ARGS` would, on an interpreter that cannot import NumPy.
WITHOUT_NUMPY = (
    "import runpy, sys; sys.modules['numpy'] = None; sys.argv = sys.argv[1:]; "
    "runpy.run_path(sys.argv[0], run_name='__main__')"
)
SUMMARY = re.compile(
    r"^  (with|without) the guard: +validation loss (\S+), accuracy (\S+), (\d+) steps? skipped$",
    re.MULTILINE,
)


def run_quickstart(*args: str, numpy: bool = True) -> subprocess.CompletedProcess:
    prefix = [sys.executable] if numpy else [sys.executable, "-c", WITHOUT_NUMPY]
    result = subprocess.run([*prefix, str(QUICKSTART), *args], capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr
    return result


@pytest.mark.slow
def test_quickstart_guarded_run_survives_the_corrupted_batch_and_the_unguarded_does_not():
    result = run_quickstart("--epochs", "6", "--corrupt-epoch", "2", "--quiet", numpy=False)
    # --quiet: the comparison alone; no log events, and no warning about the missing NumPy
    assert result.stdout.splitlines()[0] == "after 6 epochs (192 steps each):"
    assert len(result.stdout.splitlines()) == 3, result.stdout
    assert result.stderr == ""
    runs = {name: (float(loss), float(accuracy), int(skipped))
            for name, loss, accuracy, skipped in SUMMARY.findall(result.stdout)}
    guarded_loss, guarded_accuracy, guarded_skips = runs["with"]
    broken_loss, broken_accuracy, broken_skips = runs["without"]
    assert math.isfinite(guarded_loss) and math.isnan(broken_loss)
    assert guarded_accuracy > broken_accuracy
    assert guarded_skips >= 1 and broken_skips == 0


@pytest.mark.slow
def test_quickstart_runs_agree_step_for_step_when_no_batch_is_corrupted():
    result = run_quickstart("--epochs", "2", "--corrupt-epoch", "-1")
    rows = re.findall(r"^ +\d+   (\S+) +(\S+) +(\S+) +(\S+)$", result.stdout, re.MULTILINE)
    assert len(rows) == 2
    for guarded_loss, guarded_accuracy, loss, accuracy in rows:
        assert (guarded_loss, guarded_accuracy) == (loss, accuracy)
        assert math.isfinite(float(loss))
    assert [skipped for *_, skipped in SUMMARY.findall(result.stdout)] == ["0", "0"]
    # without --quiet the library's events are printed
    assert "pipeline.assembled" in result.stdout + result.stderr


# Run in a folder that holds a folder named steadytrain, as the folder above a clone does.
SHADOW_PROBE = """
import importlib.machinery, json, sys
import steadytrain
regular = importlib.machinery.PathFinder.find_spec("steadytrain", [p for p in sys.path if p])
print(json.dumps({"file": getattr(steadytrain, "__file__", None),
                  "has_pipeline": hasattr(steadytrain, "Pipeline"),
                  "regular_package_on_path": bool(regular and regular.origin)}))
"""


def test_the_readme_says_when_a_folder_named_steadytrain_shadows_the_package(tmp_path):
    (tmp_path / "steadytrain").mkdir()
    result = subprocess.run([sys.executable, "-c", SHADOW_PROBE], capture_output=True,
                            text=True, cwd=tmp_path, timeout=120, check=True)
    found = json.loads(result.stdout)
    if found["regular_package_on_path"]:
        # a wheel (or a link-tree editable install): the package on sys.path wins
        assert found["file"].endswith("__init__.py") and found["has_pipeline"]
    else:
        # the editable install's import hook runs after the path, where the folder is
        # already an (empty) namespace package
        assert found == {"file": None, "has_pipeline": False, "regular_package_on_path": False}
        readme = " ".join((ROOT / "README.md").read_text().split())
        assert "in the folder that contains a clone named `steadytrain`" in readme
