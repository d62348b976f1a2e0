"""Through submitit against a real single-node SLURM (cluster/slurm_local.sh): a job, a job array,
a cancellation, a preempted Ray-on-SLURM job requeued into the same run, and the launcher running
the training job's embedded default for one epoch with its MLflow run checked afterwards.

The session fixture starts the daemons (munge, MariaDB, slurmdbd, slurmctld, slurmd) unless they
already run, and stops them at the end if it started them. Skipped only where the SLURM packages
are not installed (`bash cluster/slurm_local.sh install`).
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "cluster" / "slurm_local.sh"
PARTITION = os.environ.get("WSOL_SLURM_PARTITION", "debug")

_DAEMONS = ("munged", "mariadbd", "mariadb-install-db", "slurmdbd", "slurmctld", "slurmd")
_CLIENTS = ("sbatch", "sacct", "sinfo", "scontrol", "squeue", "scancel", "srun")
_missing = [b for b in _DAEMONS if not (shutil.which(b) or Path("/usr/sbin", b).exists())] + [
    b for b in _CLIENTS if not shutil.which(b)
]

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(
        bool(_missing),
        reason=f"SLURM is not installed here ({', '.join(_missing)} missing): run `bash cluster/slurm_local.sh install`",
    ),
]


def _run(*args: str, check: bool = True, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, timeout=timeout, check=check)


@pytest.fixture(scope="session")
def slurm():
    """A running local SLURM; SLURM_CONF set for this process and the jobs it submits."""
    if os.geteuid() != 0:
        pytest.fail("the SLURM tests start munged, MariaDB and the SLURM daemons: run them as root (as CI does)")
    was_running = _run("status", check=False).returncode == 0
    started = _run("start", check=False)
    if started.returncode != 0:
        pytest.fail(f"cluster/slurm_local.sh start failed:\n{started.stdout}\n{started.stderr}")
    conf = re.search(r"export SLURM_CONF=(\S+)", started.stdout)
    assert conf, started.stdout
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SLURM_CONF", conf[1])
        yield conf[1]
    if not was_running:
        stopped = _run("stop", check=False)
        assert stopped.returncode == 0, stopped.stdout + stopped.stderr
        assert "munged" in _run("status", check=False).stdout


@pytest.fixture(autouse=True)
def _cancel_leftover_jobs(request):
    """A test that fails mid-job leaves its job running on the only node, where it would hold the
    CPUs the next test's job waits for: cancel whatever this test left in the queue."""
    yield
    if "slurm" in request.fixturenames:
        import getpass

        subprocess.run(["scancel", "--user", getpass.getuser()], capture_output=True, check=False)


def _executor(folder: Path, **params):
    import submitit

    executor = submitit.SlurmExecutor(folder=str(folder))
    executor.update_parameters(partition=PARTITION, time=5, cpus_per_task=1, **params)
    return executor


def _state(job_id: str) -> str:
    out = subprocess.run(
        ["sacct", "-j", job_id, "-X", "-n", "-P", "-o", "State"], capture_output=True, text=True, check=True
    ).stdout
    return out.strip().splitlines()[0].split()[0] if out.strip() else "UNKNOWN"


def _wait_state(job_id: str, states: set[str], timeout_s: float = 60) -> str:
    deadline = time.monotonic() + timeout_s
    while (state := _state(job_id)) not in states:
        assert time.monotonic() < deadline, f"job {job_id} still {state}, expected one of {states}"
        time.sleep(0.5)
    return state


def test_job(slurm, tmp_path):
    job = _executor(tmp_path / "%j").submit(os.getenv, "SLURM_JOB_ID")
    assert job.result() == job.job_id  # it ran inside SLURM, as that job
    assert _wait_state(job.job_id, {"COMPLETED"}, 60) == "COMPLETED"  # accounting lags a little
    job.watcher.update()
    assert job.state == "COMPLETED"  # submitit's own view, through sacct


def test_job_array(slurm, tmp_path):
    executor = _executor(tmp_path / "%j", array_parallelism=2)
    jobs = executor.map_array(math.factorial, [3, 4, 5])
    assert [j.result() for j in jobs] == [6, 24, 120]
    array_id = jobs[0].job_id.split("_")[0]
    assert [j.job_id for j in jobs] == [f"{array_id}_{i}" for i in range(3)]
    for job in jobs:
        assert _wait_state(job.job_id, {"COMPLETED"}, 60) == "COMPLETED"


def test_cancellation(slurm, tmp_path):
    job = _executor(tmp_path / "%j").submit(time.sleep, 300)
    _wait_state(job.job_id, {"RUNNING"})
    job.cancel(check=True)
    assert _wait_state(job.job_id, {"CANCELLED", "CANCELLED+"}, 60).startswith("CANCELLED")
    job.watcher.update()
    assert job.done(force_check=True) and job.state.startswith("CANCELLED")  # submitit sees it ended


