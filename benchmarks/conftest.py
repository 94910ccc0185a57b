"""Options and parametrization of the benchmark suite (run through benchmarks/run.py)."""

from __future__ import annotations

import pytest

from benchmarks.machine import bench_device, keep_freed_host_memory
from benchmarks.profiles import PROFILE_NAMES, get_profile


def pytest_addoption(parser):
    group = parser.getgroup("rpo-fast benchmarks")
    group.addoption("--profile", default="full", choices=PROFILE_NAMES, help="which grid to measure")
    group.addoption("--only", default="all", choices=("all", "loss", "e2e"), help="one part of the suite")
    group.addoption("--e2e-workdir", default=None, help="folder for the tiny model and data (default: a tmp dir)")


def pytest_configure(config):
    keep_freed_host_memory()  # before anything is timed: see its docstring


def _profile(config):
    return get_profile(config.getoption("--profile"), bench_device())


def pytest_generate_tests(metafunc):
    config = metafunc.config
    only = config.getoption("--only")
    profile = _profile(config)
    if "loss_case" in metafunc.fixturenames:
        cases = [] if only == "e2e" else list(profile.loss_cases)
        metafunc.parametrize("loss_case", cases, ids=[c.id for c in cases])
    if "e2e_item" in metafunc.fixturenames:
        items = [] if only == "loss" else list(profile.e2e_configs)
        metafunc.parametrize("e2e_item", items, ids=[c.id for c in items])


@pytest.fixture(scope="session")
def bench_profile(request):
    return _profile(request.config)
