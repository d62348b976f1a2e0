"""Every way a training run ends sets its MLflow status and says how to resume (real Ray, real
MLflow with SQLite, real signals): Ctrl-C (SIGINT to the process group) and SIGTERM mark it
KILLED, a Ray start that fails marks it FAILED; re-running the same command resumes the same run."""

from __future__ import annotations

import os
import signal
import subprocess

import pytest
from test_train_job import _wait_for_checkpoint, job_command, job_env, only_run

pytestmark = pytest.mark.integration


def _start(tmp_path, name: str, epochs: int = 3, env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen(
        job_command(tmp_path, "--method", "cam", epochs=epochs, name=name),
        cwd=tmp_path,
        env=env or job_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


def _stop(process: subprocess.Popen, tmp_path, name: str, send) -> tuple[str, str]:
    try:
        _wait_for_checkpoint(tmp_path / "ray" / name, process)
        send(process.pid)
        out, err = process.communicate(timeout=180)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.communicate(timeout=60)
    return out, err


def test_ctrl_c_marks_the_run_killed_and_says_how_to_resume(tmp_path):
    process = _start(tmp_path, "interrupted", epochs=6)
    out, err = _stop(process, tmp_path, "interrupted", lambda pid: os.killpg(pid, signal.SIGINT))
    assert process.returncode == 130, out[-2000:] + err[-3000:]
    _, run = only_run(tmp_path)
    assert run.info.status == "KILLED"
    assert f"[wsol] stopped by SIGINT: MLflow run {run.info.run_id} is marked KILLED; run the same command again" in err
    assert "Traceback" not in err.split("[wsol] stopped by SIGINT")[-1]
    # Not a terminal: plain progress lines, one per epoch's end, and no redrawn bars.
    log = out + err
    assert log.count("[wsol] epoch 1/6 done: 4 steps in ") == 1, log[-3000:]
    assert "█" not in log and "100%|" not in log


def test_sigterm_marks_the_run_killed_and_the_same_command_resumes_it(tmp_path):
    process = _start(tmp_path, "terminated")
    out, err = _stop(process, tmp_path, "terminated", lambda pid: os.kill(pid, signal.SIGTERM))
    assert process.returncode == 143, out[-2000:] + err[-3000:]
    _, first = only_run(tmp_path)
    assert first.info.status == "KILLED" and "[wsol] stopped by SIGTERM" in err

    result = subprocess.run(
        job_command(tmp_path, "--method", "cam", epochs=3, name="terminated"),
        cwd=tmp_path,
        env=job_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    _, run = only_run(tmp_path)
    assert run.info.run_id == first.info.run_id and run.info.status == "FINISHED"


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
