"""The conformance kit as a pytest plugin, registered under the ``pytest11`` entry point.

Installing steadytrain makes the fixture ``conformance_check`` available to every test
suite: a test that takes it runs once per check (its ids are the check names), and calls
it with the plugin class::

    def test_conformance(conformance_check):
        conformance_check(MyPlugin)

``--conformance-device cuda`` runs the checks on a GPU (the no-sync check then uses
CUDA's sync debug mode). With ``PYTEST_DISABLE_PLUGIN_AUTOLOAD`` set, load it with
``-p steadytrain.testing.pytest_plugin``.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest

from . import CHECKS, run_check


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.getgroup("steadytrain").addoption(
        "--conformance-device", default="cpu", metavar="DEVICE",
        help="device the steadytrain conformance checks train on (default: cpu)",
    )


@pytest.fixture(params=list(CHECKS))
def conformance_check(request: pytest.FixtureRequest) -> Callable[[type], None]:
    """Run one conformance check (this test's parameter) on the plugin class it is given."""
    device = request.config.getoption("conformance_device")

    def check(plugin: type) -> None:
        __tracebackhide__ = True
        run_check(request.param, plugin, device=device)

    return check
