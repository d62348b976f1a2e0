"""Converters on tiny fixtures of each source layout, and the make_shards CLI."""

from __future__ import annotations

import importlib.util
import io
import json
from pathlib import Path

import numpy as np
import pytest
from data_fixtures import all_members, jpeg_bytes, mask_png, png_bytes, write_files
from PIL import Image

from wsol_core.data.converters import convert_cub, convert_imagenet, convert_wsolmeta
from wsol_core.data.format import key_from_id, protocol_mask, resize_nearest
from wsol_core.data.manifest import load_manifest, verify_split
from wsol_core.data.writer import SourceError, WriterOptions

OPTS = WriterOptions(shard_max_samples=4, shard_max_bytes=None, progress=False)
ROOT = Path(__file__).resolve().parents[1]


def _metas(split_dir: Path) -> dict[str, dict]:
    return {k[: -len(".json")]: json.loads(v) for k, v in all_members(split_dir).items() if k.endswith(".json")}


def _cub(root: Path) -> None:
    images = [
        "001.Albatross/A_1.jpg",
        "001.Albatross/A_2.jpg",
        "002.Auklet/B_1.jpg",
        "002.Auklet/B_2.jpg",
        "002.Auklet/B_3.jpg",
    ]
    write_files(root / "images", [(p, jpeg_bytes(50, 40, seed=i)) for i, p in enumerate(images)])
    (root / "images.txt").write_text("".join(f"{i + 1} {p}\n" for i, p in enumerate(images)))
    (root / "image_class_labels.txt").write_text("1 1\n2 1\n3 2\n4 2\n5 2\n")
    (root / "bounding_boxes.txt").write_text(
        "1 10.0 5.0 30.0 20.0\n2 0.0 0.0 50.0 40.0\n3 1.5 2.0 3.0 4.0\n4 5.0 5.0 10.0 10.0\n5 1.0 1.0 1.0 1.0\n"
    )
    (root / "train_test_split.txt").write_text("1 1\n2 0\n3 1\n4 0\n5 1\n")
    (root / "classes.txt").write_text("1 001.Albatross\n2 002.Auklet\n")


def test_cub_raw_release(tmp_path):
    _cub(tmp_path / "CUB_200_2011")
    res = convert_cub(tmp_path / "CUB_200_2011", tmp_path / "out", options=OPTS)
    assert set(res) == {"train", "test"}
    train = load_manifest(tmp_path / "out" / "train")
    assert train.num_samples == 3 and train.num_classes == 2 and train.class_names == ["001.Albatross", "002.Auklet"]
    metas = _metas(tmp_path / "out" / "train")
    a1 = metas[key_from_id("001.Albatross/A_1.jpg")]
    assert a1["label"] == 0 and a1["boxes"] == [[10, 5, 40, 25]]  # x, y, x + w, y + h
    assert (
        metas[key_from_id("002.Auklet/B_1.jpg")]["boxes"] == [[1.5, 2, 4.5, 6]]
        and metas[key_from_id("002.Auklet/B_1.jpg")]["label"] == 1
    )
    test = _metas(tmp_path / "out" / "test")
    assert test[key_from_id("001.Albatross/A_2.jpg")]["boxes"] == [[0, 0, 50, 40]]
    verify_split(tmp_path / "out" / "test", mode="full")


def _voc(path: Path, size: tuple[int, int], objects: list[tuple[str, tuple[int, int, int, int]]]) -> None:
    objs = "".join(
        f"<object><name>{n}</name><bndbox><xmin>{b[0]}</xmin><ymin>{b[1]}</ymin><xmax>{b[2]}</xmax><ymax>{b[3]}</ymax></bndbox></object>"
        for n, b in objects
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        f"<annotation><size><width>{size[0]}</width><height>{size[1]}</height><depth>3</depth></size>{objs}</annotation>"
    )


