"""MLflow glue (wsol_core/tracking.py): runs found again by key, and a fresh SQLite store shared by
processes that start at the same moment (a sweep's trials, two shells)."""

from __future__ import annotations

import multiprocessing as mp

import pytest
from mlflow.tracking import MlflowClient

from wsol_core.tracking import start_or_resume_run


def _start(uri: str, key: str, barrier, queue) -> None:
    try:
        barrier.wait(timeout=60)
        queue.put(("ok", key, start_or_resume_run(uri, "shared", key, run_name=key)[0]))
    except Exception as err:  # reported to the parent, which fails the test with it
        queue.put(("error", key, f"{type(err).__name__}: {err}"))


@pytest.mark.integration
def test_concurrent_first_use_of_a_sqlite_store(tmp_path):
    # Without the store lock, MLflow's schema migrations race and one process fails with
    # "Online migration expected to match one row", and experiment creation races too.
    uri = f"sqlite:///{tmp_path}/fresh/mlflow.db"
    ctx = mp.get_context("spawn")
    barrier, queue = ctx.Barrier(4), ctx.Queue()
    procs = [ctx.Process(target=_start, args=(uri, f"run-{i}", barrier, queue)) for i in range(4)]
    for p in procs:
        p.start()
    results = [queue.get(timeout=180) for _ in procs]
    for p in procs:
        p.join(timeout=60)
    assert [r for r in results if r[0] != "ok"] == []
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("shared")
    runs = client.search_runs([experiment.experiment_id])
    assert sorted(r.info.run_name for r in runs) == [f"run-{i}" for i in range(4)]


def test_run_key_resumes_the_same_run(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    first, resumed = start_or_resume_run(uri, "e", "storage/name", run_name="name")
    assert not resumed
    MlflowClient(uri).set_terminated(first, status="KILLED")
    again, resumed = start_or_resume_run(uri, "e", "storage/name", run_name="name")
    assert resumed and again == first and MlflowClient(uri).get_run(first).info.status == "RUNNING"
