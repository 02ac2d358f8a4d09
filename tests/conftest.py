import pytest
import structlog
import torch
from helpers import L2Outputs


@pytest.fixture(autouse=True)
def _quiet_logs():
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(40))
    yield
    structlog.reset_defaults()


@pytest.fixture
def model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))


@pytest.fixture
def l2_outputs():
    return L2Outputs