def test_imagenet_folders_and_voc_boxes(tmp_path):
    syn = ["n02000000", "n01000000"]  # sorted order gives the class index: n01... is 0
    for s_i, s in enumerate(syn):
        for j in range(2):
            write_files(tmp_path / "train" / s, [(f"{s}_{j}.JPEG", jpeg_bytes(40, 30, seed=10 * s_i + j))])
    _voc(tmp_path / "boxes" / "train" / "n01000000" / "n01000000_0.xml", (40, 30), [("n01000000", (3, 4, 20, 25))])
    # Flat val: the class comes from the XML; two objects of the class, one of another.
    write_files(
        tmp_path / "val",
        [
            ("ILSVRC2012_val_00000001.JPEG", jpeg_bytes(40, 30, seed=7)),
            ("ILSVRC2012_val_00000002.JPEG", png_bytes(40, 30, seed=8)),
        ],
    )  # PNG disguised as JPEG
    _voc(
        tmp_path / "boxes" / "val" / "ILSVRC2012_val_00000001.xml",
        (40, 30),
        [("n02000000", (1, 1, 10, 10)), ("n02000000", (5, 6, 39, 29))],
    )
    _voc(tmp_path / "boxes" / "val" / "ILSVRC2012_val_00000002.xml", (40, 30), [("n01000000", (0, 0, 40, 30))])
    res = convert_imagenet(tmp_path / "train", tmp_path / "val", tmp_path / "boxes", tmp_path / "out", options=OPTS)
    train = load_manifest(tmp_path / "out" / "train")
    assert train.class_names == ["n01000000", "n02000000"] and train.num_samples == 4
    tm = _metas(tmp_path / "out" / "train")
    assert tm[key_from_id("n01000000/n01000000_0.JPEG")] == {
        "id": "n01000000/n01000000_0.JPEG",
        "label": 0,
        "width": 40,
        "height": 30,
        "boxes": [[3, 4, 20, 25]],
    }
    assert (
        tm[key_from_id("n02000000/n02000000_1.JPEG")]["boxes"] == []
        and tm[key_from_id("n02000000/n02000000_1.JPEG")]["label"] == 1
    )
    vm = _metas(tmp_path / "out" / "val")
    assert vm["ILSVRC2012_val_00000001"]["label"] == 1
    assert vm["ILSVRC2012_val_00000001"]["boxes"] == [[1, 1, 10, 10], [5, 6, 39, 29]]
    assert vm["ILSVRC2012_val_00000002"]["label"] == 0
    assert res["val"].manifest.conversions == {"kept": 1, "png_as_jpeg": 1}

    # Val in class folders works too; an XML whose size disagrees with the image is an error.
    write_files(tmp_path / "val2" / "n01000000", [("x.JPEG", jpeg_bytes(40, 30, seed=9))])
    _voc(tmp_path / "boxes2" / "x.xml", (41, 30), [("n01000000", (0, 0, 5, 5))])
    with pytest.raises(SourceError, match="x.JPEG.*40x30.*41x30"):
        convert_imagenet(tmp_path / "train", tmp_path / "val2", tmp_path / "boxes2", tmp_path / "out2", options=OPTS)


def _wsolmeta_boxes(tmp_path: Path) -> None:
    ids = ["001.A/a1.jpg", "001.A/a2.jpg", "002.B/b1.jpg"]
    write_files(tmp_path / "images", [(p, jpeg_bytes(60, 50, seed=i)) for i, p in enumerate(ids)])
    for split in ("train", "test"):
        d = tmp_path / "metadata" / "CUB" / split
        d.mkdir(parents=True)
        (d / "image_ids.txt").write_text("".join(f"{p}\n" for p in ids))
        (d / "class_labels.txt").write_text("001.A/a1.jpg,0\n001.A/a2.jpg,0\n002.B/b1.jpg,1\n")
        (d / "image_sizes.txt").write_text("".join(f"{p},60,50\n" for p in ids))
    (tmp_path / "metadata" / "CUB" / "test" / "localization.txt").write_text(
        "001.A/a1.jpg,1,2,30,40\n001.A/a1.jpg,10,12,59,49\n001.A/a2.jpg,0,0,59,49\n002.B/b1.jpg,5,5,20,20\n"
    )


