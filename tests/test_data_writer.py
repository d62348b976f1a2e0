"""The shard writer: round trip, DALI index files, determinism, resume, conversions."""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from data_fixtures import all_members, flipped_scan_jpeg, jpeg_bytes, png_bytes, tar_members, write_files
from PIL import Image

from wsol_core.data.format import (
    assign_keys,
    encoded_image_problem,
    key_from_id,
    read_index,
    resize_nearest,
    sha256_file,
)
from wsol_core.data.manifest import load_manifest, verify_split
from wsol_core.data.writer import FileMaterializer, SourceError, SourceRecord, WriterOptions, write_split

OPTS = WriterOptions(shard_max_samples=3, shard_max_bytes=None, progress=False)


def _source_tree(root: Path, n: int = 7) -> list[SourceRecord]:
    files = [(f"class{i % 2}/img_{i}.jpg", jpeg_bytes(40 + i, 30 + i, seed=i)) for i in range(n)]
    write_files(root, files)
    return [
        SourceRecord(rel, i % 2, ((1, 2, 20, 25),) if i % 3 else (), str(root / rel), expected_size=(40 + i, 30 + i))
        for i, (rel, _) in enumerate(files)
    ]


def _write(out: Path, records, split="val", opts=OPTS, **kw):
    return write_split(out, split, records, FileMaterializer(), dataset="t", num_classes=2, options=opts, **kw)


def test_round_trip_keeps_bytes_hashes_and_metadata(tmp_path):
    records = _source_tree(tmp_path / "src")
    res = _write(tmp_path / "out", records)
    m = load_manifest(tmp_path / "out" / "val")
    assert m.num_samples == 7 and [s.num_samples for s in m.shards] == [3, 3, 1]
    assert [s.name for s in m.shards] == ["val-000000.tar", "val-000001.tar", "val-000002.tar"]
    assert m.conversions == {"kept": 7} and m.writer_version and m.dataset == "t" and m.num_classes == 2
    for s in m.shards:
        assert sha256_file(tmp_path / "out" / "val" / s.name) == s.sha256
    members = all_members(tmp_path / "out" / "val")
    for rec in records:
        key = key_from_id(rec.image_id)
        assert members[f"{key}.jpg"] == Path(rec.path).read_bytes()  # not re-encoded
        meta = json.loads(members[f"{key}.json"])
        assert meta == {
            "id": rec.image_id,
            "label": rec.label,
            "width": rec.expected_size[0],
            "height": rec.expected_size[1],
            "boxes": [list(b) for b in rec.boxes],
        }
        assert members[f"{key}.cls"] == str(rec.label).encode()
    assert res.written == [s.name for s in m.shards] and not res.kept
    verify_split(tmp_path / "out" / "val", mode="full")


def test_index_matches_wds2idx_and_dali_reads_it(tmp_path):
    records = _source_tree(tmp_path / "src")
    _write(tmp_path / "out", records)
    split_dir = tmp_path / "out" / "val"
    tar = split_dir / "val-000000.tar"
    ours = (split_dir / "val-000000.idx").read_text()
    assert ours.startswith("v1.2 3\n")
    wds2idx = shutil.which("wds2idx")
    if wds2idx is not None and shutil.which("tar") is not None:
        subprocess.run([wds2idx, str(tar), str(tmp_path / "ref.idx")], check=True, capture_output=True)
        assert (tmp_path / "ref.idx").read_text() == ours

    # DALI's own reader, driven by our index files, returns every member byte for byte.
    from nvidia.dali import fn
    from nvidia.dali.pipeline import Pipeline

    m = load_manifest(split_dir)
    pipe = Pipeline(batch_size=7, num_threads=1, device_id=None)
    with pipe:
        img, js, cls = fn.readers.webdataset(
            paths=[str(split_dir / s.name) for s in m.shards],
            index_paths=[str(split_dir / s.index) for s in m.shards],
            ext=["jpg", "json", "cls"],
            missing_component_behavior="error",
        )
        pipe.set_outputs(img, js, cls)
    pipe.build()
    imgs, jss, clss = pipe.run()
    got = {
        json.loads(np.asarray(jss[i]).tobytes())["id"]: (np.asarray(imgs[i]).tobytes(), np.asarray(clss[i]).tobytes())
        for i in range(7)
    }
    assert {r.image_id for r in records} == set(got)
    for rec in records:
        assert got[rec.image_id] == (Path(rec.path).read_bytes(), str(rec.label).encode())


