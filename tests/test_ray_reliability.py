"""Local Ray as users meet it on a shared workstation: a start on a machine so busy that Ray's
processes miss their start-up window (two jobs at once: ``tests/test_ray_two_jobs.py``). Real
jobs, real Ray, real MLflow (SQLite).

A starved start is made certain rather than likely: the test freezes the job's raylet (SIGSTOP) as
soon as it appears, which is what a raylet that gets no CPU looks like to Ray; the retry's raylet
is left alone, or frozen too when the start must fail. (Earlier versions also ran CPU burners
beside the job; the frozen raylet alone decides the outcome, and the burners slowed whatever test
ran on the other xdist worker, so they are gone.)
"""

from __future__ import annotations

import re
import signal
import subprocess
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import psutil
import pytest
from test_train_job import job_command, job_env, only_run

pytestmark = pytest.mark.integration

STILL_STARTING = re.compile(r"\[wsol\] Ray is still starting: (the machine is busy \()?load \d+\.\d on \d+ cores")


class RayletFreezer:
    """SIGSTOP the first ``how_many`` raylets a job starts, as soon as each appears, and count
    all the raylets it starts (not the fork children a raylet makes on its way to a worker)."""

    def __init__(self, job: subprocess.Popen, how_many: int) -> None:
        self.job, self.how_many = job, how_many
        self.seen: list[int] = []
        self.frozen: list[int] = []
        self.done = threading.Event()
        self.watcher = threading.Thread(target=self._watch, daemon=True)
        self.watcher.start()

    def _watch(self) -> None:
        parent = psutil.Process(self.job.pid)
        while not self.done.is_set():
            try:
                for child in parent.children(recursive=True):
                    # A raylet starts its workers by fork + exec; caught between the two, the child
                    # is named "raylet" too. CI saw one (3 raylets counted for 2 starts): count only
                    # raylets whose parent is not a raylet.
                    if child.pid not in self.seen and child.name() == "raylet" and child.ppid() not in self.seen:
                        self.seen.append(child.pid)
                        if len(self.frozen) < self.how_many:
                            child.send_signal(signal.SIGSTOP)
                            self.frozen.append(child.pid)
            except psutil.Error:
                pass
            time.sleep(0.05)

    def stop(self) -> None:
        self.done.set()
        self.watcher.join()
        for pid in self.frozen:  # a leftover the job did not stop would be a bug; don't leave it frozen
            try:
                psutil.Process(pid).kill()
            except psutil.Error:
                pass


@contextmanager
def starved_job(tmp_path: Path, attempts: int):
    """The job started with its first raylet frozen; ``(job, freezer)``. The watcher and any
    raylet left frozen are stopped on the way out."""
    env = job_env() | {"WSOL_RAY_START_ATTEMPTS": str(attempts), "WSOL_RAY_START_REPORT_S": "5"}
    job = subprocess.Popen(
        job_command(tmp_path, "--method", "cam", epochs=1),
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    freezer = RayletFreezer(job, how_many=1)
    try:
        yield job, freezer
    finally:
        freezer.stop()


def test_a_starved_ray_start_says_so_and_is_tried_again(tmp_path):
    """The first start meets a raylet that never gets to run; the second start comes up and trains."""
    with starved_job(tmp_path, attempts=2) as (job, freezer):
        out, err = job.communicate(timeout=900)
    assert job.returncode == 0, out[-3000:] + err[-3000:]
    assert len(freezer.seen) == 2, f"the job started {len(freezer.seen)} raylet(s), expected 2"
    assert not psutil.pid_exists(freezer.frozen[0]), "the failed attempt's raylet was not stopped"
    assert STILL_STARTING.search(err), err[-3000:]
    assert "(attempt 1 of 2)" in err and "[wsol] Ray did not start (The current node timed out during startup" in err, (
        err[-3000:]
    )
    assert "trying again in 5 s (attempt 2 of 2)" in err, err[-3000:]
    _, run = only_run(tmp_path)
    assert run.info.status == "FINISHED"


def test_a_ray_start_that_never_comes_up_fails_with_what_to_do(tmp_path):
    with starved_job(tmp_path, attempts=1) as (job, freezer):
        out, err = job.communicate(timeout=600)
    assert job.returncode == 75, out[-3000:] + err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    message = err.strip().splitlines()
    assert message[-2].startswith("error: could not start a local Ray instance in 1 attempt(s)"), err[-3000:]
    assert "WSOL_RAY_START_ATTEMPTS=3" in message[-2] and "--ray-address or RAY_ADDRESS" in message[-2]
    _, run = only_run(tmp_path)
    assert run.info.status == "FAILED"
    assert message[-1].startswith(f"[wsol] MLflow run {run.info.run_id} is marked FAILED"), err[-3000:]
    assert len(freezer.seen) == 1 and not psutil.pid_exists(freezer.seen[0])


def test_the_attempt_count_is_checked(monkeypatch):
    from wsol_core.train.ray_session import ATTEMPTS_ENV, RayStartError, _positive_int

    monkeypatch.setenv(ATTEMPTS_ENV, "zero")
    with pytest.raises(
        RayStartError, match=r"WSOL_RAY_START_ATTEMPTS='zero': expected a whole number of attempts, at least 1"
    ):
        _positive_int(ATTEMPTS_ENV, 3)
    monkeypatch.setenv(ATTEMPTS_ENV, "4")
    assert _positive_int(ATTEMPTS_ENV, 3) == 4


def test_a_private_instance_pins_its_address_and_turns_the_preemption_watcher_off(monkeypatch):
    from wsol_core.train.ray_session import PREEMPTION_WATCHER_ENV, private_runtime_env

    monkeypatch.delenv(PREEMPTION_WATCHER_ENV, raising=False)
    assert private_runtime_env("10.0.0.1:6380") == {
        "env_vars": {"RAY_ADDRESS": "10.0.0.1:6380", "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0"}
    }
    monkeypatch.setenv(PREEMPTION_WATCHER_ENV, "1")  # the user's choice wins
    assert private_runtime_env("10.0.0.1:6380")["env_vars"][PREEMPTION_WATCHER_ENV] == "1"


_IDLE_WORKERS = """
import os, time, psutil
from wsol_core.train.ray_session import init_ray
init_ray(None)
raylet = next(p for p in psutil.Process().children(recursive=True) if p.name() == "raylet")
time.sleep(6)  # a raylet prestarts its workers as the first driver registers: within a second here
workers = [p for p in raylet.children() if "default_worker" in " ".join(p.cmdline()) or p.name().startswith("ray::IDLE")]
print(len(workers), raylet.environ().get("RAY_prestart_worker_first_driver"), os.environ.get("RAY_prestart_worker_first_driver"))
"""


def test_a_private_instance_starts_no_idle_workers_it_cannot_use(tmp_path):
    """Real Ray: the raylet of a private instance is started with worker prestart off, so no idle
    Python worker is started for the job (one per CPU with Ray's default), and the driver's own
    environment is as it was; a value the user sets wins."""
    import sys

    env = dict(job_env(), RAY_ENABLE_UV_RUN_RUNTIME_ENV="0")
    env.pop("RAY_prestart_worker_first_driver", None)
    done = subprocess.run([sys.executable, "-c", _IDLE_WORKERS], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split() == ["0", "0", "None"]
    env["RAY_prestart_worker_first_driver"] = "1"
    done = subprocess.run([sys.executable, "-c", _IDLE_WORKERS], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    idle, in_raylet, in_driver = done.stdout.split()
    assert int(idle) >= 1 and in_raylet == in_driver == "1"
