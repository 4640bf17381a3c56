"""Options and fixtures of the pytest-benchmark suite (``python -m pytest bench/``).

The suite is kept out of the default test run (pyproject's ``testpaths = ["tests"]``); this file
is read only when bench/ is named on the command line.
"""

import pytest

from bench import machine


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("bnnops bench")
    group.addoption(
        "--bench-size",
        choices=["full", "quick", "tiny"],
        default="full",
        help="shapes to run: every shape of the device's table, the headline shapes, or the smoke-test size",
    )
    group.addoption(
        "--bench-device",
        choices=["cuda", "cpu"],
        default=None,
        help="default: cuda when available, else cpu (the reference path)",
    )


@pytest.fixture(scope="session")
def device(request: pytest.FixtureRequest) -> str:
    """--bench-device, else "cuda" when torch sees a GPU, else "cpu"."""
    return request.config.getoption("--bench-device") or machine.default_device()


@pytest.fixture(scope="session")
def ceilings(request: pytest.FixtureRequest, device: str) -> dict:
    """The machine's measured ceilings, once per session; none under --benchmark-disable."""
    if request.config.getoption("benchmark_disable"):
        return {}
    return machine.measure_ceilings(device, quick=request.config.getoption("--bench-size") != "full")
