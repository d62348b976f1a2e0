"""`ray job submit --working-dir . -- python jobs/train_imagenet.py` against a real `ray start` head."""

from __future__ import annotations

import os
import subprocess
import tempfile
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient
from ray_head import BIN, free_port, job_submit, private_agent_ports, running_head

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[1]


def submit_job(
    command: list[str], env: dict[str, str], timeout: float, temp_dir: str = "", **kwargs
) -> subprocess.CompletedProcess:
    """Run ``ray job submit``, again for two minutes while the head answers that it has no job
    agent yet.

    The dashboard answers before the head's job agent has registered, and the job head waits only
    10 s for one (``WAIT_AVAILABLE_AGENT_TIMEOUT``) before it refuses with "No available agent to
    submit job, please try again later". On a loaded 2-core box the agent can take longer than
    that; the refused submission created no job, so trying again is what Ray asks for. An agent
    that has not come in two minutes will not come: the refusal is returned with the tail of the
    head's ``dashboard_agent.log`` (from ``temp_dir``), which says why.
    """
    deadline = time.time() + 120
    while True:
        result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout, **kwargs)
        if "No available agent" not in result.stdout + result.stderr:
            return result
        if time.time() > deadline:
            logs = sorted(Path(temp_dir).glob("session_*/logs/dashboard_agent.log")) if temp_dir else []
            agent_log = logs[-1].read_text()[-3000:] if logs else "(no dashboard_agent.log found)"
            result.stderr += f"\n--- the head's dashboard_agent.log ---\n{agent_log}"
            return result
        time.sleep(5)


def test_job_submitted_to_a_ray_head_trains_and_records(tmp_path):
    env = dict(os.environ)
    env.pop("RAY_ADDRESS", None)
    env["PATH"] = f"{BIN}:{env['PATH']}"  # the job's `python` is the project's environment
    env["RAY_AUTH_MODE"] = "token"  # a head started by `ray start` requires token auth
    env["RAY_ENABLE_UV_RUN_RUNTIME_ENV"] = "0"  # the cluster already runs the locked environment
    port, dashboard = free_port(), free_port()
    temp_dir = tempfile.mkdtemp(prefix="rayh", dir="/tmp")  # short: Ray's socket paths have a length limit
    start = [
        str(BIN / "ray"),
        "start",
        "--head",
        "--node-ip-address=127.0.0.1",
        f"--port={port}",
        "--dashboard-host=127.0.0.1",
        f"--dashboard-port={dashboard}",
        "--num-cpus=2",
        f"--temp-dir={temp_dir}",
        "--include-dashboard=true",
        *private_agent_ports(),
        "--block",
    ]
    with running_head(start, env, dashboard, temp_dir) as head:
        db = tmp_path / "mlflow.db"
        submit = [
            *job_submit(dashboard),
            "--working-dir",
            str(REPO),
            "--",
            "python",
            "jobs/train_imagenet.py",
            "--method",
            "cam",
            "--epochs",
            "1",
            "--name",
            "submitted",
            "--storage-path",
            str(tmp_path / "ray"),
            "--tracking-uri",
            f"sqlite:///{db}",
            "--set",
            "data.synthetic.num_train=32",
            "--set",
            "data.synthetic.num_val=16",
            "--set",
            "data.synthetic.num_test=16",
            "--set",
            "data.synthetic.size=64",
            "--set",
            f"data.synthetic.cache_dir={tmp_path / 'data'}",
            "--set",
            "data.batch_size=8",
            "--set",
            "eval.batch_size=8",
            "--set",
            "run.cpus_per_worker=0.5",
        ]
        result = submit_job(submit, env, timeout=900, temp_dir=temp_dir, cwd=REPO)
        assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:] + head.report()
        assert "succeeded" in (result.stdout + result.stderr).lower()
        client = MlflowClient(f"sqlite:///{db}")
        runs = client.search_runs([client.get_experiment_by_name("synthetic").experiment_id])
        assert len(runs) == 1 and runs[0].info.status == "FINISHED"
        assert "test/maxboxacc_v2" in runs[0].data.metrics
