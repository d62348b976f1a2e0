"""Shared pytest setup.

The suite runs on two pytest-xdist workers (``-n 2 --dist loadfile`` in pyproject.toml): an
integration test spends much of its time waiting on process start-ups (Ray's daemons, the Train
controller and its helper actors, the workers), so two test files at a time finish sooner than one
after the other on a 2-core machine.

* **Order.** xdist hands out test files in collection order. The files that start real jobs go
  first, so that the unit tests, seconds each, fill the end of the run on whichever worker frees
  up first, instead of one worker ending the run alone on a nine-minute job.
* **Tests that cannot share the machine** (two jobs at once, a wall-clock bound) are marked
  ``alone`` and take an exclusive lock that every other test takes shared (``flock`` on one file
  per test run), so nothing runs beside them. Without xdist (``-n 0``) no lock is taken.
"""

from __future__ import annotations

import fcntl
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

# Tests never reach a tracking server by accident.
os.environ.pop("MLFLOW_TRACKING_URI", None)
# Keep torch from oversubscribing the 2-core CI machine when tests run beside Ray workers.
os.environ.setdefault("OMP_NUM_THREADS", "2")


@pytest.fixture(scope="session")
def _lock_path(tmp_path_factory: pytest.TempPathFactory) -> Path | None:
    """One lock file per test run, shared by its xdist workers (each worker's temporary folder
    lies in the run's one, which pytest removes with its old runs); None when not under xdist."""
    if not os.environ.get("PYTEST_XDIST_WORKER"):
        return None
    return tmp_path_factory.getbasetemp().parent / "machine.lock"


@contextmanager
def _held(path: Path, exclusive: bool) -> Iterator[None]:
    with path.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


@pytest.fixture(autouse=True)
def _share_the_machine(request: pytest.FixtureRequest, _lock_path: Path | None) -> Iterator[None]:
    if _lock_path is None:  # not under xdist
        yield
        return
    with _held(_lock_path, exclusive=request.node.get_closest_marker("alone") is not None):
        yield


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Files with integration tests first, the rest after, each keeping its order (see above)."""

    def is_integration(item: pytest.Item) -> bool:
        return item.get_closest_marker("integration") is not None

    heavy_files = {item.path for item in items if is_integration(item)}
    items.sort(key=lambda item: item.path not in heavy_files)  # stable: False (heavy) sorts first
