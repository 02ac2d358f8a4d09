"""The quick-start example runs as the README says and its guard catches the bad batch."""

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_quickstart_runs_and_skips_the_corrupted_step():
    result = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "quickstart.py"), "--epochs", "5"],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert "skipped steps: 1 of 160" in result.stdout
    final = re.search(r"epoch  4: loss/task=([0-9.]+)", result.stdout)
    assert final and float(final.group(1)) < 0.7
