"""The torch loader's ``decode="device"`` path: batched ``torchvision.io.decode_jpeg`` plus crops,
resizes and flips on the loader's device. On the CPU here (the same code short of CUDA); against
the worker (PIL) path on a GPU in the ``gpu``-marked test."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from data_fixtures import bogus_huffman_jpeg, good_split, jpeg_bytes, png_bytes, sample_members, write_raw_split
from test_data_loaders import synth  # noqa: F401  (the loader tests' synthetic split, a fixture)

from wsol_core.config import ConfigError, load_config
from wsol_core.data.format import ShardError
from wsol_core.data.loader import build_loader
from wsol_core.train.loop import eval_loader_options, loader_options

N = 10


def _mixed_split(root: Path) -> Path:
    """JPEGs of several sizes, a greyscale JPEG and a PNG (decoded in the worker, resized on the device)."""
    shards, members = [], []
    for i in range(N):
        key = f"s{i:03d}"
        w, h = (64, 48) if i % 2 else (50, 70)
        image = png_bytes(w, h, seed=i) if i == 3 else jpeg_bytes(w, h, seed=i, mode="L" if i == 6 else "RGB")
        sample = sample_members(key, label=i % 3, w=w, h=h, seed=i, image=image)
        members += [(n.replace(".jpg", ".png"), d) for n, d in sample] if i == 3 else sample
        if i % 4 == 3 or i == N - 1:
            shards.append(members)
            members = []
    write_raw_split(root / "val", shards)
    return root / "val"


def _by_key(loader) -> dict[str, tuple]:
    out = {}
    for b in loader:
        for i, key in enumerate(b.keys):
            if not b.is_padding[i]:
                out[key] = (
                    b.images[i],
                    int(b.labels[i]),
                    b.boxes[i, : int(b.num_boxes[i])].tolist(),
                    b.orig_sizes[i].tolist(),
                    None if b.masks is None else b.masks[i],
                )
    return out


def _compare(a: dict, b: dict, mean_tol: float = 0.02, max_tol: float = 0.3) -> float:
    assert sorted(a) == sorted(b) and a
    worst = 0.0
    for key in a:
        img_a, *meta_a, mask_a = a[key]
        img_b, *meta_b, mask_b = b[key]
        assert meta_a == meta_b, key
        assert img_a.shape == img_b.shape
        assert (mask_a is None) == (mask_b is None) and (mask_a is None or torch.equal(mask_a, mask_b))
        diff = (img_a - img_b).abs()
        assert float(diff.mean()) < mean_tol, key  # normalized units: 0.02 is about 1 grey level
        worst = max(worst, float(diff.max()))
    assert worst < max_tol  # PIL's and torch's antialiased bilinear differ by a few grey levels
    return worst


@pytest.mark.parametrize("threads", [0, 2])
def test_eval_batches_match_the_worker_path(tmp_path, threads):
    split_dir = _mixed_split(tmp_path)
    runs = {}
    for decode in ("workers", "device"):
        loader = build_loader(
            split_dir,
            split_kind="eval",
            batch_size=4,
            crop_size=40,
            backend="torch",
            num_threads=threads,
            decode=decode,
        )
        runs[decode] = _by_key(loader)
        assert len(runs[decode]) == N
    _compare(runs["workers"], runs["device"])
    assert runs["workers"]["s006"][0].shape == (3, 40, 40)  # the greyscale JPEG comes out as RGB


@pytest.mark.parametrize("rrc", [False, True])
def test_training_draws_the_same_crops_and_flips(synth, rrc):
    """Same seed, same epoch: the same crop and flip per sample in both decode modes (a wrong
    draw order would move whole crops, far beyond the resize's grey-level differences)."""
    runs = {}
    for decode in ("workers", "device"):
        loader = build_loader(
            synth / "train",
            split_kind="train",
            batch_size=8,
            resize_size=64,
            crop_size=48,
            random_resized_crop=rrc,
            backend="torch",
            num_threads=2,
            seed=3,
            decode=decode,
            channels_last=True,
        )
        loader.set_epoch(1)
        runs[decode] = _by_key(loader)
        assert next(iter(loader)).images.is_contiguous(memory_format=torch.channels_last)
    _compare(runs["workers"], runs["device"], max_tol=0.5)
    # and the flips are really drawn: mirrored copies of the device images do not match the workers'
    mirrored = sum(
        float((runs["device"][k][0].flip(-1) - runs["workers"][k][0]).abs().mean()) < 0.02 for k in runs["device"]
    )
    assert mirrored < len(runs["device"]) // 2


def test_masks_ride_along(synth):
    runs = {
        d: _by_key(
            build_loader(
                synth / "val", split_kind="eval", batch_size=8, crop_size=32, backend="torch", num_threads=1, decode=d
            )
        )
        for d in ("workers", "device")
    }
    assert all(v[-1] is not None for v in runs["device"].values())
    _compare(runs["workers"], runs["device"])


def _bad_split(tmp_path: Path, image: bytes) -> Path:
    shards, members = [], []
    for i in range(N):
        key = f"s{i:03d}"
        members += sample_members(key, label=i % 3, seed=i, image=image if key == "s005" else None)
        if i % 4 == 3 or i == N - 1:
            shards.append(members)
            members = []
    write_raw_split(tmp_path / "val", shards)
    return tmp_path / "val"


def test_an_undecodable_jpeg_is_named_or_counted(tmp_path):
    split_dir = _bad_split(tmp_path, bogus_huffman_jpeg())
    with pytest.raises(ShardError, match=r"val-000001\.tar, sample 's005': cannot decode image \(Bogus Huffman table"):
        list(
            build_loader(
                split_dir,
                split_kind="eval",
                batch_size=4,
                crop_size=32,
                backend="torch",
                num_threads=1,
                decode="device",
            )
        )
    loader = build_loader(
        split_dir,
        split_kind="eval",
        batch_size=4,
        crop_size=32,
        backend="torch",
        num_threads=1,
        decode="device",
        skip_corrupt=True,
    )
    batches = list(loader)
    assert len(batches) == 3 and all(len(b) == 4 for b in batches)
    real = [k for b in batches for k, p in zip(b.keys, b.is_padding.tolist()) if not p]
    assert sorted(real) == [f"s{i:03d}" for i in range(N) if i != 5]
    assert loader.skipped.total == 1 and loader.skipped.examples[0][1] == "s005"
    # the bad sample's slot holds a flagged repeat of a good one of its batch, never its pixels
    assert all("s005" not in b.keys for b in batches) and int(batches[1].is_padding.sum()) == 1


def test_truncated_jpeg_is_still_caught_in_the_worker(tmp_path):
    split_dir = _bad_split(tmp_path, jpeg_bytes(64, 48, seed=5)[:700])
    with pytest.raises(ShardError, match=r"sample 's005': truncated JPEG"):
        list(
            build_loader(
                split_dir,
                split_kind="eval",
                batch_size=4,
                crop_size=32,
                backend="torch",
                num_threads=1,
                decode="device",
            )
        )


def test_config_carries_decode_and_exact_evaluation_keeps_pil(tmp_path):
    cfg = load_config(overrides=["data.decode=device", "data.loader=torch"])
    assert loader_options(cfg).decode == "device"
    assert eval_loader_options(cfg).decode == "workers"  # eval.loader=exact: the protocol's pixels
    assert (
        eval_loader_options(
            load_config(overrides=["data.decode=device", "data.loader=torch", "eval.loader=same"])
        ).decode
        == "device"
    )
    with pytest.raises(ConfigError, match="data.decode = device applies to the torch loader"):
        load_config(overrides=["data.decode=device", "data.loader=dali"])
    with pytest.raises(ValueError, match="decode must be workers or device"):
        good_split(tmp_path / "v", n=4)
        build_loader(tmp_path / "v", split_kind="eval", batch_size=2, crop_size=32, decode="gpu")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_nvjpeg_on_the_gpu_matches_the_worker_path(tmp_path, synth):
    split_dir = _mixed_split(tmp_path)
    cpu = _by_key(
        build_loader(split_dir, split_kind="eval", batch_size=4, crop_size=40, backend="torch", num_threads=2)
    )
    gpu_loader = build_loader(
        split_dir,
        split_kind="eval",
        batch_size=4,
        crop_size=40,
        backend="torch",
        num_threads=2,
        decode="device",
        device="cuda",
    )
    gpu = _by_key(gpu_loader)
    assert all(v[0].is_cuda for v in gpu.values())
    # nvJPEG's IDCT differs from libjpeg's by a grey level or two on top of the resize
    _compare(
        cpu,
        {k: (v[0].cpu(), *v[1:-1], None if v[-1] is None else v[-1].cpu()) for k, v in gpu.items()},
        mean_tol=0.04,
        max_tol=0.6,
    )
    bad = _bad_split(tmp_path / "bad", bogus_huffman_jpeg())
    loader = build_loader(
        bad,
        split_kind="eval",
        batch_size=4,
        crop_size=32,
        backend="torch",
        num_threads=1,
        decode="device",
        device="cuda",
        skip_corrupt=True,
    )
    assert len(list(loader)) == 3 and loader.skipped.total == 1