def test_missing_partition_against_the_real_sinfo(slurm):
    out = subprocess.run(
        [sys.executable, str(ROOT / "cluster" / "launch_slurm.py"), "--partition", "no-such-partition", "--no-precheck", "jobs/train_imagenet.py"],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert out.returncode == 2
    assert "partition 'no-such-partition' does not exist on this cluster; available: " + PARTITION in out.stderr
    assert "Traceback" not in out.stderr


def test_preempted_ray_job_is_requeued_into_the_same_run(slurm, tmp_path):
    """USR2 (as at the time limit): checkpoint() stops the driver with SIGINT, stops Ray and
    requeues; the requeued job (same job id) runs the same command with the same pinned run."""
    sys.path.insert(0, str(ROOT))
    from cluster.launch_slurm import prepare

    out = tmp_path / "attempts.jsonl"
    ray_tmp = tempfile.mkdtemp(prefix="wr", dir="/tmp")  # short: Ray's socket paths must stay under 108 bytes
    _args, _entry, executor, job_fn = prepare(
        [
            "--partition", PARTITION, "--cpus-per-node", "1", "--time", "10", "--signal-delay-s", "60", "--no-ray-dashboard",
            "--folder", str(tmp_path / "logs" / "%j"), "--storage-path", str(tmp_path / "runs"), "--ray-temp-root", ray_tmp,
            "cluster/ray_smoke.py", "--out", str(out), "--sleep", "600", "--first-attempt-only",
        ]
    )  # fmt: skip
    job = executor.submit(job_fn)
    deadline = time.monotonic() + 300  # a busy node gives Ray's raylet up to 120 s to register
    while not (out.exists() and out.read_text().strip()):
        assert time.monotonic() < deadline, (
            f"the driver never started; log:\n{_tail(job.paths.stdout)}\n{_tail(job.paths.stderr)}"
        )
        assert _state(job.job_id) in {"PENDING", "RUNNING", "UNKNOWN"}, _tail(job.paths.stderr)
        time.sleep(1)
    job._interrupt(timeout=True)  # scancel --signal USR2, what SLURM sends --signal-delay-s before the limit
    # SLURM holds a requeued job back (BeginTime) for a while: let it start now.
    deadline = time.monotonic() + 60
    while True:
        reason = subprocess.run(
            ["squeue", "-h", "-j", job.job_id, "-o", "%T %r"], capture_output=True, text=True, check=False
        ).stdout.split()
        if reason and reason[0] == "PENDING":
            # slurmd revokes the old allocation's credential at the requeue, with one-second
            # resolution: a restart within that second is killed ("Job credential revoked").
            time.sleep(3)
            subprocess.run(["scontrol", "update", f"JobId={job.job_id}", "StartTime=now"], check=True)
            break
        assert time.monotonic() < deadline, f"job {job.job_id} was not requeued: {reason}\n{_tail(job.paths.stdout)}"
        time.sleep(0.5)
    result = job.result()
    attempts = [json.loads(line) for line in out.read_text().splitlines()]
    first, interrupted, second = attempts  # exactly three records
    name = f"slurm-{job.job_id}"
    assert first["name"] == name and first["restart"] == "0" and first["auth_mode"] == "token"
    assert first["ray_address"].startswith("127.0.0.1:")  # a one-node cluster binds loopback only
    assert interrupted == {"interrupted": True, "name": name, "restart": "0"}  # SIGINT reached the driver
    assert second["name"] == name and second["restart"] == "1"
    assert first["storage_path"] == second["storage_path"] == str(tmp_path / "runs")
    assert result["run_name"] == name and result["returncode"] == 0
    log = job.paths.stdout.read_text()
    assert "Requeued job" in log and "checkpoint: stopping the entry point" in log
    assert list((tmp_path / "logs" / job.job_id).glob("*_ray_node0.log"))  # per-node Ray logs in the submitit folder
    assert not list(Path(ray_tmp).iterdir())  # Ray's session files removed after each attempt
    shutil.rmtree(ray_tmp, ignore_errors=True)


def _tail(path: Path, n: int = 40) -> str:
    try:
        return "\n".join(Path(path).read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return f"({path} not written)"


def test_launcher_trains_one_epoch_into_mlflow(slurm, tmp_path):
    """The CLI as a user types it: the training job's embedded default, one epoch, one node (on the
    smaller synthetic split every other test job trains on)."""
    from mlflow.tracking import MlflowClient

    tracking = f"sqlite:///{tmp_path / 'mlflow.db'}"
    argv = [
        sys.executable, str(ROOT / "cluster" / "launch_slurm.py"),
        "--partition", PARTITION, "--cpus-per-node", str(os.cpu_count() or 2), "--time", "15", "--no-ray-dashboard", "--wait",
        "--folder", str(tmp_path / "logs" / "%j"), "--storage-path", str(tmp_path / "runs"), "--tracking-uri", tracking,
        "--", "jobs/train_imagenet.py", "--epochs", "1",
        "--set", "data.synthetic.num_train=64", "--set", "data.synthetic.num_val=24", "--set", "data.synthetic.num_test=24",
        "--set", "data.synthetic.size=64", "--set", "data.batch_size=8",
    ]  # fmt: skip
    out = subprocess.run(argv, capture_output=True, text=True, timeout=600, cwd=ROOT, check=False)
    submitted = re.search(r"submitted job (\d+)", out.stdout)
    logs = ""
    if submitted:
        folder = tmp_path / "logs" / submitted[1]
        logs = "\n".join(
            f"--- {p.name}\n{_tail(p, 60)}" for p in sorted(folder.glob("*.out")) + sorted(folder.glob("*.err"))
        )
    assert out.returncode == 0, f"the launcher failed (rc {out.returncode}):\n{out.stdout}\n{out.stderr}\n{logs}"
    job_id = submitted[1]
    assert _wait_state(job_id, {"COMPLETED"}, 60) == "COMPLETED"
    name = f"slurm-{job_id}"

    client = MlflowClient(tracking)
    runs = client.search_runs(
        [e.experiment_id for e in client.search_experiments()], filter_string=f"attributes.run_name = '{name}'"
    )
    assert len(runs) == 1, f"expected one MLflow run named {name}, got {[r.info.run_name for r in runs]}"
    run = runs[0]
    assert run.info.status == "FINISHED"
    assert run.data.params.get("run.name") == name
    assert run.data.params.get("run.storage_path") == str(tmp_path / "runs")
    assert any(key.startswith("val/") for key in run.data.metrics), run.data.metrics
    assert (tmp_path / "runs" / name).is_dir()  # Ray Train's checkpoints under the pinned storage path
