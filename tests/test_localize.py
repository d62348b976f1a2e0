"""jobs/localize.py around the model: coordinates, thresholds, shard input on one process and on
Ray Train workers, and the errors a user meets. (The folder path with a model trained in the test
runs in tests/test_train_job.py.)"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from wsol_core.checkpoint import TrainingState, save_training_state
from wsol_core.config import load_config, to_dict
from wsol_core.localize import boxes_at, to_original
from wsol_core.methods import build_method

REPO = Path(__file__).resolve().parents[1]


def _job():
    spec = importlib.util.spec_from_file_location("localize_job", REPO / "jobs" / "localize.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module


def test_boxes_go_back_to_the_pictures_pixels():
    assert to_original(np.array([0, 0, 223, 223]), 640, 480) == [0, 0, 639, 479]
    assert to_original(np.array([112, 0, 112, 0]), 448, 224) == [224, 0, 225, 0]  # one grid cell = two pixels
    assert to_original(np.array([10, 20, 30, 40]), 100, 50) == [4, 4, 13, 9]
    m = np.zeros((224, 224), np.uint8)
    m[20:100, 10:90] = 255  # large
    m[120:170, 150:200] = 200  # small
    box, boxes = boxes_at(m, 0.5, 224, 224)
    # The protocol's boxes: cv2.boundingRect's (x, y, x + w, y + h), one past the blob's last pixel.
    assert box == [10, 20, 90, 100] and sorted(boxes) == [[10, 20, 90, 100], [150, 120, 200, 170]]


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("loc") / "shards"
    done = subprocess.run(
        [
            sys.executable,
            str(REPO / "jobs" / "make_shards.py"),
            "synthetic",
            "--out",
            str(root),
            "--num-train",
            "16",
            "--num-val",
            "8",
            "--num-test",
            "10",
            "--size",
            "64",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return root


def checkpoint(directory: Path, threshold_index: int | None = 300) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    cfg = load_config(overrides=["method.name=cam", "model.backbone=tiny", "model.pretrained=null"])
    method = build_method(cfg, 10)
    save_training_state(
        directory,
        TrainingState(
            epoch=1,
            model=method.state_dict(),
            optimizer={},
            scheduler={},
            config=to_dict(cfg),
            loc_threshold_index=threshold_index,
            cam_curve_interval=0.001,
        ),
    )
    return directory


def test_shard_split_in_one_process(tmp_path, shards, capsys):
    out = tmp_path / "out"
    code = _job().main(
        [
            "--checkpoint",
            str(checkpoint(tmp_path / "ckpt")),
            "--images",
            str(shards / "test"),
            "--out",
            str(out),
            "--batch-size",
            "4",
            "--no-overlays",
            "--save-maps",
        ]
    )
    assert code == 0
    rows = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert len(rows) == 10 and len({r["image"] for r in rows}) == 10  # the loader's padding is not written
    assert all(r["threshold"] == pytest.approx(0.3) and r["class_name"].startswith("class_") for r in rows)
    assert len(list((out / "maps").glob("*.npy"))) == 10 and not (out / "overlays").exists()
    saved = np.load(next((out / "maps").glob("*.npy")))
    assert saved.shape == (224, 224) and 0.0 <= saved.min() and saved.max() <= 1.0


@pytest.mark.integration
def test_shard_split_on_two_ray_workers(tmp_path, shards, ray_head):
    from test_train_job import job_env

    out = tmp_path / "out"
    env = job_env(ray_head)
    done = subprocess.run(
        [
            sys.executable,
            str(REPO / "jobs" / "localize.py"),
            "--checkpoint",
            str(checkpoint(tmp_path / "ckpt")),
            "--images",
            str(shards / "test"),
            "--out",
            str(out),
            "--num-workers",
            "2",
            "--batch-size",
            "2",
            "--contact-sheet",
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    rows = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert len(rows) == 10 and len({r["image"] for r in rows}) == 10  # each image once, over both ranks
    summary = json.loads((out / "summary.json").read_text())
    assert summary["images"] == 10 and summary["localized"] == 10 and summary["skipped"] == []
    assert len(list((out / "overlays").glob("*.png"))) == 10 and (out / "contact_sheet.png").is_file()
    assert len((out / "predictions.csv").read_text().splitlines()) == 11  # one header


def test_clear_errors(tmp_path, shards, capsys):
    job = _job()
    no_threshold = checkpoint(tmp_path / "none", threshold_index=None)
    assert (
        job.main(["--checkpoint", str(no_threshold), "--images", str(shards / "test"), "--out", str(tmp_path / "o")])
        == 2
    )
    assert "stores no threshold chosen on val" in capsys.readouterr().err
    ckpt = checkpoint(tmp_path / "ckpt")
    assert (
        job.main(
            [
                "--checkpoint",
                str(ckpt),
                "--images",
                str(shards / "test"),
                "--out",
                str(tmp_path / "o"),
                "--threshold",
                "1.5",
            ]
        )
        == 2
    )
    assert "must be in [0, 1)" in capsys.readouterr().err
    assert (
        job.main(["--checkpoint", str(ckpt), "--images", str(tmp_path / "missing"), "--out", str(tmp_path / "o")]) == 2
    )
    assert "not a directory" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert job.main(["--checkpoint", str(ckpt), "--images", str(tmp_path / "empty"), "--out", str(tmp_path / "o")]) == 2
    assert "no image files" in capsys.readouterr().err
    torch.save({"state_dict": {"encoder.weight": torch.zeros(1)}}, tmp_path / "other.pth")
    assert (
        job.main(
            [
                "--checkpoint",
                str(tmp_path / "other.pth"),
                "--images",
                str(shards / "test"),
                "--out",
                str(tmp_path / "o"),
            ]
        )
        == 2
    )
    assert "not a released checkpoint" in capsys.readouterr().err


@pytest.mark.integration
def test_evaluation_on_two_ray_workers_scores_what_one_process_scores(tmp_path, shards):
    """``evaluate_checkpoint(num_workers=2)``: each rank scores its share and the all-reduced
    metrics are the single process's."""
    from wsol_core.train.offline_eval import evaluate_checkpoint

    ckpt = str(checkpoint(tmp_path / "ckpt"))
    alone = evaluate_checkpoint(ckpt, shards / "test", split="test")
    spread = evaluate_checkpoint(ckpt, shards / "test", split="test", num_workers=2)
    assert alone.keys() == spread.keys() and "test/maxboxacc_v2" in alone
    for key, value in alone.items():
        assert spread[key] == pytest.approx(value, abs=1e-6), key
