"""Shared pytest setup.

The suite runs on two pytest-xdist workers (``-n 2 --dist loadfile`` in pyproject.toml): an
integration test spends much of its time waiting on process start-ups (Ray's daemons, the Train
controller and its helper actors, the workers), so two test files at a time finish sooner than one
after the other on a 2-core machine.

* **Order.** xdist hands out test files in collection order (``--no-loadscope-reorder``; its
  default would sort files by their number of tests). The slowest files go first
  (:data:`SLOWEST_FIRST`, measured), then the other files with integration tests, then the unit
  tests, seconds each, which fill the end of the run on whichever worker frees up first, instead
  of one worker ending the run alone on a long job. Files with an ``alone`` test go last, when
  the other worker is down to unit tests and the exclusive lock waits seconds.
* **Tests that cannot share the machine** (two jobs at once, a wall-clock bound) are marked
  ``alone`` and take an exclusive lock that every other test takes shared (``flock`` on one file
  per test run), so nothing runs beside them. Without xdist (``-n 0``) no lock is taken.
"""

from __future__ import annotations

import fcntl
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

# Tests never reach a tracking server by accident.
os.environ.pop("MLFLOW_TRACKING_URI", None)
# The pytest workers run under `uv run pytest`, and Ray starts every worker of a driver that runs
# under `uv run` through `uv run` again (its uv hook), in a copy of the repository packed as the
# job's working directory, where uv builds a fresh virtualenv for each worker (about 30 s of CPU
# each). The jobs turn the hook off before importing Ray (`wsol_core/train/ray_session.py`), but Ray
# reads the switch once, on import, and a pytest worker has imported Ray long before a test starts
# Ray in process (the evaluation on two Ray workers: 171 s of CPU in the suite, 54 s without the
# hook; BENCHMARKS.md, "Where the suite's CPU goes").
os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
# One OpenMP thread per process: the suite runs two pytest workers (and their jobs' Ray workers) on
# a 2-core machine, and torch's OpenMP threads spin-wait at every parallel region, so two threads
# per process there made small CPU steps 25-50x slower (a 30-step smoke fit: 1 s alone, 57 s
# beside the other pytest worker; BENCHMARKS.md "The suite on two workers"). It is also what Ray
# gives a 1-CPU worker when the variable is unset, and it reaches every job a test starts.
os.environ.setdefault("OMP_NUM_THREADS", "1")
try:  # OpenMP also accepts a nested list ("4,2"): its first level is torch's
    _SESSION_TORCH_THREADS: int | None = max(1, int(os.environ["OMP_NUM_THREADS"].split(",")[0]))
except ValueError:
    _SESSION_TORCH_THREADS = None  # a value torch reads its own way: leave it alone


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


@pytest.fixture(autouse=True)
def _torch_threads_as_the_session_set_them() -> Iterator[None]:
    """Tests that call a benchmark's ``main`` in process (``torch.set_num_threads``) hand the
    pytest worker back with the thread count it had."""
    yield
    torch = sys.modules.get("torch")
    if torch is not None and _SESSION_TORCH_THREADS and torch.get_num_threads() != _SESSION_TORCH_THREADS:
        torch.set_num_threads(_SESSION_TORCH_THREADS)


@pytest.fixture(autouse=True)
def _no_ray_left_running_in_the_worker() -> Iterator[None]:
    """Shut down a Ray that a test started inside the pytest worker itself (the evaluation on two
    Ray workers calls ``evaluate_checkpoint``, which starts a private instance and, as a library
    call, leaves it to its caller), and restore the ``RAY_ADDRESS`` that ``init_ray`` set. Left
    running, that instance (a dashboard with nine module processes, agents, a finished fit's
    controller and helpers) spent about 120 CPU-s over the next 870 s of one suite run, measured
    by process on 2026-12-03; Ray's log threads in a pytest worker also raised in unrelated tests
    of that run ("Missing :authority header"), most likely this instance's."""
    address = os.environ.get("RAY_ADDRESS")
    yield
    ray = sys.modules.get("ray")  # never import Ray for a test that did not
    if ray is not None and ray.is_initialized():
        ray.shutdown()
    if address is None:
        os.environ.pop("RAY_ADDRESS", None)
    else:
        os.environ["RAY_ADDRESS"] = address


@pytest.fixture(scope="session")
def _shared_ray_head() -> Iterator[dict]:
    from ray_head import shared_head

    with shared_head() as address:
        yield {"address": address, "left_held": None}


@pytest.fixture
def ray_head(_shared_ray_head: dict) -> Iterator[str]:
    """The Ray head that this pytest worker's training jobs join (``job_env(ray_head)`` in
    ``tests/test_train_job.py``): started on the first test that asks for it, stopped at the end of
    the session (``tests/ray_head.py`` says which tests keep their own instance, and why).

    A test that leaves CPUs of the head held (placement groups that outlived their job) fails at
    its teardown with ``ray status``, and every later test that asks for the head fails at once
    with the same text, instead of waiting on the held CPUs until its timeout."""
    from ray_head import wait_until_free

    head = _shared_ray_head
    if head["left_held"] is not None:
        pytest.fail(f"the shared Ray head is unusable: {head['left_held']}")
    yield head["address"]
    held = wait_until_free(head["address"])
    if held is not None:
        head["left_held"] = f"a test left its CPUs held; `ray status`:\n{held}"
        pytest.fail(head["left_held"])


#: The files whose tests take longest together, slowest first (BENCHMARKS.md, "The suite on two
#: workers": each about 5-16 min on the shared 2-core box).
SLOWEST_FIRST = (
    "test_search.py",
    "test_resume_damaged.py",
    "test_run_states.py",
    "test_ray_reliability.py",
    "test_extract_boxes.py",
    "test_fail_fast.py",
    "test_gpu_kit.py",
    "test_sweep.py",
    "test_train_job.py",
    "test_cluster_slurm.py",
    "test_localize.py",
    "test_ray_job_submit.py",
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The order the module docstring gives; stable, so each file keeps its own order."""
    integration = {item.path for item in items if item.get_closest_marker("integration")}
    alone = {item.path for item in items if item.get_closest_marker("alone")}

    def rank(item: pytest.Item) -> tuple[int, int]:
        if item.path in alone:
            return (3, 0)
        if item.path.name in SLOWEST_FIRST:
            return (0, SLOWEST_FIRST.index(item.path.name))
        return (1, 0) if item.path in integration else (2, 0)

    items.sort(key=rank)
