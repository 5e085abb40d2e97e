"""Shared pytest configuration.

Hypothesis profiles, picked with the ``HYPOTHESIS_PROFILE`` environment variable:

- ``ci`` (the default): 200 examples per test from a fixed seed (``derandomize``), so a CI run
  is reproducible and a red CI always means the change under test broke something;
- ``dev``: 30 random examples, for quick local iteration;
- ``hunt``: 20,000 random examples per test, to search for new counterexamples before a
  change lands (``HYPOTHESIS_PROFILE=hunt pytest tests/test_rules.py``; slow, since every test
  runs 100 times longer than in ``ci``: ``-k`` picks fewer tests). A counterexample it finds
  goes into the test as an ``@example``.
"""

from __future__ import annotations

import os
import pathlib

import pytest
import torch
from hypothesis import HealthCheck, settings

ROOT = pathlib.Path(__file__).resolve().parents[1]

# These modules test the source tree's benchmarks/ and tools/, which the package does not ship:
# a copy of tests/ run against the installed wheel (CI) has neither folder, and leaves them out.
SOURCE_TREE_TESTS = ["test_architecture.py", "test_benchmark_tasks.py", "test_curvature.py", "test_suite.py"]
collect_ignore = [] if (ROOT / "benchmarks").is_dir() and (ROOT / "tools").is_dir() else SOURCE_TREE_TESTS


def pytest_configure(config: pytest.Config) -> None:
    # Here rather than in pyproject.toml, so that a copy of tests/ run against the installed wheel knows it.
    config.addinivalue_line("markers", "slow: training runs of a few hundred steps (still part of the default run)")


settings.register_profile("dev", max_examples=30, deadline=None)
settings.register_profile(
    "ci",
    max_examples=200,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile(
    "hunt",
    max_examples=20_000,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module of training runs on tiny models, restored afterwards.

    A second thread only adds synchronisation on such models, and on a busy 2-core machine
    spin-waiting threads made these modules 4 to 6 times slower. One thread also makes runs
    identical from run to run. Use it with ``pytestmark = pytest.mark.usefixtures("one_thread")``.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
