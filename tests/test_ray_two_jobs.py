"""Local Ray as users meet it on a shared workstation: two jobs at once, each with its private
instance. Real jobs, real Ray, real MLflow (SQLite).

Its own file because it runs ``alone`` (tests/conftest.py): files with such a test are scheduled
last, when the other xdist worker is down to unit tests and the exclusive lock waits seconds, not
for a job of many minutes to end.
"""

from __future__ import annotations

import subprocess

import pytest
from mlflow.tracking import MlflowClient
from test_train_job import job_command, job_env

pytestmark = pytest.mark.integration


@pytest.mark.alone  # two jobs at once: with a third beside them, their Ray starts would crowd out
def test_two_jobs_at_once_each_finish_in_their_own_run(tmp_path):
    """Two private Ray instances on one machine: Train's placement-group cleaner in each must
    find its own instance ("Found multiple active Ray instances" before the fix)."""
    jobs = [
        subprocess.Popen(
            job_command(tmp_path, "--method", "cam", name=name, epochs=2),
            cwd=tmp_path,
            env=job_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for name in ("left", "right")
    ]
    logs = [job.communicate(timeout=900)[0] for job in jobs]
    for job, log in zip(jobs, logs):
        assert job.returncode == 0, log[-4000:]
        assert "multiple active Ray instances" not in log, log[-4000:]
        assert "Failed to launch PlacementGroupCleaner" not in log, log[-4000:]
        # The one traceback allowed: Ray Train's own warning when its first autoscaler request
        # (5 s timeout) meets a worker process still starting on a loaded machine, which Ray
        # itself calls "safe to ignore" and which has no effect on a fixed local instance.
        assert log.count("Traceback (most recent call last)") == log.count("Failed to send resource request"), log[
            -4000:
        ]
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("synthetic").experiment_id])
    assert sorted(run.info.run_name for run in runs) == ["left", "right"]
    assert all(run.info.status == "FINISHED" for run in runs)
    assert all(len(client.get_metric_history(run.info.run_id, "val/maxboxacc_v2")) == 2 for run in runs)
