"""The conformance kit on CUDA: the no-sync check runs every pipeline call under
``torch.cuda.set_sync_debug_mode("error")``, so it catches the syncs the CPU watch cannot
see; ``--conformance-device cuda`` selects it. Skipped without CUDA."""

import os
import subprocess
import sys
import textwrap

import pytest
import torch
from expect import raises

import steadytrain
from steadytrain.testing import CHECKS, ConformanceError, check_plugin, run_check

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

NO_SYNC = "records_metrics_without_host_sync"


class GradNorm(steadytrain.Plugin):
    """Records the gradient norm of the selected parameters, on the device."""

    name = "kit_cuda_grad_norm"

    @steadytrain.hookimpl
    def setup(self, run):
        names = self.filter.select([n for n, _ in run.named_parameters()], kind="parameter")
        params = dict(run.named_parameters())
        self.params = [params[n] for n in names]

    def norm(self):
        return torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in self.params]))

    @steadytrain.hookimpl
    def after_backward(self, ctx):
        ctx.log("norm", self.norm())


class CopiedToHost(GradNorm):
    """Copies the norm to the host before logging it: a sync on CUDA, nothing on the CPU."""

    name = "kit_cuda_copied"

    @steadytrain.hookimpl
    def after_backward(self, ctx):
        ctx.log("norm", self.norm().cpu())


class ReadOnHost(GradNorm):
    """Reads the norm on the host to decide whether to skip."""

    name = "kit_cuda_read"

    @steadytrain.hookimpl
    def after_backward(self, ctx):
        if self.norm().item() > 1e6:
            ctx.request_skip("huge gradient")


def test_a_plugin_that_keeps_its_metrics_on_the_device_passes_every_check_on_cuda():
    check_plugin(GradNorm, device="cuda")


@pytest.mark.parametrize("plugin", [CopiedToHost, ReadOnHost], ids=["cpu()", "item()"])
def test_a_plugin_that_syncs_fails_the_no_sync_check_on_cuda(plugin):
    with raises(ConformanceError, f"plugin {plugin.name!r}", f"fails conformance check {NO_SYNC}",
                "step 1, after_backward()", "raised RuntimeError in after_backward",
                "synchronizing CUDA operation", "keep the value on the device"):
        run_check(NO_SYNC, plugin, device="cuda")
    for check in CHECKS:
        if check != NO_SYNC:
            run_check(check, plugin, device="cuda")


def test_a_copy_to_the_host_is_caught_on_cuda_only():
    run_check(NO_SYNC, CopiedToHost)  # on the CPU nothing synchronizes, and nothing is seen
    with pytest.raises(ConformanceError, match="synchronizing CUDA operation"):
        run_check(NO_SYNC, CopiedToHost, device="cuda")
    assert torch.cuda.get_sync_debug_mode() == 0  # the kit leaves the default behind


TEST_FILE = """
import torch

import steadytrain


class Copied(steadytrain.Plugin):
    name = "copied"
    uses_filter = False

    @steadytrain.hookimpl
    def after_backward(self, ctx):
        ctx.log("loss", ctx.step_loss.cpu())


def test_conformance(conformance_check):
    conformance_check(Copied)
"""


@pytest.mark.slow
def test_the_pytest_plugin_runs_the_checks_on_cuda_when_asked(tmp_path):
    (tmp_path / "test_copied.py").write_text(textwrap.dedent(TEST_FILE))
    env = {k: v for k, v in os.environ.items() if k != "PYTEST_DISABLE_PLUGIN_AUTOLOAD"}

    def pytest_run(*options):
        return subprocess.run(
            [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rA", *options,
             "test_copied.py"], capture_output=True, text=True, cwd=tmp_path, env=env,
            timeout=300,
        ).stdout

    on_cuda = pytest_run("--conformance-device", "cuda")
    assert f"FAILED test_copied.py::test_conformance[{NO_SYNC}]" in on_cuda, on_cuda
    for check in CHECKS:
        if check != NO_SYNC:
            assert f"PASSED test_copied.py::test_conformance[{check}]" in on_cuda, on_cuda
    on_cpu = pytest_run()
    assert f"PASSED test_copied.py::test_conformance[{NO_SYNC}]" in on_cpu, on_cpu
