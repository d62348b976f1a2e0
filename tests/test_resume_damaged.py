"""Resuming survives a damaged checkpoint (issue 21): checked before the workers start, named,
and the newest good checkpoint used; written atomically so a kill mid-save leaves none half-written.

Unit tests on real files first, then the training job on a real local Ray (2 CPU workers) and a
real MLflow (SQLite), as a user runs it.
"""

from __future__ import annotations

import copy
import json
import os
import resource
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_train_job import TEST_WORKERS, job_env, used_ray

from wsol_core.checkpoint import (
    MANIFEST_FILE,
    STATE_FILE,
    DamagedCheckpointError,
    TrainingState,
    _write_atomically,
    save_training_state,
    verify_checkpoint,
)
from wsol_core.config import ConfigError, load_config, read_through_schema, to_dict
from wsol_core.train.resume import pick_checkpoint, plan_resume

REPO = Path(__file__).resolve().parents[1]
CONFIG = to_dict(load_config())


def state(epoch: int, config: dict | None = None, run_id: str = "run-1") -> TrainingState:
    return TrainingState(
        epoch=epoch,
        model={"w": torch.full((64, 64), float(epoch))},
        optimizer={"state": {}, "param_groups": []},
        scheduler={},
        config=config or CONFIG,
        mlflow_run_id=run_id,
    )


def checkpoint(run_dir: Path, epoch: int, **kwargs) -> Path:
    directory = run_dir / f"checkpoint_2026-11-30_00-00-{epoch:02d}.000000"
    directory.mkdir(parents=True)
    save_training_state(directory, state(epoch, **kwargs))
    os.utime(directory, (1_000_000 + epoch, 1_000_000 + epoch))  # newer epochs are newer directories
    return directory


def truncate(directory: Path, keep: int = 100) -> None:
    path = directory / STATE_FILE
    path.write_bytes(path.read_bytes()[:keep])


