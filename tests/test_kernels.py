import importlib.util

import pytest
import torch

import steadytrain
from steadytrain.plugins.ema import EMA

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def test_no_triton_kernels_off_cuda():
    assert not steadytrain.kernels.triton_runs_on(torch.device("cpu"))
    assert not steadytrain.kernels.triton_runs_on(torch.device("meta"))


@cuda
def test_on_cuda_triton_kernels_run_where_triton_and_the_device_allow_it():
    device = torch.device("cuda")
    expected = (importlib.util.find_spec("triton") is not None
                and torch.cuda.get_device_capability() >= steadytrain.kernels.MIN_CAPABILITY)
    assert steadytrain.kernels.triton_runs_on(device) == expected


@cuda
def test_the_environment_variable_keeps_the_plugins_on_torchs_kernels(monkeypatch):
    model = torch.nn.Linear(4, 4).cuda()
    monkeypatch.setenv("STEADYTRAIN_TRITON", "0")
    assert not steadytrain.kernels.triton_runs_on(torch.device("cuda"))
    plugin = EMA(EMA.Config(decay=0.5))
    steadytrain.Pipeline([plugin]).setup(model)
    assert not plugin._one_launch
    plugin.update()
    plugin.update(skip=torch.tensor(False, device="cuda"))
    assert plugin.num_updates == 2