def test_wsolmeta_boxes_multi_box(tmp_path):
    _wsolmeta_boxes(tmp_path)
    res = convert_wsolmeta(tmp_path / "images", tmp_path / "metadata" / "CUB", tmp_path / "out", options=OPTS)
    assert set(res) == {"train", "test"}
    test = load_manifest(tmp_path / "out" / "test")
    assert test.dataset == "CUB" and test.num_classes == 2 and not test.has_masks
    metas = _metas(tmp_path / "out" / "test")
    assert metas[key_from_id("001.A/a1.jpg")]["boxes"] == [[1, 2, 30, 40], [10, 12, 59, 49]]
    assert metas[key_from_id("002.B/b1.jpg")]["label"] == 1
    assert all(m["boxes"] == [] for m in _metas(tmp_path / "out" / "train").values())  # no localization.txt
    # image_sizes.txt disagreeing with the file is an error naming the image.
    (tmp_path / "metadata" / "CUB" / "test" / "image_sizes.txt").write_text(
        "001.A/a1.jpg,60,50\n001.A/a2.jpg,61,50\n002.B/b1.jpg,60,50\n"
    )
    with pytest.raises(SourceError, match="001.A/a2.jpg"):
        convert_wsolmeta(
            tmp_path / "images", tmp_path / "metadata" / "CUB", tmp_path / "out3", splits=["test"], options=OPTS
        )


def _reference_get_mask(masks_root: Path, mask_paths: list[str], ignore_path: str) -> np.ndarray:
    """The protocol's get_mask (wsolevaluation), with OpenCV, for comparison."""
    cv2 = pytest.importorskip("cv2")

    def load(p):
        m = np.float32(cv2.imread(str(masks_root / p), cv2.IMREAD_GRAYSCALE))
        return cv2.resize(m, (224, 224), interpolation=cv2.INTER_NEAREST)

    fg = np.stack([load(p) > 0.5 for p in mask_paths]).any(axis=0)
    out = fg.astype(np.uint8)
    if ignore_path:
        ign = load(ignore_path) > 0.5
        out += 255 * np.logical_and(ign, ~fg).astype(np.uint8)
    return out


def test_wsolmeta_mask_form_openimages(tmp_path):
    ids = ["val/01/x1.jpg", "val/01/x2.jpg"]
    write_files(tmp_path / "images", [(p, jpeg_bytes(70, 50, seed=i)) for i, p in enumerate(ids)])
    write_files(
        tmp_path / "masks",
        [
            ("val/01/x1_m1.png", mask_png(70, 50, (5, 5, 20, 30))),
            ("val/01/x1_m2.png", mask_png(70, 50, (40, 10, 60, 45))),
            ("val/01/x1_ignore.png", mask_png(70, 50, (0, 0, 69, 20))),
            ("val/01/x2_m1.png", mask_png(70, 50, (10, 10, 30, 30))),
        ],
    )
    d = tmp_path / "metadata" / "OpenImages" / "val"
    d.mkdir(parents=True)
    (d / "image_ids.txt").write_text("".join(f"{p}\n" for p in ids))
    (d / "class_labels.txt").write_text("val/01/x1.jpg,0\nval/01/x2.jpg,0\n")
    (d / "localization.txt").write_text(
        "val/01/x1.jpg,val/01/x1_m1.png,val/01/x1_ignore.png\nval/01/x1.jpg,val/01/x1_m2.png,\nval/01/x2.jpg,val/01/x2_m1.png,\n"
    )
    convert_wsolmeta(
        tmp_path / "images",
        tmp_path / "metadata" / "OpenImages",
        tmp_path / "out",
        masks_root=tmp_path / "masks",
        num_classes=5,
        options=OPTS,
    )
    m = load_manifest(tmp_path / "out" / "val")
    assert m.has_masks and m.num_classes == 5
    members = all_members(tmp_path / "out" / "val")
    k1, k2 = key_from_id(ids[0]), key_from_id(ids[1])
    assert f"{k1}.ignore.png" in members and f"{k2}.ignore.png" not in members
    got = protocol_mask(members[f"{k1}.mask.png"], members[f"{k1}.ignore.png"], size=224, shard="s", key=k1)
    want = _reference_get_mask(tmp_path / "masks", ["val/01/x1_m1.png", "val/01/x1_m2.png"], "val/01/x1_ignore.png")
    assert np.array_equal(got, want) and set(np.unique(got)) == {0, 1, 255}
    got2 = protocol_mask(members[f"{k2}.mask.png"], None, size=224, shard="s", key=k2)
    assert np.array_equal(got2, _reference_get_mask(tmp_path / "masks", ["val/01/x2_m1.png"], ""))


