"""Shared pytest setup.

The suite runs on two pytest-xdist workers (``-n 2`` in pyproject.toml): an integration test
spends much of its time waiting on process start-ups (Ray's daemons, the Train controller, the
workers), which leaves a 2-core machine about 40 % idle, so two tests at a time finish sooner than
one after the other. A few tests cannot share the machine: they load it on purpose (CPU burners)
or time themselves. They are marked ``alone`` and take an exclusive lock that every other test
takes shared (``flock`` on one file per test run), so they run with nothing beside them; a test
that needs the machine to itself for one step only uses the ``machine_alone`` fixture instead.
Without xdist (``-n 0``) the lock is not taken at all.
"""

from __future__ import annotations

import fcntl
import os
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path

import pytest

# Tests never reach a tracking server by accident.
os.environ.pop("MLFLOW_TRACKING_URI", None)
# Keep torch from oversubscribing the 2-core CI machine when tests run beside Ray workers.
os.environ.setdefault("OMP_NUM_THREADS", "2")


_LOCK_HANDLE = pytest.StashKey()  # the open lock file of the running test, for machine_alone


@pytest.fixture(scope="session")
def _lock_path(tmp_path_factory: pytest.TempPathFactory) -> Path | None:
    """One lock file per test run, shared by its xdist workers (each worker's temporary folder
    lies in the run's one, which pytest removes with its old runs); None when not under xdist."""
    if not os.environ.get("PYTEST_XDIST_WORKER"):
        return None
    return tmp_path_factory.getbasetemp().parent / "machine.lock"


@pytest.fixture(autouse=True)
def _share_the_machine(request: pytest.FixtureRequest, _lock_path: Path | None) -> Iterator[None]:
    path = _lock_path
    if path is None:
        yield
        return
    with path.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX if request.node.get_closest_marker("alone") else fcntl.LOCK_SH)
        request.node.stash[_LOCK_HANDLE] = handle
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


@pytest.fixture
def machine_alone(request: pytest.FixtureRequest) -> Callable[[], AbstractContextManager[None]]:
    """``with machine_alone(): ...`` runs the block with no other test beside it (the shared lock
    is turned into the exclusive one for the block, and back)."""

    @contextmanager
    def alone() -> Iterator[None]:
        handle = request.node.stash.get(_LOCK_HANDLE, None)
        if handle is None:
            yield
            return
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_SH)

    return alone