def test_output_is_deterministic(tmp_path):
    records = _source_tree(tmp_path / "src")
    _write(
        tmp_path / "a",
        records,
        split="train",
        opts=WriterOptions(shard_max_samples=3, shard_max_bytes=None, progress=False, seed=3),
    )
    # Different input order, and several processes: the same bytes.
    _write(
        tmp_path / "b",
        records[::-1],
        split="train",
        opts=WriterOptions(shard_max_samples=3, shard_max_bytes=None, progress=False, seed=3, workers=2),
    )
    files_a = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*") if p.is_file())
    files_b = sorted(p.relative_to(tmp_path / "b") for p in (tmp_path / "b").rglob("*") if p.is_file())
    assert files_a == files_b
    for rel in files_a:
        assert (tmp_path / "a" / rel).read_bytes() == (tmp_path / "b" / rel).read_bytes(), rel
    # The training split is shuffled (by the seed), not in id order.
    keys = [s.key for s in read_index(tmp_path / "a" / "train" / "train-000000.idx")]
    all_keys = sorted(key_from_id(r.image_id) for r in records)
    assert keys != all_keys[:3]
    with tarfile_open(tmp_path / "a" / "train" / "train-000000.tar") as tf:
        assert {(m.mtime, m.uid, m.gid, m.uname, m.gname) for m in tf} == {(0, 0, 0, "", "")}


def tarfile_open(path):
    import tarfile

    return tarfile.open(path)


def test_resume_keeps_verified_shards_and_rewrites_a_corrupt_one(tmp_path):
    records = _source_tree(tmp_path / "src")
    _write(tmp_path / "out", records)
    split_dir = tmp_path / "out" / "val"
    before = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in split_dir.glob("*.tar")}
    res = _write(tmp_path / "out", records)
    assert res.written == [] and res.kept == sorted(before) and res.corrupt_rewritten == []
    assert {p.name: p.stat().st_mtime_ns for p in split_dir.glob("*.tar")} == {k: v[0] for k, v in before.items()}

    # Damage a finished shard: the next run notices (hash) and rewrites only that one.
    victim = split_dir / "val-000001.tar"
    data = bytearray(victim.read_bytes())
    data[700] ^= 0xFF
    victim.write_bytes(bytes(data))
    res = _write(tmp_path / "out", records)
    assert res.corrupt_rewritten == ["val-000001.tar"] and res.written == ["val-000001.tar"]
    assert sorted(res.kept) == ["val-000000.tar", "val-000002.tar"]
    assert victim.read_bytes() == before["val-000001.tar"][1]
    # A deleted shard (an interrupted run) is written again, the others kept.
    (split_dir / "val-000002.tar").unlink()
    res = _write(tmp_path / "out", records)
    assert res.written == ["val-000002.tar"] and len(res.kept) == 2
    verify_split(split_dir, mode="full")
    # Other options (shard size): stale shards from the old plan are removed.
    res = _write(
        tmp_path / "out", records, opts=WriterOptions(shard_max_samples=10, shard_max_bytes=None, progress=False)
    )
    assert sorted(p.name for p in split_dir.glob("*.tar")) == ["val-000000.tar"]
    assert "val-000001.tar" in res.removed_stale


