"""Bad input: a clear error naming the shard and key, or (skip_corrupt) a counted skip. Never silent."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest
from data_fixtures import bogus_huffman_jpeg, flipped_scan_jpeg, good_split, jpeg_bytes, sample_members, write_raw_split

from wsol_core.data.format import ShardError
from wsol_core.data.loader import build_loader

BACKENDS = ["dali", "torch"]
N = 10  # samples per split: shards of 4, 4, 2; the bad one is s005 in the second shard


def _split(tmp_path: Path, bad_key: str = "s005", **bad) -> Path:
    """A hand-made eval split whose sample ``bad_key`` is built from the ``bad`` overrides."""
    shards, members = [], []
    for i in range(N):
        key = f"s{i:03d}"
        m = sample_members(key, label=i % 3, seed=i)
        if key == bad_key:
            if "image" in bad:
                m[1] = (m[1][0], bad["image"])
            if "meta" in bad:
                meta = json.loads(m[2][1])
                meta.update(bad["meta"])
                m[2] = (m[2][0], json.dumps(meta).encode())
            for ext in bad.get("drop", ()):
                m = [x for x in m if not x[0].endswith("." + ext)]
        members += m
        if len(members) and (i % 4 == 3 or i == N - 1):
            shards.append(members)
            members = []
    root = tmp_path / "val"
    write_raw_split(root, shards)
    return root


def _run(split_dir: Path, backend: str, **kw):
    loader = build_loader(
        split_dir, split_kind="eval", batch_size=4, crop_size=32, backend=backend, num_threads=1, **kw
    )
    return loader, list(loader)


def _header_zeroed() -> bytes:
    good = jpeg_bytes(64, 48, seed=5)
    return good[:2] + b"\x00" * 100 + good[102:]


RUNTIME_CASES = {
    # name: (bad sample overrides, expected reason)
    "corrupt_jpeg": (dict(image=_header_zeroed()), r"cannot decode image|JPEG data fails a strict decode"),
    "flipped_scan": (dict(image=flipped_scan_jpeg()), r"JPEG data fails a strict decode \(Corrupt JPEG data"),
    "truncated_jpeg": (dict(image=jpeg_bytes(64, 48, seed=5)[:700]), r"truncated JPEG"),
    "random_bytes": (
        dict(image=b"\xff\xd8" + bytes(range(256)) * 3),
        r"truncated or corrupt JPEG|cannot decode|strict decode",
    ),
    "box_outside": (dict(meta={"boxes": [[2, 3, 70, 40]]}), r"box \[2, 3, 70, 40\] outside the 64x48 image"),
    "box_inverted": (dict(meta={"boxes": [[30, 3, 10, 40]]}), r"inverted box \[30, 3, 10, 40\]"),
    "wrong_size": (dict(meta={"width": 65, "boxes": []}), r"image is 64x48 but its json says 65x48"),
    "label_mismatch": (dict(meta={"label": 0}), r"cls says 2 but json label says 0"),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", sorted(RUNTIME_CASES))
def test_bad_sample_raises_naming_shard_and_key(tmp_path, backend, case):
    bad, reason = RUNTIME_CASES[case]
    split_dir = _split(tmp_path, **bad)
    with pytest.raises(ShardError, match=r"val-000001\.tar, sample 's005': (" + reason + ")") as info:
        _run(split_dir, backend)
    assert info.value.key == "s005" and info.value.shard.endswith("val-000001.tar")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", ["corrupt_jpeg", "flipped_scan", "truncated_jpeg", "box_outside", "wrong_size"])
def test_skip_corrupt_counts_and_keeps_batches_equal(tmp_path, backend, case):
    bad, _ = RUNTIME_CASES[case]
    loader, batches = _run(_split(tmp_path, **bad), backend, skip_corrupt=True)
    assert len(batches) == 3 and all(len(b) == 4 for b in batches)  # ceil(10 / 4): same count as clean data
    real = [k for b in batches for k, p in zip(b.keys, b.is_padding.tolist()) if not p]
    assert sorted(real) == [f"s{i:03d}" for i in range(N) if i != 5]
    assert loader.skipped.total == 1 and loader.skipped.examples[0][1] == "s005"
    assert "skipped 1 bad samples" in loader.skipped.summary()


def test_missing_members_fail_up_front_or_are_skipped(tmp_path):
    for drop, what in [(("json",), "json"), (("cls",), "cls"), (("jpg",), r"image \(jpg/png\)")]:
        split_dir = _split(tmp_path / "_".join(drop), drop=drop)
        with pytest.raises(ShardError, match=rf"val-000001\.tar, sample 's005': missing {what} member"):
            build_loader(split_dir, split_kind="eval", batch_size=4, crop_size=32)
        for backend in BACKENDS:
            loader, batches = _run(split_dir, backend, skip_corrupt=True)
            real = [k for b in batches for k, p in zip(b.keys, b.is_padding.tolist()) if not p]
            assert len(batches) == 3 and "s005" not in real and len(real) == N - 1
            assert loader.skipped.total == 1 and "missing" in loader.skipped.examples[0][2]


@pytest.mark.parametrize("backend", BACKENDS)
def test_missing_member_found_at_run_time_without_checks(tmp_path, backend):
    split_dir = _split(tmp_path, drop=("json",))
    with pytest.raises(ShardError, match=r"val-000001\.tar, sample 's005': missing json member"):
        _run(split_dir, backend, verify="none")


def test_manifest_and_index_problems_name_the_shard(tmp_path):
    split_dir = tmp_path / "val"
    good_split(split_dir, n=N, per_shard=4)
    manifest = json.loads((split_dir / "dataset.json").read_text())

    def check(match: str, **kw) -> None:
        with pytest.raises((ShardError, ValueError, FileNotFoundError), match=match):
            build_loader(split_dir, split_kind="eval", batch_size=4, crop_size=32, **kw)

    # Counts that do not match the manifest.
    doc = json.loads(json.dumps(manifest))
    doc["shards"][1]["num_samples"] = 5
    doc["num_samples"] = 11
    (split_dir / "dataset.json").write_text(json.dumps(doc))
    check(r"val-000001\.tar: index lists 4 samples but dataset.json says 5")
    # A wrong total.
    doc = json.loads(json.dumps(manifest))
    doc["num_samples"] = 12
    (split_dir / "dataset.json").write_text(json.dumps(doc))
    check(r"num_samples 12 differs from the sum of the shard counts 10")
    (split_dir / "dataset.json").write_text(json.dumps(manifest))
    # A hash that does not match (same size: only the full check sees it).
    tar = split_dir / "val-000002.tar"
    data = bytearray(tar.read_bytes())
    data[1600] ^= 0x55
    tar.write_bytes(bytes(data))
    build_loader(split_dir, split_kind="eval", batch_size=4, crop_size=32)  # fast mode: sizes and index only
    check(r"val-000002\.tar: SHA-256 [0-9a-f]+\.\.\. differs from dataset.json", verify="full")
    # A missing index file.
    (split_dir / "val-000001.idx").rename(split_dir / "moved.idx")
    check(r"val-000001\.tar: missing DALI index file val-000001\.idx; rebuild it with")
    (split_dir / "moved.idx").rename(split_dir / "val-000001.idx")
    # A missing shard, a missing manifest.
    tar.rename(split_dir / "gone.tar")
    check(r"val-000002\.tar: shard listed in dataset.json is missing")
    (split_dir / "dataset.json").unlink()
    check(r"dataset.json not found")


def test_truncated_tar(tmp_path):
    split_dir = tmp_path / "val"
    good_split(split_dir, n=N, per_shard=4)
    tar = split_dir / "val-000001.tar"
    tar.write_bytes(tar.read_bytes()[:5000])
    with pytest.raises(ShardError, match=r"val-000001\.tar: size 5000 bytes differs from dataset.json"):
        build_loader(split_dir, split_kind="eval", batch_size=4, crop_size=32)
    # Even a manifest that does not record sizes: the index says where the data should end.
    doc = json.loads((split_dir / "dataset.json").read_text())
    for s in doc["shards"]:
        s["bytes"] = 0
    (split_dir / "dataset.json").write_text(json.dumps(doc))
    with pytest.raises(
        ShardError,
        match=r"val-000001\.tar, sample 's00\d': truncated tar: the sample ends at byte \d+, the file has 5000",
    ):
        build_loader(split_dir, split_kind="eval", batch_size=4, crop_size=32)
    # With the checks off, the torch reader still refuses the cut tar instead of inventing data.
    with pytest.raises(ShardError, match=r"val-000001\.tar"):
        _run(split_dir, "torch", verify="none")


class _Payload:
    """Unpickling this creates a file: the test checks that it never exists."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


