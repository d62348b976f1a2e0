"""Pseudo-box extraction (wsol_core/extraction.py, jobs/extract_boxes.py): boxes that land on the
object in the original pixels, the map each kind of method is read from, resume, the summary, and
the errors a user meets before any Ray work starts."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from data_fixtures import sample_members, write_raw_split
from PIL import Image
from test_localize import checkpoint, shards  # noqa: F401  (a module fixture: the synthetic shards)

from wsol_core.data.contract import LoaderOptions
from wsol_core.data.pseudo_boxes import (
    SUMMARY,
    SidecarWriter,
    new_header,
    read_boxes,
    read_header,
    verify_sidecar,
    write_header,
)
from wsol_core.extraction import boxes_for_batch, extract_shards, merge_summaries, read_summaries
from wsol_core.methods.base import Inference
from wsol_core.metrics.reference import reference_iou

REPO = Path(__file__).resolve().parents[1]
SOURCE = {"checkpoint": "oracle", "method": "oracle", "map": "class_agnostic"}


class BrightnessOracle(torch.nn.Module):
    """A stand-in model whose map is the image's brightness: on pictures of one white rectangle on
    black, its map is the object, so its boxes must be the GT boxes."""

    def __init__(self, uses_labels: bool = False) -> None:
        super().__init__()
        self.uses_labels = uses_labels
        self.calls: list[int] = []
        self.labels_seen: list[torch.Tensor | None] = []

    @torch.no_grad()
    def inference(self, images, labels=None):
        self.calls.append(len(images))
        self.labels_seen.append(labels)
        return Inference(logits=None, maps=images.mean(1))


def _rectangle_jpeg(w: int, h: int, box: tuple[int, int, int, int]) -> bytes:
    img = np.zeros((h, w, 3), np.uint8)
    x0, y0, x1, y1 = box
    img[y0 : y1 + 1, x0 : x1 + 1] = 255
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def rectangle_split(split_dir: Path, n: int = 10) -> dict[str, list[int]]:
    """``n`` pictures of different sizes, each one white rectangle (its GT box) on black."""
    rng = np.random.default_rng(0)
    truth, shard = {}, []
    for i in range(n):
        w, h = int(rng.integers(80, 200)), int(rng.integers(60, 160))
        x0, y0 = int(rng.integers(0, w // 2)), int(rng.integers(0, h // 2))
        box = [x0, y0, int(rng.integers(x0 + w // 4, w)), int(rng.integers(y0 + h // 4, h))]
        key = f"r{i:03d}"
        truth[key] = box
        shard += sample_members(key, label=i % 3, w=w, h=h, boxes=[box], image=_rectangle_jpeg(w, h, tuple(box)))
    half = 3 * ((n + 1) // 2)  # three members per sample: two shards
    write_raw_split(split_dir, [shard[:half], shard[half:]], split="train")
    return truth


def _options() -> LoaderOptions:
    return LoaderOptions(backend="torch", decode="workers", num_threads=1)


def _extract(split_dir, out, method, rank=0, world_size=1, threshold=0.5):
    return extract_shards(
        method,
        split_dir,
        out,
        threshold=threshold,
        device=torch.device("cpu"),
        options=_options(),
        batch_size=4,
        rank=rank,
        world_size=world_size,
        progress=False,
    )


def test_boxes_of_a_map_that_is_the_object_are_the_gt_boxes_in_original_pixels(tmp_path):
    truth = rectangle_split(tmp_path / "train")
    out = tmp_path / "pseudo"
    write_header(out, new_header(tmp_path / "train", "fixed", 0.5, SOURCE))
    summary = _extract(tmp_path / "train", out, BrightnessOracle())
    boxes = read_boxes(out)
    assert sorted(boxes) == sorted(truth)
    for key, box in boxes.items():
        # Through the 224 grid and back: at most ~one grid cell (W / 224 < 1 px here) plus JPEG edges.
        assert np.abs(np.asarray(box.box) - np.asarray(truth[key])).max() <= 2, (key, box.box, truth[key])
    assert summary.images == 10 and summary.extracted == 10 and summary.resumed == 0 and summary.skipped == 0
    assert summary.with_gt == 10 and summary.quality()["corloc"] == 100.0 and summary.quality()["mean_iou"] > 90
    verify_sidecar(out, tmp_path / "train", list(truth))


class TwoLevelMap(torch.nn.Module):
    """A map of 0.4 over the left half and 1.0 over the top-left quarter, whatever the picture."""

    uses_labels = False

    def inference(self, images, labels=None):
        maps = torch.zeros(len(images), 28, 28)
        maps[:, :, :14] = 0.4
        maps[:, :14, :14] = 1.0
        return Inference(logits=None, maps=maps)


def test_the_threshold_picks_the_level_of_the_map_in_the_images_pixels():
    images, labels = torch.zeros(2, 3, 224, 224), torch.zeros(2, dtype=torch.long)
    sizes = [(448, 224), (100, 300)]
    low = boxes_for_batch(TwoLevelMap(), images, labels, sizes, threshold=0.2)
    high = boxes_for_batch(TwoLevelMap(), images, labels, sizes, threshold=0.6)
    # The left half, then the top-left quarter; edges within one map cell (W / 28 px): the map is
    # upsampled bicubically before thresholding, as the protocol does.
    assert low[0][:2] == (0, 0) and abs(low[0][2] - 224) <= 448 / 28 and low[0][3] == 223
    assert high[0][:2] == (0, 0) and abs(high[0][2] - 224) <= 448 / 28 and abs(high[0][3] - 112) <= 224 / 28
    assert abs(low[1][2] - 50) <= 100 / 28 and low[1][3] == 299 and abs(high[1][3] - 150) <= 300 / 28
    assert high[0][3] < low[0][3] and high[1][3] < low[1][3]


def test_supervised_methods_are_read_at_the_gt_class_and_co_localization_ones_without_labels(tmp_path):
    rectangle_split(tmp_path / "train", n=6)
    supervised, agnostic = BrightnessOracle(uses_labels=True), BrightnessOracle(uses_labels=False)
    for name, method in (("a", supervised), ("b", agnostic)):
        write_header(tmp_path / name, new_header(tmp_path / "train", "fixed", 0.5, SOURCE))
        _extract(tmp_path / "train", tmp_path / name, method)
    seen = torch.cat([labels for labels in supervised.labels_seen])
    assert sorted(seen.tolist()) == sorted(i % 3 for i in range(6))  # the samples' own classes
    assert all(labels is None for labels in agnostic.labels_seen)


def test_two_ranks_share_the_split_and_an_interrupted_rank_resumes_without_inferring_again(tmp_path):
    truth = rectangle_split(tmp_path / "train")
    out = tmp_path / "pseudo"
    write_header(out, new_header(tmp_path / "train", "fixed", 0.5, SOURCE))
    first = _extract(tmp_path / "train", out, BrightnessOracle(), rank=0, world_size=2)
    # Rank 1 was killed after its first batch: its file holds those boxes only.
    part = tmp_path / "part"
    write_header(part, new_header(tmp_path / "train", "fixed", 0.5, SOURCE))
    _extract(tmp_path / "train", part, BrightnessOracle(), rank=1, world_size=2)
    lines = (part / "boxes-rank1-of-2.jsonl").read_text().splitlines(keepends=True)
    (out / "boxes-rank1-of-2.jsonl").write_text("".join(lines[:2]))
    oracle = BrightnessOracle()
    second = _extract(tmp_path / "train", out, oracle, rank=1, world_size=2)
    assert second.resumed == 2 and second.extracted == len(lines) - 2 and sum(oracle.calls) == len(lines) - 2
    assert second.with_gt == second.images == len(lines)  # resumed boxes are scored too
    merged = merge_summaries(read_summaries(out))
    assert merged.images == 10 and merged.extracted + merged.resumed == 10 and first.images + second.images == 10
    assert merged.quality()["corloc"] == 100.0
    verify_sidecar(out, tmp_path / "train", list(truth))


def test_an_unfinished_sidecar_is_refused_and_recorded_skips_are_allowed(tmp_path):
    truth = rectangle_split(tmp_path / "train", n=5)
    out = tmp_path / "pseudo"
    write_header(out, new_header(tmp_path / "train", "fixed", 0.5, SOURCE))
    _extract(tmp_path / "train", out, BrightnessOracle())
    path = out / "boxes-rank0-of-1.jsonl"
    path.write_text("".join(path.read_text().splitlines(keepends=True)[:4]))
    with pytest.raises(ValueError, match=r"4 boxes and 0 skipped samples for the split's 5 samples"):
        verify_sidecar(out, tmp_path / "train", list(truth))
    (out / SUMMARY).write_text(json.dumps({"skipped": 1}))  # the extraction's loader skipped one as corrupt
    verify_sidecar(out, tmp_path / "train", list(truth))


def test_the_comparison_picture_draws_each_models_box(tmp_path, monkeypatch):
    import wsol_core.viz as viz
    from wsol_core.extraction import compare_boxes

    rectangle_split(tmp_path / "train", n=5)
    seen, draw = {}, viz.box_comparison_grid

    def capture(images, gt, boxes, titles=None, columns=4):
        seen.update(images=images, gt=gt, boxes=boxes, titles=titles)
        return draw(images, gt, boxes, titles, columns)

    monkeypatch.setattr(viz, "box_comparison_grid", capture)
    figure = compare_boxes(
        {"oracle": (BrightnessOracle(), 0.5), "two levels": (TwoLevelMap(), 0.6)},
        tmp_path / "train",
        options=_options(),
        count=4,
    )
    assert len(figure.axes) == 4 and seen["images"].shape == (4, 224, 224, 3) and len(seen["titles"]) == 4
    assert list(seen["boxes"]) == ["oracle", "two levels"]
    for gt, oracle in zip(seen["gt"], seen["boxes"]["oracle"]):
        assert reference_iou(oracle, gt.astype(np.int64))[0, 0] > 0.85  # the oracle's box is on the GT
    assert all(box.tolist()[0][:2] == [0, 0] for box in seen["boxes"]["two levels"])  # the top-left quarter


# -- the command ------------------------------------------------------------------------------


def _job():
    from wsol_core.commands import extract_boxes

    return extract_boxes


def test_the_command_extracts_a_trained_models_gt_class_boxes(tmp_path, shards, capsys):  # noqa: F811
    ckpt = checkpoint(tmp_path / "ckpt")  # a tiny CAM whose stored val threshold is 0.3
    out = tmp_path / "sidecar"
    args = ["--checkpoint", str(ckpt), "--data", str(shards), "--split", "val", "--out", str(out), "--batch-size", "3"]
    assert _job().main(args) == 0
    header = read_header(out)
    assert (header.threshold_rule, header.threshold, header.source["map"]) == ("best_val", 0.3, "gt_class_cam")
    assert header.split == "val" and header.num_samples == 8
    summary = json.loads((out / SUMMARY).read_text())
    assert summary["extracted"] == 8 and summary["quality"]["images"] == 8.0
    assert "8 boxes extracted, 0 resumed, 0 skipped" in capsys.readouterr().out
    verify_sidecar(out, shards / "val")
    # Run again: everything is there, nothing is inferred again.
    assert _job().main(args) == 0
    assert json.loads((out / SUMMARY).read_text())["resumed"] == 8
    # The same folder with another rule is another extraction: refused by name.
    assert _job().main([*args, "--threshold", "0.2"]) == 2
    assert (
        "holds pseudo boxes of another extraction (threshold: 0.3, threshold_rule: 'best_val')"
        in capsys.readouterr().err
    )


def test_the_command_names_bad_input_before_any_work(tmp_path, shards, capsys):  # noqa: F811
    job = _job()
    ckpt = str(checkpoint(tmp_path / "ckpt"))

    def fails(*extra: str) -> str:
        assert job.main(["--checkpoint", *extra]) == 2
        return capsys.readouterr().err

    assert "has no dataset.json" in fails(ckpt, "--data", str(tmp_path / "nowhere"), "--split", "train")
    assert "must be in [0, 1)" in fails(ckpt, "--data", str(shards), "--threshold", "1.5", "--out", str(tmp_path / "a"))
    assert "neither 'best_val' nor a number" in fails(ckpt, "--data", str(shards), "--threshold", "high")
    no_threshold = str(checkpoint(tmp_path / "none", threshold_index=None))
    assert "stores no threshold chosen on val" in fails(
        no_threshold, "--data", str(shards), "--out", str(tmp_path / "b")
    )
    torch.save({"state_dict": {"encoder.weight": torch.zeros(1)}}, tmp_path / "other.pth")
    assert "not a released checkpoint" in fails(str(tmp_path / "other.pth"), "--data", str(shards))
    assert "does not exist" in fails(str(tmp_path / "missing" / "state.pt"), "--data", str(shards))
    # A sidecar left by an extraction on two workers resumes only on two workers.
    out = tmp_path / "two"
    write_header(out, new_header(shards / "train", "best_val", 0.3, SOURCE))
    with SidecarWriter(out, 0, 2):
        pass
    assert "by 2 worker(s): resume it with the same --num-workers (now 1)" in fails(
        ckpt, "--data", str(shards), "--out", str(out)
    )
    assert not list(out.glob("summary*")) and not (shards / "train.pseudo_boxes").exists()


@pytest.mark.integration
def test_the_command_on_two_ray_workers(tmp_path, shards, ray_head):  # noqa: F811
    from test_train_job import job_env

    out = tmp_path / "sidecar"
    env = job_env(ray_head)
    done = subprocess.run(
        [
            sys.executable,
            str(REPO / "jobs" / "extract_boxes.py"),
            "--checkpoint",
            str(checkpoint(tmp_path / "ckpt")),
            "--data",
            str(shards),
            "--out",
            str(out),
            "--num-workers",
            "2",
            "--batch-size",
            "4",
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    boxes = read_boxes(out)
    assert len(boxes) == 16 and sorted(p.name for p in out.glob("boxes-*")) == [
        "boxes-rank0-of-2.jsonl",
        "boxes-rank1-of-2.jsonl",
    ]
    summary = json.loads((out / SUMMARY).read_text())
    assert summary["images"] == 16 and summary["extracted"] == 16 and summary["skipped"] == 0
    verify_sidecar(out, shards / "train")


@pytest.mark.integration
def test_the_two_stages_end_to_end_extract_train_the_regressor_on_ray_and_pair_it_with_a_classifier(
    tmp_path,
    shards,  # noqa: F811
    ray_head,
):
    """A CAM checkpoint's boxes over train -> the box regressor trained by the training job (Ray
    Train, MLflow) from that sidecar -> scored with the CAM as its classifier."""
    import shutil

    from mlflow.tracking import MlflowClient
    from test_train_job import job_command, job_env

    from wsol_core.train.offline_eval import evaluate_checkpoint

    data = tmp_path / "shards"
    shutil.copytree(shards, data)
    cam = checkpoint(tmp_path / "cam")
    assert _job().main(["--checkpoint", str(cam), "--data", str(data), "--split", "train"]) == 0
    assert (data / "train.pseudo_boxes" / SUMMARY).is_file()  # the default place: beside the split

    command = job_command(tmp_path, "--method", "regressor", name="regressor")
    command += ["--set", f"data.root={data}", "--set", "data.pseudo_boxes=train.pseudo_boxes"]
    command += ["--set", "optim.head_lr_mult=2"]
    done = subprocess.run(command, cwd=tmp_path, env=job_env(ray_head), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    (run,) = client.search_runs([e.experiment_id for e in client.search_experiments()])
    metrics = run.data.metrics
    assert run.data.params["data.pseudo_boxes"] == "train.pseudo_boxes"
    assert metrics["train/loss_box"] > 0 and 0 < metrics["train/target_visible"] <= 1
    assert 0 < metrics["val/mask_box_area"] < 1 and "val/maxboxacc_v2" in metrics and "val/corloc" in metrics

    regressor = sorted(p for p in (tmp_path / "ray" / "regressor").glob("checkpoint_*") if p.is_dir())[-1]
    alone = evaluate_checkpoint(str(regressor), data / "test", split="test")
    assert "test/top1_loc" not in alone and "test/gt_known_loc" in alone  # no classifier of its own
    paired = evaluate_checkpoint(str(regressor), data / "test", split="test", classifier=str(cam))
    assert paired["test/gt_known_loc"] == alone["test/gt_known_loc"]  # the same boxes
    assert paired["test/top1_loc"] <= paired["test/gt_known_loc"] and "test/top5_loc" in paired
    with pytest.raises(ValueError, match="a regressor model has no classifier"):
        evaluate_checkpoint(str(cam), data / "test", split="test", classifier=str(regressor))

    # The user's command: both stages side by side in the regressor's MLflow run, with a picture.
    from wsol_core.commands import evaluate

    args = ["--checkpoint", str(regressor), "--data", str(data), "--classifier", str(cam), "--first-stage", str(cam)]
    args += ["--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}", "--log-to-mlflow", run.info.run_id]
    assert evaluate.main(args) == 0
    logged = client.get_run(run.info.run_id).data.metrics
    assert logged["eval/test/gt_known_loc"] == alone["test/gt_known_loc"]
    assert "eval/first_stage/test/gt_known_loc" in logged and "eval/first_stage/test/top1_loc" in logged
    pictures = [a.path for a in client.list_artifacts(run.info.run_id, "eval")]
    assert "eval/test_first_stage_vs_model.png" in pictures
