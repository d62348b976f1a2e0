"""Faults of the data and the configuration are found by the driver in seconds, before Ray
starts, and a fault that only the workers can see is never retried (real jobs, real Ray, real
MLflow). Skipped samples are counted in MLflow."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from data_fixtures import bogus_huffman_jpeg, sample_members, write_raw_split
from mlflow.tracking import MlflowClient
from test_train_job import JOB, TEST_WORKERS, job_command, job_env

from wsol_core.data.manifest import check_shard_hashes, verify_split

pytestmark = pytest.mark.integration


def _data_root(root: Path, bad_train_key: str | None = None, n_train: int = 32) -> Path:
    for split, n in (("train", n_train), ("val", 8), ("test", 8)):
        shards, members = [], []
        for i in range(n):
            key = f"{split}_{i:03d}"
            image = bogus_huffman_jpeg() if key == bad_train_key else None
            members += sample_members(key, label=i % 3, seed=i + (100 if split != "train" else 0), image=image)
            if i % 8 == 7 or i == n - 1:
                shards.append(members)
                members = []
        write_raw_split(root / split, shards, split=split, num_classes=3)
    return root


def _job(
    tmp_path: Path, root: Path, *extra: str, name: str = "job", ray_address: str | None = None, timeout: int = 600
) -> subprocess.CompletedProcess:
    command = [
        sys.executable,
        str(JOB),
        "--data",
        str(root),
        "--method",
        "cam",
        "--epochs",
        "2",
        "--name",
        name,
        "--storage-path",
        str(tmp_path / "ray"),
        "--tracking-uri",
        f"sqlite:///{tmp_path / 'mlflow.db'}",
        "--set",
        "data.resize_size=64",
        "--set",
        "data.crop_size=56",
        "--set",
        "data.batch_size=4",
        "--set",
        "eval.batch_size=4",
        "--set",
        "eval.num_vis_images=2",
        "--set",
        f"run.num_workers={TEST_WORKERS}",
        *extra,
    ]
    env = dict(job_env(ray_address), XDG_CACHE_HOME=str(tmp_path / "cache"))
    return subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=timeout)


def test_a_batch_larger_than_the_split_fails_before_ray(tmp_path):
    start = time.monotonic()
    result = subprocess.run(
        job_command(tmp_path, "--set", "data.synthetic.num_train=12", "--set", "data.batch_size=32", workers=2),
        cwd=tmp_path,
        env=job_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-2000:]
    assert (
        "data.batch_size = 32 per worker on run.num_workers = 2: the 12 training images give no full batch"
        in result.stderr
    )
    assert "Started a local Ray instance" not in result.stdout + result.stderr and time.monotonic() - start < 120


def test_a_truncated_or_altered_shard_fails_before_ray(tmp_path):
    root = _data_root(tmp_path / "data")
    tar = root / "train" / "train-000001.tar"
    good = tar.read_bytes()
    tar.write_bytes(good[:5000])
    result = _job(tmp_path, root)
    assert result.returncode == 2
    assert (
        f"{tar}: size 5000 bytes differs from dataset.json" in result.stderr
        and "make_shards.py verify" in result.stderr
    )
    # Same size, one byte changed: only the SHA-256 sees it, and the driver checks it on every run.
    altered = bytearray(good)
    altered[3000] ^= 0x55
    tar.write_bytes(bytes(altered))
    result = _job(tmp_path, root)
    assert (
        result.returncode == 2 and f"{tar}: SHA-256" in result.stderr and "differs from dataset.json" in result.stderr
    )
    assert "Started a local Ray instance" not in result.stdout + result.stderr
    assert not (tmp_path / "ray" / "job").exists()


def test_hashes_are_checked_once_per_file_version(tmp_path):
    root = _data_root(tmp_path / "data")
    split = verify_split(root / "train")
    cache = tmp_path / "verified.json"
    assert check_shard_hashes(split, cache) == (4, 0)
    assert check_shard_hashes(split, cache) == (0, 4)  # unchanged files: not read again
    tar = split.shards[2].tar
    os.utime(tar, ns=(time.time_ns(), time.time_ns() + 10**9))  # rewritten (new mtime), same bytes
    assert check_shard_hashes(split, cache) == (1, 3)
    cached = json.loads(cache.read_text())
    assert set(cached) == {str(s.tar.resolve()) for s in split.shards}


def test_a_fault_only_the_workers_see_is_not_retried(tmp_path, ray_head):
    root = _data_root(tmp_path / "data", bad_train_key="train_005")
    start = time.monotonic()
    result = _job(tmp_path, root, "--set", "run.max_failures=3", ray_address=ray_head)
    assert result.returncode == 1, result.stdout[-2000:] + result.stderr[-3000:]
    assert "not retried: ShardError is a fault of the data or the configuration" in result.stderr
    assert "sample 'train_005': cannot decode image" in result.stderr
    assert "restarting from the newest checkpoint" not in result.stdout
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("handmade").experiment_id])
    assert len(runs) == 1 and runs[0].info.status == "FAILED"
    print(f"failed after {time.monotonic() - start:.0f} s")

    # The same data with data.skip_corrupt: trains, and MLflow counts the skipped sample per epoch.
    result = _job(tmp_path, root, "--set", "data.skip_corrupt=true", name="skipping", ray_address=ray_head)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    run = next(
        r
        for r in client.search_runs([client.get_experiment_by_name("handmade").experiment_id])
        if r.info.run_name == "skipping"
    )
    history = sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, "train/skipped_samples"))
    assert history == [(1, 1.0), (2, 1.0)]
    assert run.data.metrics["val/skipped_samples"] == 0.0 and run.data.metrics["test/skipped_samples"] == 0.0
