"""The training job end to end on a real local Ray with 2 CPU workers and a real MLflow (SQLite).

Each test runs ``jobs/train_imagenet.py`` as users do, in a subprocess with its own private Ray
instance, on a tiny synthetic dataset, then checks what landed in MLflow through its client.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[1]
JOB = REPO / "jobs" / "train_imagenet.py"

EPOCH_KEYS = [
    "train/loss",
    "train/lr",
    "train/images_per_s",
    "train/data_wait",
    "val/top1_acc",
    "val/boxacc_v2_iou30",
    "val/boxacc_v2_iou50",
    "val/boxacc_v2_iou70",
    "val/maxboxacc_v2",
    "val/gt_known_loc",
    "val/top1_loc",
]


#: Ray Train workers of a test job. One, unless a test is about two: each worker is a process that
#: imports torch, Ray Train, MLflow and DALI (about 40 s of CPU on the 2-core box, BENCHMARKS.md
#: "The suite on two workers"), and two ranks are checked by the tests that pass ``workers=2``.
TEST_WORKERS = 1


def job_command(
    tmp_path: Path, *extra: str, name: str = "job", epochs: int = 2, workers: int = TEST_WORKERS
) -> list[str]:
    return [
        sys.executable,
        str(JOB),
        "--name",
        name,
        "--epochs",
        str(epochs),
        "--storage-path",
        str(tmp_path / "ray"),
        "--tracking-uri",
        f"sqlite:///{tmp_path / 'mlflow.db'}",
        "--set",
        "data.synthetic.num_train=64",
        "--set",
        "data.synthetic.num_val=24",
        "--set",
        "data.synthetic.num_test=24",
        "--set",
        "data.synthetic.size=64",
        "--set",
        f"data.synthetic.cache_dir={tmp_path / 'data'}",
        "--set",
        "data.batch_size=8",
        "--set",
        "eval.batch_size=16",
        "--set",
        "eval.num_vis_images=4",
        "--set",
        f"run.num_workers={workers}",
        *extra,
    ]


#: What a job prints when it starts or joins Ray: a job refused before Ray prints neither.
RAY_USED = ("Started a local Ray instance", "Connecting to existing Ray cluster")


def used_ray(output: str) -> bool:
    return any(mark in output for mark in RAY_USED)


def job_env(ray_address: str | None = None) -> dict[str, str]:
    """The environment of a test job: its own private Ray instance, or with ``ray_address`` (the
    ``ray_head`` fixture) the pytest worker's shared head."""
    env = dict(os.environ)
    env.pop("RAY_ADDRESS", None)
    env["PYTHONUNBUFFERED"] = "1"
    if ray_address is not None:
        from ray_head import head_env

        env.update(head_env(), RAY_ADDRESS=ray_address)
    return env