def test_shards_cut_by_bytes(tmp_path):
    records = [
        r.__class__(**{**r.__dict__, "size_hint": Path(r.path).stat().st_size}) for r in _source_tree(tmp_path / "src")
    ]
    one = max(r.size_hint for r in records) + 2048
    res = _write(
        tmp_path / "out",
        records,
        opts=WriterOptions(shard_max_samples=None, shard_max_bytes=2 * one + 100, progress=False),
    )
    counts = [s.num_samples for s in res.manifest.shards]
    assert sum(counts) == 7 and max(counts) <= 2 and len(counts) >= 4


def _cmyk_jpeg() -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((20, 24, 4), (0, 255, 255, 0), dtype=np.uint8), mode="CMYK").save(buf, format="JPEG")
    return buf.getvalue()


def test_cmyk_grayscale_and_png_as_jpeg_are_converted_and_counted(tmp_path):
    src = tmp_path / "src"
    files = {
        "a_rgb.JPEG": jpeg_bytes(24, 20, seed=1),
        "b_cmyk.JPEG": _cmyk_jpeg(),
        "c_gray.JPEG": jpeg_bytes(24, 20, seed=2, mode="L"),
        "d_png_as.JPEG": png_bytes(24, 20, seed=3),
        "e_real.png": png_bytes(24, 20, seed=4),
    }
    write_files(src, files.items())
    records = [SourceRecord(name, 0, (), str(src / name)) for name in files]
    res = _write(tmp_path / "out", records)
    assert res.manifest.conversions == {"cmyk": 1, "grayscale": 1, "kept": 2, "png_as_jpeg": 1}
    members = all_members(tmp_path / "out" / "val")
    assert members["a_rgb.jpg"] == files["a_rgb.JPEG"]
    assert members["e_real.png"] == files["e_real.png"]
    for key in ("b_cmyk", "c_gray", "d_png_as"):
        img = Image.open(io.BytesIO(members[f"{key}.jpg"]))
        assert img.format == "JPEG" and img.mode == "RGB" and img.size == (24, 20)
    # CMYK (0, 255, 255, 0) is red: the conversion keeps the colour.
    red = np.asarray(Image.open(io.BytesIO(members["b_cmyk.jpg"])))[10, 12]
    assert red[0] > 200 and red[1] < 60 and red[2] < 60


