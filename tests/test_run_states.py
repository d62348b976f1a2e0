"""Every way a training run ends sets its MLflow status and says how to resume (real Ray, real
MLflow with SQLite, real signals): Ctrl-C (SIGINT to the process group) and SIGTERM mark it
KILLED, a Ray start that fails marks it FAILED; re-running the same command resumes the same run,
also after the driver was killed outright; a killed Ray Train worker is replaced from the newest
checkpoint within the job."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import psutil
import pytest
from test_train_job import TEST_WORKERS, epochs_logged, job_command, job_env, only_run

pytestmark = pytest.mark.integration

EPOCHS = 10  # one stop per epoch's checkpoint (four), with slack for a late signal: on a quiet box an epoch takes 1-2 s


def _checkpoints(run_dir: Path) -> set[str]:
    return {d.name for d in run_dir.glob("checkpoint_*") if (d / "state.pt").is_file()}


def _wait_for_a_new_checkpoint(run_dir: Path, process: subprocess.Popen, seen: set[str], timeout: float = 900) -> None:
    deadline = time.time() + timeout
    while not _checkpoints(run_dir) - seen:
        assert process.poll() is None, process.communicate()[0][-4000:]
        assert time.time() < deadline, "no new checkpoint appeared"
        time.sleep(1)


class Job:
    """The same command started again and again, as a user re-runs it, each time stopped once it
    has saved a checkpoint it had not saved before."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path, self.run_dir = tmp_path, tmp_path / "ray" / "stops"
        self.command = job_command(tmp_path, "--method", "cam", epochs=EPOCHS, name="stops")

    def start(self) -> subprocess.Popen:
        seen = _checkpoints(self.run_dir)
        process = subprocess.Popen(
            self.command,
            cwd=self.tmp_path,
            env=job_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        try:
            _wait_for_a_new_checkpoint(self.run_dir, process, seen)
        except BaseException:
            self.kill(process)
            raise
        return process

    @staticmethod
    def kill(process: subprocess.Popen) -> None:
        """SIGKILL to the job's process group (the driver and its private Ray instance), then wait
        until every process the job had started is gone. Ray puts each worker in a process group
        of its own, so the workers outlive the kill until they notice their raylet's death, and
        one may still save a checkpoint meanwhile (seen in the suite: the next start took that
        checkpoint for its own and looked for its workers before they existed)."""
        if process.poll() is None:
            started = psutil.Process(process.pid).children(recursive=True)
            os.killpg(process.pid, signal.SIGKILL)
            _, alive = psutil.wait_procs(started, timeout=120)
            for leftover in alive:  # never leave a process behind, however long Ray takes
                leftover.kill()
        process.communicate(timeout=60)

    def stop(self, process: subprocess.Popen, send) -> tuple[str, str]:
        try:
            send(process.pid)
            return process.communicate(timeout=180)
        finally:
            if process.poll() is None:
                self.kill(process)


def _ray_train_workers(pid: int) -> list[psutil.Process]:
    return [p for p in psutil.Process(pid).children(recursive=True) if "RayTrainWorker" in " ".join(p.cmdline())]


def test_every_way_a_run_stops_marks_it_and_the_same_command_resumes_it(tmp_path):
    """One run, stopped four ways in turn (each job start costs the suite a minute or more)."""
    job = Job(tmp_path)

    # 1. Ctrl-C: KILLED, and the message says how to resume.
    process = job.start()
    out, err = job.stop(process, lambda pid: os.killpg(pid, signal.SIGINT))
    assert process.returncode == 130, out[-2000:] + err[-3000:]
    _, first = only_run(tmp_path)
    assert first.info.status == "KILLED"
    assert (
        f"[wsol] stopped by SIGINT: MLflow run {first.info.run_id} is marked KILLED; run the same command again" in err
    )
    assert "Traceback" not in err.split("[wsol] stopped by SIGINT")[-1]
    # Not a terminal: plain progress lines, one per epoch's end, and no redrawn bars.
    log = out + err
    steps = 64 // (8 * TEST_WORKERS)  # job_command's 64 training images, batch 8 per worker
    assert log.count(f"[wsol] epoch 1/{EPOCHS} done: {steps} steps in ") == 1, log[-3000:]
    assert "█" not in log and "100%|" not in log

    # 2. SIGTERM (what a scheduler sends) to the resumed job: KILLED again, the same run.
    process = job.start()
    out, err = job.stop(process, lambda pid: os.kill(pid, signal.SIGTERM))
    assert process.returncode == 143, out[-2000:] + err[-3000:]
    _, run = only_run(tmp_path)
    assert run.info.run_id == first.info.run_id and run.info.status == "KILLED"
    assert "(resumed)" in out and "[wsol] stopped by SIGTERM" in err

    # 3. The driver and its Ray instance killed outright: nothing is marked, nothing was tested.
    process = job.start()
    job.kill(process)
    _, run = only_run(tmp_path)
    assert "test/maxboxacc_v2" not in run.data.metrics

    # 4. The same command resumes once more; a Ray Train worker killed mid-run is replaced from the
    # newest checkpoint and the job finishes.
    process = job.start()
    try:
        workers = _ray_train_workers(process.pid)
        assert workers, "no Ray Train worker process found"
        workers[-1].kill()
        out, err = process.communicate(timeout=600)
    finally:
        if process.poll() is None:
            job.kill(process)
    assert process.returncode == 0, out[-4000:] + err[-4000:]
    assert "(resumed)" in out and "resuming at epoch" in out + err
    client, run = only_run(tmp_path)
    assert run.info.run_id == first.info.run_id and run.info.status == "FINISHED"
    steps = epochs_logged(client, run.info.run_id, "train/loss")
    assert steps[0] == 1 and steps[-1] == EPOCHS
    assert epochs_logged(client, run.info.run_id, "val/maxboxacc_v2")[-1] == EPOCHS
    assert "test/maxboxacc_v2" in run.data.metrics


def test_a_ray_start_that_fails_marks_the_run_failed(tmp_path):
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("")
    env = dict(job_env(), RAY_TMPDIR=str(blocker / "ray"))  # Ray cannot create its session folder
    command = [c for c in job_command(tmp_path, "--method", "cam", epochs=1) if c != "job"]
    command = command[: command.index("--name")] + command[command.index("--name") + 1 :]  # no --name: generated
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    _, run = only_run(tmp_path)
    assert run.info.status == "FAILED"
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(
        f"[wsol] MLflow run {run.info.run_id} is marked FAILED; to resume it from its newest checkpoint, "
        f"run the same command with --name {run.info.run_name}"
    ), result.stderr[-2000:]
    assert "NotADirectoryError" in result.stderr
