"""benchmarks/bench_distributed.py under torchrun, two CPU ranks (gloo), the tiniest GPT.

One launch runs both modes (the ranks' start, mostly importing torch, takes longer than
the checks); the tests read what it wrote.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch.distributed as dist

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "bench_distributed.py"
SIZES = ["--tiny", "--layers", "1", "--dim", "32", "--vocab", "64", "--seq", "8"]
SHORT = ["--check-steps", "2", "--rounds", "1", "--steps", "1", "--warmup", "0",
         "--ema-repeat", "1"]
#: What torchrun prints when its workers could not even meet (no local TCP, say).
LAUNCH_FAILURES = ("RendezvousConnectionError", "RendezvousTimeoutError",
                   "Address already in use", "errno: 98")
MODES = ("ddp", "fsdp2")
#: The share of the ranks' guards that see the inf that rank 1 alone has.
GUARDS_SEEING = {"ddp": 0.5, "fsdp2": 1.0}


def torchrun(tmp_path: Path, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    """``torchrun --standalone --nproc-per-node 2 bench_distributed.py ARGS`` on the CPU."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               "--nproc-per-node", "2", str(SCRIPT), "--device", "cpu", "--out",
               str(tmp_path / "checkpoints"), *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    # Its own session: on a timeout the launcher and its workers go together.
    process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        output, _ = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.communicate()
        raise
    result = subprocess.CompletedProcess(command, process.returncode, output, "")
    if result.returncode and any(marker in output for marker in LAUNCH_FAILURES):
        pytest.skip(f"torchrun could not start two ranks here:\n{output[-2000:]}")
    return result


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    if not (dist.is_available() and dist.is_gloo_available()):
        pytest.skip("torch.distributed with gloo is not available")
    folder = tmp_path_factory.mktemp("bench_distributed")
    result = torchrun(folder, *SIZES, *SHORT, "--json", str(folder / "out.json"))
    assert result.returncode == 0, result.stdout[-6000:]
    assert "all checks passed" in result.stdout
    return {"printed": result.stdout, **json.loads((folder / "out.json").read_text())}


@pytest.mark.slow
@pytest.mark.parametrize("mode", MODES)
def test_the_ranks_train_as_one_process_on_the_global_batch(run, mode):
    found = run["results"][mode]["equivalence"]
    assert found["tolerance"] == {"norms": 1e-4, "metrics": 1e-4, "weights": 1e-4,
                                  "ema": 1e-4}
    assert set(found["differences"]) == {"norms", "metrics", "weights", "ema"}
    assert all(0 <= d <= 1e-4 for d in found["differences"].values())
    assert found["passed"]


@pytest.mark.slow
@pytest.mark.parametrize("mode", MODES)
def test_an_inf_in_one_ranks_gradient_skips_that_step_on_every_rank(run, mode):
    found = run["results"][mode]["skip"]
    assert found["corrupted"] == {"rank": 1, "step": 1}
    for rank in found["ranks"]:
        assert rank["pipeline"]["moved"] == rank["hand"]["moved"] == [True, False, True]
        assert rank["pipeline"]["skipped_steps"] == 1
        # The guards' verdicts, averaged over the ranks. Under DDP each guard checks its
        # rank's reduced gradients, where rank 1's alone holds the inf; under FSDP2 the
        # norm of a sharded gradient covers every rank's shard, so both guards see it.
        assert rank["pipeline"]["guard/nonfinite_grads"] == [0.0, GUARDS_SEEING[mode], 0.0]


@pytest.mark.slow
@pytest.mark.parametrize("mode", MODES)
def test_the_ema_update_runs_no_collective_where_the_training_step_runs_some(run, mode):
    expected = {"ddp": {"c10d::allreduce_"},
                "fsdp2": {"c10d::_allgather_base_", "c10d::_reduce_scatter_base_"}}[mode]
    for rank in run["results"][mode]["ema"]["ranks"]:
        assert rank["collectives"]["ema"] == {}
        assert rank["collectives"]["ema, device-side skip flag"] == {}
        assert set(rank["collectives"]["forward and backward"]) == expected
        assert rank["bytes"] > 0 and all(v > 0 for v in rank["GBps"].values())


@pytest.mark.slow
@pytest.mark.parametrize("mode", MODES)
def test_a_checkpoint_resumed_in_a_fresh_process_group_continues_exactly(run, mode):
    found = run["results"][mode]["checkpoint"]
    assert found["saved_at"] == 2 and found["steps"] == 4
    for rank in found["ranks"]:
        assert rank["resumed_at"] == 2
        assert rank["differences"] == {"norms": 0.0, "metrics": 0.0, "weights": 0.0,
                                       "ema": 0.0}


@pytest.mark.slow
@pytest.mark.parametrize("mode", MODES)
def test_every_rank_times_every_variant_and_counts_no_syncs_without_cuda(run, mode):
    for rank in run["results"][mode]["timing"]["ranks"]:
        for name in ("plain", "hand", "pipeline"):
            assert rank[name]["step_ms"] > 0
            assert rank[name]["syncs"] is None
        assert rank["ratio"] == rank["pipeline"]["step_ms"] / rank["hand"]["step_ms"]
    assert f"{mode:7}    1  pipeline" in run["printed"]


def test_without_torchrun_the_script_says_how_to_launch_it(monkeypatch, capsys):
    monkeypatch.syspath_prepend(str(SCRIPT.parent))
    monkeypatch.delenv("RANK", raising=False)
    import bench_distributed

    with pytest.raises(SystemExit) as exit_:
        bench_distributed.parse(["--device", "cpu", "--tiny"])
    assert exit_.value.code == 2
    assert "launch with torchrun: torchrun --nproc-per-node N" in capsys.readouterr().err