def test_bad_sources_name_the_image_or_are_skipped_and_counted(tmp_path):
    src = tmp_path / "src"
    good = jpeg_bytes(40, 30, seed=1)
    write_files(src, [("ok.jpg", good), ("cut.jpg", good[: len(good) // 2]), ("box.jpg", good)])
    records = [
        SourceRecord("ok.jpg", 0, ((0, 0, 10, 10),), str(src / "ok.jpg")),
        SourceRecord("cut.jpg", 0, (), str(src / "cut.jpg")),
    ]
    with pytest.raises(SourceError, match="cut.jpg.*truncated"):
        _write(tmp_path / "out", records)
    res = _write(
        tmp_path / "out2",
        records,
        opts=WriterOptions(shard_max_samples=3, shard_max_bytes=None, progress=False, skip_corrupt=True),
    )
    assert res.manifest.num_samples == 1
    assert [s["id"] for s in res.manifest.skipped] == ["cut.jpg"] and "truncated" in res.manifest.skipped[0]["reason"]

    inverted = [SourceRecord("box.jpg", 0, ((20, 5, 10, 8),), str(src / "box.jpg"))]
    with pytest.raises(SourceError, match="box.jpg.*inverted box"):
        _write(tmp_path / "out3", inverted)
    outside = [SourceRecord("box.jpg", 0, ((-3, 5, 45, 29),), str(src / "box.jpg"))]
    res = _write(tmp_path / "out4", outside)
    assert res.manifest.boxes_clipped == 1
    assert json.loads(tar_members(tmp_path / "out4" / "val" / "val-000000.tar")["box.json"])["boxes"] == [
        [0, 5, 40, 29]
    ]
    wrong_size = [SourceRecord("ok.jpg", 0, (), str(src / "ok.jpg"), expected_size=(41, 30))]
    with pytest.raises(SourceError, match="ok.jpg.*40x30.*41x30"):
        _write(tmp_path / "out5", wrong_size)


def test_a_source_jpeg_with_a_flipped_scan_is_named_or_skipped(tmp_path):
    """PIL decodes it without a word; the strict decode names it, for kept and converted JPEGs."""
    src = tmp_path / "src"
    write_files(
        src,
        [
            ("ok.jpg", jpeg_bytes(64, 48, seed=1)),
            ("smeared.jpg", flipped_scan_jpeg()),
            ("smeared_grey.jpg", flipped_scan_jpeg(mode="L")),
        ],
    )
    Image.open(src / "smeared.jpg").load()  # the reason for the check: no error from PIL
    for bad in ("smeared.jpg", "smeared_grey.jpg"):
        records = [SourceRecord("ok.jpg", 0, (), str(src / "ok.jpg")), SourceRecord(bad, 0, (), str(src / bad))]
        with pytest.raises(SourceError, match=rf"{bad}': JPEG data fails a strict decode \(Corrupt JPEG data"):
            _write(tmp_path / f"out_{bad}", records)
        res = _write(
            tmp_path / f"skip_{bad}",
            records,
            opts=WriterOptions(shard_max_samples=3, shard_max_bytes=None, progress=False, skip_corrupt=True),
        )
        assert res.manifest.num_samples == 1 and [s["id"] for s in res.manifest.skipped] == [bad]


def test_keys_are_tar_safe_and_unique():
    assert key_from_id("001.Black_footed_Albatross/Black_Footed_Albatross_0046_18.jpg") == (
        "001_Black_footed_Albatross__Black_Footed_Albatross_0046_18"
    )
    assert key_from_id("val/ILSVRC2012_val_00000001.JPEG") == "val__ILSVRC2012_val_00000001"
    keys = assign_keys(["a/b.c.jpg", "a_b_c.jpg", "x" * 300 + ".jpg"])
    assert len(set(keys)) == 3 and all("." not in k and "/" not in k and len(k) <= 88 for k in keys)
    with pytest.raises(ValueError, match="duplicate image ids"):
        assign_keys(["a.jpg", "a.jpg"])


def test_jpeg_structure_check():
    good = jpeg_bytes(32, 32, seed=5)
    assert encoded_image_problem(good, "jpg") is None
    assert "truncated" in encoded_image_problem(good[: len(good) - 40], "jpg")
    assert "PNG data" in encoded_image_problem(png_bytes(8, 8), "jpg")
    assert encoded_image_problem(b"", "jpg") == "empty image member"
    assert encoded_image_problem(png_bytes(8, 8), "png") is None
    assert "truncated PNG" in encoded_image_problem(png_bytes(8, 8)[:-5], "png")


def test_nearest_resize_matches_opencv():
    cv2 = pytest.importorskip("cv2")
    rng = np.random.default_rng(0)
    for h, w in [(375, 500), (100, 60), (224, 224), (7, 300)]:
        m = (rng.random((h, w)) > 0.5).astype(np.float32)
        assert np.array_equal(resize_nearest(m, 224), cv2.resize(m, (224, 224), interpolation=cv2.INTER_NEAREST))


def test_manifest_records_hash_of_every_tar(tmp_path):
    records = _source_tree(tmp_path / "src", n=4)
    res = _write(tmp_path / "out", records)
    doc = json.loads((tmp_path / "out" / "val" / "dataset.json").read_text())
    assert doc["num_samples"] == 4 and doc["split"] == "val"
    for s in doc["shards"]:
        assert hashlib.sha256((tmp_path / "out" / "val" / s["name"]).read_bytes()).hexdigest() == s["sha256"]
    assert res.manifest.shards[0].fingerprint