def run_job(
    tmp_path: Path,
    *extra: str,
    name: str = "job",
    epochs: int = 2,
    workers: int = TEST_WORKERS,
    ray_address: str | None = None,
    timeout: int = 600,
) -> subprocess.CompletedProcess:
    result = subprocess.run(
        job_command(tmp_path, *extra, name=name, epochs=epochs, workers=workers),
        cwd=tmp_path,
        env=job_env(ray_address),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    return result


def only_run(tmp_path: Path):
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("synthetic")
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 1, [r.info.run_id for r in runs]
    return client, runs[0]


def epochs_logged(client: MlflowClient, run_id: str, key: str = "val/maxboxacc_v2") -> list[int]:
    return sorted(m.step for m in client.get_metric_history(run_id, key))


def test_two_workers_train_and_record_everything_in_mlflow(tmp_path, ray_head):
    result = run_job(tmp_path, "--method", "fmcg", workers=2, ray_address=ray_head)
    assert "val MaxBoxAccV2 =" in result.stdout and "mlflow ui --backend-store-uri" in result.stdout

    client, run = only_run(tmp_path)
    assert run.info.status == "FINISHED"
    params = run.data.params
    assert params["method.name"] == "fmcg" and params["model.backbone"] == "tiny" and params["run.num_workers"] == "2"
    assert params["method.srd.theta_drop"] == "0.8"
    metrics = run.data.metrics
    for key in EPOCH_KEYS + ["train/loss_cls", "train/loss_cls_erased", "train/loss_cg"]:
        assert key in metrics, key
        assert epochs_logged(client, run.info.run_id, key) == [1, 2], key
    for key in ("test/maxboxacc_v2", "test/boxacc_v2_iou70", "test/gt_known_loc", "test/top1_loc"):
        assert key in metrics, key
    assert 0.0 <= metrics["val/maxboxacc_v2"] <= 100.0
    assert (
        abs(
            metrics["val/maxboxacc_v2"]
            - (metrics["val/boxacc_v2_iou30"] + metrics["val/boxacc_v2_iou50"] + metrics["val/boxacc_v2_iou70"]) / 3
        )
        < 1e-9
    )
    assert 0.0 <= metrics["train/data_wait"] <= 1.0 and metrics["train/images_per_s"] > 0
    # What the loss terms use, per epoch: the masks (area; on val also the share inside the GT
    # boxes, all-reduced over both workers), theta_d as SRD saw it, FMCG's three inference maps.
    for key in ("train/mask_cg_fg_area", "train/mask_cg_bg_area", "train/mask_srd_drop_area", "val/mask_cg_fg_area"):
        assert 0.0 < metrics[key] < 1.0, key
    for key in ("val/mask_cg_fg_in_box", "val/mask_cg_bg_in_box", "val/mask_srd_drop_in_box"):
        assert 0.0 < metrics[key] <= 1.0, key
    theta = [
        m.value for m in sorted(client.get_metric_history(run.info.run_id, "train/srd_theta"), key=lambda m: m.step)
    ]
    assert len(theta) == 2 and 0.8 < theta[0] < 1.0 and theta[1] == pytest.approx(0.8)  # warm-up over the first 0.3
    for mode in ("erased", "original", "max"):
        assert 0.0 <= metrics[f"val/maxboxacc_v2_map_{mode}"] <= 100.0, mode
    assert metrics["val/maxboxacc_v2_map_erased"] == pytest.approx(metrics["val/maxboxacc_v2"])  # the default map

    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"config.yaml", "val", "test", "summary.md"} <= artifacts, artifacts
    val_files = {a.path for a in client.list_artifacts(run.info.run_id, "val/cams")}
    assert "val/cams/epoch_002.png" in val_files
    curves = {a.path for a in client.list_artifacts(run.info.run_id, "val/box_accuracy_vs_threshold")}
    assert "val/box_accuracy_vs_threshold/epoch_002.png" in curves
    models = client.search_logged_models([run.info.experiment_id], filter_string=f"source_run_id = '{run.info.run_id}'")
    assert len(models) == 1
    model_files = {a.path for a in client.list_logged_model_artifacts(models[0].model_id)}
    assert "MLmodel" in model_files and "extra_files" in model_files, model_files
    assert run.data.tags["wsol.method"] == "fmcg"
    assert any(k.startswith("data.train.sha256") for k in run.data.tags)

    # Ray kept the best checkpoint(s) plus the latest, each loadable weights-only.
    checkpoints = sorted(p for p in (tmp_path / "ray" / "job").glob("checkpoint_*") if p.is_dir())
    assert 1 <= len(checkpoints) <= 3 and all((c / "state.pt").is_file() for c in checkpoints)

    # The offline evaluator scores the final checkpoint, and the MLflow model URI works too.
    out = tmp_path / "eval.json"
    evaluate = [
        sys.executable,
        str(REPO / "jobs" / "evaluate.py"),
        "--checkpoint",
        f"runs:/{run.info.run_id}/model",
        "--tracking-uri",
        f"sqlite:///{tmp_path / 'mlflow.db'}",
        "--split",
        "test",
        "--out",
        str(out),
    ]
    done = subprocess.run(evaluate, cwd=tmp_path, env=job_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    import json

    offline = json.loads(out.read_text())
    # Same weights, same thresholds (the protocol's 0.001 step in both): the same score, although
    # training evaluated on 2 DDP ranks with padding and this runs in one process.
    for key in (
        "test/maxboxacc_v2",
        "test/boxacc_v2_iou70",
        "test/maxboxacc_v1",
        "test/gt_known_loc",
        "test/top1_loc",
        "test/loc_threshold",
    ):
        assert offline[key] == pytest.approx(metrics[key], abs=1e-6), key

    # The published figures: v1 beside V2, Loc read on test at the threshold val chose.
    assert 0.0 <= metrics["test/maxboxacc_v1"] <= 100.0 and "val/maxboxacc_v1_threshold" in metrics
    assert metrics["test/loc_threshold"] == pytest.approx(metrics["val/loc_threshold"])
    assert metrics["val/loc_threshold"] == pytest.approx(metrics["val/maxboxacc_v1_threshold"])
    assert metrics["test/gt_known_loc"] <= metrics["test/maxboxacc_v1"] + 1e-9  # v1 is the best threshold's GT-known
    assert metrics["test/top1_loc"] <= metrics["test/gt_known_loc"] + 1e-9
    assert metrics["val/score"] == pytest.approx(metrics["val/maxboxacc_v2"])

    # Localize pictures in a folder (JPEGs taken out of the test shards, one damaged file).
    import tarfile

    pictures = tmp_path / "pictures" / "nested"
    pictures.mkdir(parents=True)
    for shard in sorted((tmp_path / "data").rglob("test/*.tar")):
        with tarfile.open(shard) as tar:
            for member in tar.getmembers():
                if member.name.endswith(".jpg"):
                    (pictures / Path(member.name).name).write_bytes(tar.extractfile(member).read())
    (pictures / "damaged.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    (pictures / "notes.txt").write_text("not an image")
    found = tmp_path / "found"
    localize = [
        sys.executable,
        str(REPO / "jobs" / "localize.py"),
        "--checkpoint",
        f"runs:/{run.info.run_id}/model",
        "--tracking-uri",
        f"sqlite:///{tmp_path / 'mlflow.db'}",
        "--images",
        str(tmp_path / "pictures"),
        "--out",
        str(found),
        "--contact-sheet",
        "--save-maps",
        "--batch-size",
        "8",
    ]
    done = subprocess.run(localize, cwd=tmp_path, env=job_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    good = sorted(p.name for p in pictures.glob("*.jpg") if p.name != "damaged.jpg")
    rows = [json.loads(line) for line in (found / "predictions.jsonl").read_text().splitlines()]
    assert sorted(Path(r["image"]).name for r in rows) == good and len(good) == 24
    summary = json.loads((found / "summary.json").read_text())
    assert summary["images"] == 25 and summary["localized"] == 24 and len(summary["skipped"]) == 1
    assert summary["skipped"][0]["image"] == "nested/damaged.jpg" and "damaged.jpg" in done.stdout
    for row in rows:
        assert row["threshold"] == pytest.approx(metrics["val/loc_threshold"])  # stored with the model
        x0, y0, x1, y1 = row["box"]
        assert 0 <= x0 <= x1 < row["width"] and 0 <= y0 <= y1 < row["height"]
        assert 0 <= row["class_index"] < 10 and 0.0 < row["score"] <= 1.0
        stem = row["image"].replace("/", "__").rsplit(".", 1)[0]
        assert (found / "overlays" / f"{stem}.png").is_file() and (found / "maps" / f"{stem}.npy").is_file()
    assert (found / "contact_sheet.png").is_file()
    assert len((found / "predictions.csv").read_text().splitlines()) == 25


def test_bad_option_fails_before_ray_starts(tmp_path):
    result = subprocess.run(
        [sys.executable, str(JOB), "--set", "method.srd.theta_drop=1.5"],
        cwd=tmp_path,
        env=job_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert "method.srd.theta_drop" in result.stderr and "1.5" in result.stderr
    assert "Ray" not in result.stdout and not (tmp_path / "mlflow.db").exists()