@pytest.mark.parametrize("backend", BACKENDS)
def test_shards_are_never_unpickled(tmp_path, backend):
    marker = tmp_path / "unpickled"
    members = []
    for i in range(4):
        members += sample_members(f"s{i:03d}", seed=i)
        members.append((f"s{i:03d}.pyd", pickle.dumps(_Payload(str(marker)))))
        members.append((f"s{i:03d}.pth", pickle.dumps(_Payload(str(marker)))))
    write_raw_split(tmp_path / "val", [members])
    _, batches = _run(tmp_path / "val", backend)
    assert [k for b in batches for k in b.keys] and not marker.exists()


@pytest.mark.parametrize("backend", BACKENDS)
def test_an_undecodable_training_sample_is_counted_once_per_epoch(tmp_path, backend):
    """Only a decoder finds this JPEG broken. DALI's prefetching reads a batch or two past the
    epoch's end; a bad sample met there once was counted twice in the epoch's skip report."""
    bogus_huffman = bogus_huffman_jpeg()
    shards, members = [], []
    for i in range(32):
        members += sample_members(f"t{i:03d}", label=i % 3, seed=i, image=bogus_huffman if i == 5 else None)
        if i % 8 == 7:
            shards.append(members)
            members = []
    write_raw_split(tmp_path / "train", shards, split="train")
    counts = {}
    for epoch in (0, 1):
        for rank in (0, 1):
            # jpeg_check=structure: the decoder itself must find the sample bad (DALI's rebuild path).
            loader = build_loader(
                tmp_path / "train",
                split_kind="train",
                rank=rank,
                world_size=2,
                batch_size=4,
                crop_size=32,
                resize_size=40,
                skip_corrupt=True,
                backend=backend,
                num_threads=1,
                jpeg_check="structure",
            )
            loader.set_epoch(epoch)
            assert sum(1 for _ in loader) == 4
            counts[epoch, rank] = [key for _, key, _ in loader.skipped.examples]
    for epoch in (0, 1):
        assert counts[epoch, 0] + counts[epoch, 1] == ["t005"], counts  # read once per epoch, by one rank


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_flipped_scan_is_silent_wrong_data_without_the_strict_check(tmp_path, backend):
    """Why ``jpeg_check=strict`` exists: with markers checked only, both decoders hand the smeared
    picture on as a good sample."""
    loader, batches = _run(
        _split(tmp_path, image=flipped_scan_jpeg()), backend, skip_corrupt=True, jpeg_check="structure"
    )
    real = [k for b in batches for k, p in zip(b.keys, b.is_padding.tolist()) if not p]
    assert "s005" in real and loader.skipped.total == 0