def _cli():
    spec = importlib.util.spec_from_file_location("make_shards", ROOT / "jobs" / "make_shards.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module


def test_cli_subcommands(tmp_path, capsys):
    cli = _cli()
    assert (
        cli.main(
            [
                "synthetic",
                "--out",
                str(tmp_path / "syn"),
                "--num-train",
                "8",
                "--num-val",
                "4",
                "--num-test",
                "0",
                "--size",
                "48",
                "--classes",
                "3",
                "--seed",
                "2",
                "--workers",
                "1",
                "--no-progress",
            ]
        )
        == 0
    )
    assert load_manifest(tmp_path / "syn" / "train").num_classes == 3
    _cub(tmp_path / "CUB_200_2011")
    assert (
        cli.main(
            [
                "cub",
                "--root",
                str(tmp_path / "CUB_200_2011"),
                "--out",
                str(tmp_path / "cub"),
                "--shard-bytes",
                "200k",
                "--workers",
                "1",
                "--no-progress",
            ]
        )
        == 0
    )
    _wsolmeta_boxes(tmp_path / "wm")
    assert (
        cli.main(
            [
                "wsolmeta",
                "--images",
                str(tmp_path / "wm" / "images"),
                "--metadata",
                str(tmp_path / "wm" / "metadata" / "CUB"),
                "--out",
                str(tmp_path / "wm_out"),
                "--splits",
                "test",
                "--workers",
                "1",
                "--no-progress",
            ]
        )
        == 0
    )
    (tmp_path / "wm_out" / "test" / "test-000000.idx").unlink()
    with pytest.raises(Exception, match="missing DALI index file"):
        cli.main(["verify", str(tmp_path / "wm_out" / "test")])
    assert cli.main(["index", str(tmp_path / "wm_out" / "test")]) == 0
    assert cli.main(["verify", str(tmp_path / "wm_out" / "test"), "--full"]) == 0
    out = capsys.readouterr().out
    assert "OK, 3 samples" in out and "cub/train: 3 samples" in out
    img = Image.open(io.BytesIO(all_members(tmp_path / "cub" / "train")[key_from_id("001.Albatross/A_1.jpg") + ".jpg"]))
    assert img.size == (50, 40)


def test_mask_resize_matches_opencv_inter_nearest_for_every_side():
    """``resize_nearest`` samples the pixels ``cv2.resize(INTER_NEAREST)`` samples, for every source
    side up to 1,200 (the plain ``floor(x * w / 224)`` differs from OpenCV for 68 of them)."""
    cv2 = pytest.importorskip("cv2")
    differing = []
    for side in range(1, 1201):
        source = np.arange(side, dtype=np.float32)[None, :]
        want = cv2.resize(source, (224, 1), interpolation=cv2.INTER_NEAREST)[0].astype(np.int64)
        got = resize_nearest(np.arange(side)[None, :], 224)
        if not (got[0] == want).all() or not (got == got[0]).all():
            differing.append(side)
    assert differing == []
    rows = np.arange(333)[:, None]  # heights are sampled the same way
    want = cv2.resize(rows.astype(np.float32), (1, 224), interpolation=cv2.INTER_NEAREST)[:, 0].astype(np.int64)
    np.testing.assert_array_equal(resize_nearest(rows, 224)[:, 0], want)
