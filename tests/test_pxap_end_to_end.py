"""PxAP end to end, as OpenImages is used: the protocol's metadata layout with masks ->
``jobs/make_shards.py wsolmeta --masks`` -> ``jobs/train_imagenet.py`` on real Ray with 2 CPU
workers -> PxAP and its PR curve in a real MLflow (SQLite); box metrics are absent (no boxes)."""

from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from mlflow.tracking import MlflowClient
from PIL import Image

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[1]


def picture(rng: np.random.Generator, label: int, w: int, h: int) -> tuple[bytes, bytes, tuple[int, int, int, int]]:
    """A textured background with one coloured rectangle (the class is its colour), the
    rectangle's mask as a PNG, and the box."""
    background = rng.integers(60, 140, size=(h, w, 3), dtype=np.uint8)
    bw, bh = int(rng.integers(w // 4, w // 2)), int(rng.integers(h // 4, h // 2))
    x0, y0 = int(rng.integers(0, w - bw)), int(rng.integers(0, h - bh))
    colour = (230, 40, 40) if label == 0 else (40, 60, 230)
    background[y0 : y0 + bh, x0 : x0 + bw] = colour
    mask = np.zeros((h, w), np.uint8)
    mask[y0 : y0 + bh, x0 : x0 + bw] = 255
    jpg, png = io.BytesIO(), io.BytesIO()
    Image.fromarray(background).save(jpg, format="JPEG", quality=92)
    Image.fromarray(mask).save(png, format="PNG")
    return jpg.getvalue(), png.getvalue(), (x0, y0, x0 + bw - 1, y0 + bh - 1)


def protocol_layout(root: Path) -> None:
    """images/, masks/ and metadata/OpenImages/{train,val,test} in wsolevaluation's layout."""
    rng = np.random.default_rng(0)
    for split, count in (("train", 48), ("val", 16), ("test", 16)):
        meta = root / "metadata" / "OpenImages" / split
        meta.mkdir(parents=True)
        ids, labels, loc = [], [], []
        for i in range(count):
            label = i % 2
            image_id = f"{split}/{label:02d}/img{i:03d}.jpg"
            jpg, png, _ = picture(rng, label, int(rng.integers(70, 110)), int(rng.integers(60, 100)))
            (root / "images" / image_id).parent.mkdir(parents=True, exist_ok=True)
            (root / "images" / image_id).write_bytes(jpg)
            ids.append(image_id)
            labels.append(f"{image_id},{label}")
            if split != "train":
                mask_id = image_id.replace(".jpg", "_m.png")
                (root / "masks" / mask_id).parent.mkdir(parents=True, exist_ok=True)
                (root / "masks" / mask_id).write_bytes(png)
                loc.append(f"{image_id},{mask_id},")
        (meta / "image_ids.txt").write_text("\n".join(ids) + "\n")
        (meta / "class_labels.txt").write_text("\n".join(labels) + "\n")
        if loc:
            (meta / "localization.txt").write_text("\n".join(loc) + "\n")


def test_masks_to_shards_to_training_to_pxap_in_mlflow(tmp_path, ray_head):
    protocol_layout(tmp_path / "src")
    shards = tmp_path / "shards"
    convert = [
        sys.executable,
        str(REPO / "jobs" / "make_shards.py"),
        "wsolmeta",
        "--images",
        str(tmp_path / "src" / "images"),
        "--metadata",
        str(tmp_path / "src" / "metadata" / "OpenImages"),
        "--masks",
        str(tmp_path / "src" / "masks"),
        "--out",
        str(shards),
    ]
    done = subprocess.run(convert, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]

    tracking = f"sqlite:///{tmp_path / 'mlflow.db'}"
    train = [
        sys.executable,
        str(REPO / "jobs" / "train_imagenet.py"),
        "--name",
        "pxap",
        "--method",
        "cam",
        "--epochs",
        "2",
        "--storage-path",
        str(tmp_path / "ray"),
        "--tracking-uri",
        tracking,
        "--set",
        f"data.root={shards}",
        "--set",
        "data.batch_size=8",
        "--set",
        "eval.batch_size=8",
        "--set",
        "eval.num_vis_images=4",
        "--set",
        "run.experiment=openimages",
    ]
    from test_train_job import job_env

    env = job_env(ray_head)
    done = subprocess.run(train, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]

    client = MlflowClient(tracking)
    runs = client.search_runs([client.get_experiment_by_name("openimages").experiment_id])
    assert len(runs) == 1
    run = runs[0]
    metrics = run.data.metrics
    assert run.info.status == "FINISHED"
    for key in ("val/pxap", "test/pxap"):
        assert 0.0 < metrics[key] <= 100.0, key
    assert [m.step for m in sorted(client.get_metric_history(run.info.run_id, "val/pxap"), key=lambda m: m.step)] == [
        1,
        2,
    ]
    assert metrics["val/score"] == pytest.approx(metrics["val/pxap"])  # model selection on a mask-only split
    assert not any(k.startswith(("val/maxboxacc", "val/boxacc", "test/maxboxacc", "val/gt_known")) for k in metrics)
    assert "val/top1_acc" in metrics
    curves = {a.path for a in client.list_artifacts(run.info.run_id, "val/pxap_pr_curve")}
    assert "val/pxap_pr_curve/epoch_002.png" in curves
    assert {a.path for a in client.list_artifacts(run.info.run_id, "test/pxap_pr_curve")}