def test_the_strict_decode_gives_pils_pixels():
    """The torch workers take their pixels from the strict decode: they must be PIL's, for every
    chroma subsampling, grey and CMYK (the last converted by PIL itself)."""
    import io

    import numpy as np
    from data_fixtures import natural_array
    from PIL import Image

    from wsol_core.data.format import decode_jpeg_strict

    for mode in ("RGB", "L", "CMYK"):
        for subsampling in (0, 1, 2):
            for w, h in ((333, 517), (64, 48)):
                buf = io.BytesIO()
                Image.fromarray(natural_array(w, h, 3)).convert(mode).save(
                    buf, format="JPEG", quality=90, subsampling=subsampling
                )
                data = buf.getvalue()
                strict = decode_jpeg_strict(data)
                pil = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
                if mode == "CMYK":
                    assert strict is None
                else:
                    assert strict is not None and np.array_equal(strict, pil), (mode, subsampling, w, h)


def test_strict_and_structure_checks_give_the_same_batches(tmp_path):
    split_dir = tmp_path / "val"
    good_split(split_dir)
    images = {}
    for check in ("strict", "structure"):
        _, batches = _run(split_dir, "torch", jpeg_check=check)
        images[check] = [b.images for b in batches]
    assert all(a.equal(b) for a, b in zip(images["strict"], images["structure"], strict=True))


def test_the_check_is_chosen_in_the_config():
    from wsol_core.config import ConfigError, load_config
    from wsol_core.train.loop import eval_loader_options, loader_options

    assert loader_options(load_config()).jpeg_check == "strict"
    cfg = load_config(overrides=["data.jpeg_check=structure"])
    assert loader_options(cfg).jpeg_check == "structure" and eval_loader_options(cfg).jpeg_check == "structure"
    with pytest.raises(ConfigError, match="data.jpeg_check"):
        load_config(overrides=["data.jpeg_check=maybe"])