def test_every_kind_of_damage_is_named(tmp_path):
    good = checkpoint(tmp_path, 1)
    info = verify_checkpoint(good, config=CONFIG, mlflow_run_id="run-1")
    assert info.epoch == 1 and json.loads((good / MANIFEST_FILE).read_text())["epoch"] == 1

    cut = checkpoint(tmp_path, 2)
    truncate(cut)
    with pytest.raises(DamagedCheckpointError, match=r"state\.pt: 100 bytes, its manifest says \d+ \(truncated"):
        verify_checkpoint(cut)
    flipped = checkpoint(tmp_path, 3)
    data = bytearray((flipped / STATE_FILE).read_bytes())
    data[len(data) // 2] ^= 0xFF
    (flipped / STATE_FILE).write_bytes(bytes(data))
    with pytest.raises(DamagedCheckpointError, match="SHA-256 differs"):
        verify_checkpoint(flipped)
    unmanifested = checkpoint(tmp_path, 4)
    (unmanifested / MANIFEST_FILE).unlink()
    truncate(unmanifested)
    with pytest.raises(DamagedCheckpointError, match=r"does not load with torch\.load\(weights_only=True\)"):
        verify_checkpoint(unmanifested)
    with pytest.raises(DamagedCheckpointError, match=r"another config \(method\."):
        verify_checkpoint(good, config=to_dict(load_config(overrides=["method.name=cam"])))
    longer = to_dict(load_config(overrides=["run.num_workers=4", "train.epochs=9"]))
    assert verify_checkpoint(good, config=longer).epoch == 1  # where it runs and how long it trains may change
    with pytest.raises(DamagedCheckpointError, match="belongs to MLflow run run-1, not run-2"):
        verify_checkpoint(good, mlflow_run_id="run-2")
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    torch.save({"weights": torch.zeros(2)}, foreign / STATE_FILE)
    with pytest.raises(DamagedCheckpointError, match="not a training state of this project"):
        verify_checkpoint(foreign)


def test_plan_takes_the_newest_good_checkpoint_and_stops_when_none_is(tmp_path):
    run = tmp_path / "run"
    checkpoint(run, 1)
    second = checkpoint(run, 2)
    third = checkpoint(run, 3)
    truncate(third)
    plan = plan_resume(run, CONFIG)
    assert plan.checkpoint.path == second and plan.checkpoint.epoch == 2
    assert [p for p, _ in plan.damaged] == [str(third)] and "truncated" in plan.damaged[0][1]
    assert set(plan.present) == {p.name for p in run.iterdir()}
    assert "is damaged" in plan.describe()[0] and "resuming from" in plan.describe()[-1]
    assert (
        plan_resume(run, CONFIG, resume_from=str(run / "checkpoint_2026-11-30_00-00-01.000000")).checkpoint.epoch == 1
    )
    with pytest.raises(ConfigError, match="run.resume_from: .*truncated"):
        plan_resume(run, CONFIG, resume_from=str(third))
    for directory in run.iterdir():
        truncate(directory)
    with pytest.raises(
        ConfigError, match=r"every checkpoint of the run .* is damaged(.|\n)*--resume-from(.|\n)*--no-resume"
    ):
        plan_resume(run, CONFIG)
    assert plan_resume(tmp_path / "never-ran", CONFIG).checkpoint is None


def test_workers_take_the_drivers_choice_unless_their_own_fit_wrote_a_newer_one():
    plan = {"checkpoint": "/runs/a/checkpoint_1", "present": ["checkpoint_1", "checkpoint_2"]}
    assert pick_checkpoint("/runs/a/checkpoint_2", plan) == "/runs/a/checkpoint_1"  # Ray's latest is the damaged one
    assert pick_checkpoint(None, plan) == "/runs/a/checkpoint_1"
    assert (
        pick_checkpoint("/runs/a/checkpoint_3", plan) == "/runs/a/checkpoint_3"
    )  # written after a failure in this fit
    assert pick_checkpoint(None, {"checkpoint": None, "present": []}) is None
    assert pick_checkpoint("/x/checkpoint_9", None) == "/x/checkpoint_9"


def test_a_write_that_dies_leaves_the_old_file_and_no_temporary(tmp_path):
    target = tmp_path / STATE_FILE
    target.write_bytes(b"old")

    def half_then_die(tmp: Path) -> None:
        tmp.write_bytes(b"half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        _write_atomically(target, half_then_die)
    assert target.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == [STATE_FILE]


@pytest.mark.integration
def test_evaluate_and_pretrained_name_a_truncated_checkpoint(tmp_path):
    directory = checkpoint(tmp_path, 1)
    truncate(directory)
    done = subprocess.run(
        [sys.executable, str(REPO / "jobs" / "evaluate.py"), "--checkpoint", str(directory), "--data", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2 and str(directory / STATE_FILE) in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1 and "Traceback" not in done.stderr
    from wsol_core.train.preflight import check_pretrained

    with pytest.raises(ConfigError, match=r"model\.pretrained: .*state\.pt: .*truncated"):
        check_pretrained(load_config(overrides=[f"model.pretrained={directory}"]))
    weights = tmp_path / "vgg16.pth"
    weights.write_bytes(b"PK\x03\x04 not a zip")
    with pytest.raises(ConfigError, match=r"model\.pretrained = .*vgg16\.pth.*does not load"):
        check_pretrained(load_config(overrides=[f"model.pretrained={weights}"]))


# ---------------------------------------------------------------------------------------------
# The training job on a real Ray
# ---------------------------------------------------------------------------------------------


def job(
    tmp_path: Path, *extra: str, ray_address: str | None, env: dict | None = None, timeout: int = 600
) -> subprocess.CompletedProcess:
    command = [
        sys.executable,
        str(REPO / "jobs" / "train_imagenet.py"),
        "--name",
        "corr1",
        "--epochs",
        "2",
        "--storage-path",
        str(tmp_path / "ray"),
        "--tracking-uri",
        f"sqlite:///{tmp_path / 'mlflow.db'}",
        "--set",
        "data.synthetic.num_train=64",
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
        "eval.batch_size=16",
        "--set",
        "eval.num_vis_images=0",
        "--set",
        "train.keep_best=3",
        "--set",
        f"run.num_workers={TEST_WORKERS}",
        *extra,
    ]
    full_env = job_env(ray_address) | (env or {})
    return subprocess.run(command, cwd=tmp_path, env=full_env, capture_output=True, text=True, timeout=timeout)


def runs(tmp_path: Path):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    return client, client.search_runs([client.get_experiment_by_name("synthetic").experiment_id])


def cpu_seconds_of_children() -> float:
    """CPU time of this process's finished children (and theirs, once each was waited for)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def by_epoch(run_dir: Path) -> dict[int, Path]:
    from wsol_core.checkpoint import load_training_state

    return {load_training_state(d).epoch: d for d in run_dir.glob("checkpoint_*") if (d / STATE_FILE).is_file()}


@pytest.mark.integration
def test_a_kill_mid_save_then_damaged_checkpoints_resume_cleanly_or_stop_before_ray(tmp_path, ray_head):
    """One run, harmed three ways in turn (each training job costs the suite a minute or more): a
    worker killed while it writes epoch 2's checkpoint, which leaves nothing half-written and a run
    that resumes; then the newest checkpoint damaged, which the resume skips for the previous one;
    then every checkpoint damaged, which stops the job before Ray with the list."""
    run_dir = tmp_path / "ray" / "corr1"
    marker = tmp_path / "killed"
    inject = {
        "PYTHONPATH": os.pathsep.join(
            [str(REPO / "tests" / "fixtures" / "kill_during_save"), os.environ.get("PYTHONPATH", "")]
        ),
        "WSOL_TEST_KILL_SAVE_EPOCH": "2",
        "WSOL_TEST_KILL_SAVE_MARKER": str(marker),
    }
    # On a private instance: its workers inherit the driver's environment, which carries the kill
    # (a shared head's workers have the head's); the resumes after it join the shared head.
    killed = job(tmp_path, "--set", "run.max_failures=0", ray_address=None, env=inject)
    assert marker.exists(), killed.stdout[-3000:] + killed.stderr[-3000:]  # the worker died inside torch.save
    assert killed.returncode != 0
    assert set(by_epoch(run_dir)) == {1}  # nothing half-written reached the run's storage
    assert not list(run_dir.rglob("*.tmp*"))
    client, found = runs(tmp_path)
    logged_before_the_kill = [m.step for m in client.get_metric_history(found[0].info.run_id, "train/loss")]
    assert 1 in logged_before_the_kill  # (2 as well when the loss reached MLflow before the save died)
    first = job(tmp_path, ray_address=ray_head)
    out = first.stdout + first.stderr
    assert first.returncode == 0, out[-4000:]
    assert "is damaged" not in out and "resuming at epoch 2 from a checkpoint of epoch 1" in out
    client, found = runs(tmp_path)
    assert len(found) == 1 and found[0].info.status == "FINISHED"

    saved = by_epoch(run_dir)
    assert {1, 2} <= set(saved)
    truncate(saved[2])
    second = job(tmp_path, "--epochs", "3", ray_address=ray_head)  # continue one epoch further
    out = second.stdout + second.stderr
    assert second.returncode == 0, out[-4000:]
    assert f"checkpoint {saved[2]} is damaged" in out and f"resuming from {saved[1]} (epoch 1)" in out
    assert "resuming at epoch 2 from a checkpoint of epoch 1" in out
    client, found = runs(tmp_path)
    assert len(found) == 1 and found[0].info.status == "FINISHED"  # the same MLflow run
    steps = sorted(m.step for m in client.get_metric_history(found[0].info.run_id, "train/loss"))
    # Epoch 2 trained again from epoch 1's state after the kill and again after the damage, then 3.
    assert steps == sorted([*logged_before_the_kill, 2, 2, 3])

    checkpoints = [d for d in run_dir.glob("checkpoint_*") if d.is_dir()]  # not Ray's checkpoint_manager_snapshot.json
    for directory in checkpoints:
        truncate(directory)
    before = cpu_seconds_of_children()
    refused = job(tmp_path, "--epochs", "3", ray_address=ray_head)
    assert refused.returncode == 2, refused.stdout[-3000:] + refused.stderr[-3000:]
    # Quick and before Ray: timed in CPU seconds (the job and everything it started), which a
    # test running beside this one on the other xdist worker does not stretch as it does wall time.
    refused_cpu_s = cpu_seconds_of_children() - before
    assert refused_cpu_s < 60 and not used_ray(refused.stdout + refused.stderr)
    assert (
        "every checkpoint of the run" in refused.stderr
        and "--resume-from" in refused.stderr
        and "--no-resume" in refused.stderr
    )
    for directory in checkpoints:
        assert str(directory) in refused.stderr
    fresh = job(tmp_path, "--no-resume", "--epochs", "1", ray_address=ray_head)
    assert fresh.returncode == 0 and "a fresh run under the new name 'corr1-" in fresh.stdout
    _, found = runs(tmp_path)
    assert len(found) == 2


def test_a_checkpoint_from_before_a_new_config_field_still_resumes(tmp_path):
    """Fields added to the config since a checkpoint was written take their defaults when the
    two configs are compared; a changed value is still refused, and named."""
    old = copy.deepcopy(CONFIG)
    del old["data"]["jpeg_check"]  # the config as written before data.jpeg_check existed
    directory = checkpoint(tmp_path, 1, config=old)
    assert plan_resume(tmp_path, CONFIG).checkpoint.epoch == 1  # the driver's path
    assert verify_checkpoint(directory, config=CONFIG, read_config=read_through_schema).epoch == 1
    with pytest.raises(DamagedCheckpointError, match=r"another config \(data.jpeg_check: None -> 'strict'\)"):
        verify_checkpoint(directory, config=CONFIG)  # without the schema: the field looks changed
    strict_off = copy.deepcopy(CONFIG)
    strict_off["data"]["jpeg_check"] = "structure"
    with pytest.raises(DamagedCheckpointError, match=r"another config \(data.jpeg_check: 'strict' -> 'structure'\)"):
        verify_checkpoint(directory, config=strict_off, mlflow_run_id="run-1", read_config=read_through_schema)
