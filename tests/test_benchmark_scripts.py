"""The end-to-end benchmark scripts run at a tiny size on the CPU, and their hand-written
variants train as the pipeline does (``--check``)."""

import importlib
import json
import re
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
TINY = ["--device", "cpu", "--layers", "1", "--dim", "16", "--heads", "2", "--vocab", "64",
        "--batch", "2", "--seq", "8", "--rounds", "1", "--steps", "2", "--check"]
CHECK = re.compile(r"largest relative difference of a weight or EMA tensor (\S+)")


@pytest.fixture
def benchmarks(monkeypatch):
    """Imports a benchmark script as a module (they import each other by file name)."""
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    return importlib.import_module


def assert_trains_alike(output: str) -> None:
    (difference,) = CHECK.findall(output)
    assert float(difference) < 1e-4  # float32 on the CPU: rounding only


@pytest.mark.parametrize("trainer", ["lightning", "transformers"])
def test_the_adapter_benchmark_runs_and_its_hand_callbacks_train_as_the_adapter(
        benchmarks, capsys, trainer):
    pytest.importorskip({"lightning": "lightning.pytorch"}.get(trainer, trainer))
    benchmarks("bench_adapters_end_to_end").main([*TINY, "--trainer", trainer],
                                                 quiet_logs=False)
    output = capsys.readouterr().out
    assert_trains_alike(output)
    rows = re.findall(r"^(hand|adapter) +[\d.]+ +[\d.]+ ", output, re.MULTILINE)
    assert rows == ["hand", "adapter"]


def test_the_end_to_end_benchmark_runs_with_its_profile(benchmarks, capsys):
    benchmarks("bench_end_to_end").main([*TINY, "--no-compile", "--profile"])
    output = capsys.readouterr().out
    assert_trains_alike(output)
    assert re.search(r"profile eager/pipeline: \d+ kernels/step", output)


def test_the_ema_and_clipping_benchmark_runs_and_compares_with_the_per_group_baseline(
        benchmarks, tmp_path):
    report_path = tmp_path / "report.json"
    benchmarks("bench_ema_clip").main(["--sizes", "1", "--many", "20", "--repeat", "2",
                                       "--json", str(report_path)])

    (run,) = json.loads(report_path.read_text())["runs"]
    per_group = run["clip_ratio_per_group"]
    assert per_group["clip_grad_norm_(foreach=True) per group (2 calls)"] == 1.0
    assert {"grad_clip plugin, norm (2 groups)", "grad_clip plugin, agc (2 groups)"} <= set(
        per_group)
    assert all(ratio > 0 for ratio in per_group.values())
