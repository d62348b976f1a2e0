"""DALI (CPU mode) and torch loaders: same batches, rank sharding, epochs, options."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest
import torch
from data_fixtures import good_split
from hypothesis import given, settings
from hypothesis import strategies as st

from wsol_core.data.batch import Batch
from wsol_core.data.loader import EpochPlan, LoaderOptions, build_loader
from wsol_core.data.synthetic import SyntheticConfig, write_synthetic
from wsol_core.data.writer import WriterOptions

BACKENDS = ["dali", "torch"]


@pytest.fixture(scope="module")
def synth(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("synth")
    write_synthetic(
        root,
        num_train=40,
        num_val=22,
        num_test=0,
        config=SyntheticConfig(size=64, num_classes=4),
        options=WriterOptions(shard_max_samples=9, shard_max_bytes=None, progress=False),
    )
    return root


@pytest.fixture(scope="module")
def natural(tmp_path_factory) -> tuple[Path, list[str]]:
    root = tmp_path_factory.mktemp("natural") / "val"
    keys = good_split(root, n=11, per_shard=4)
    return root, keys


def _collect(loader) -> list[Batch]:
    return list(loader)


def _real(batches: list[Batch]) -> dict[str, tuple]:
    out = {}
    for b in batches:
        for i, key in enumerate(b.keys):
            if not b.is_padding[i]:
                assert key not in out, f"{key} yielded twice"
                n = int(b.num_boxes[i])
                out[key] = (
                    b.images[i],
                    int(b.labels[i]),
                    b.boxes[i, :n].tolist(),
                    b.orig_sizes[i].tolist(),
                    None if b.masks is None else b.masks[i],
                )
    return out


@pytest.mark.parametrize("dataset", ["synth", "natural"])
def test_dali_and_torch_give_the_same_eval_batches(dataset, synth, natural):
    split_dir = synth / "val" if dataset == "synth" else natural[0]
    runs = {}
    for backend in BACKENDS:
        loader = build_loader(split_dir, split_kind="eval", batch_size=4, crop_size=40, backend=backend, num_threads=1)
        assert loader.backend == backend
        batches = _collect(loader)
        assert len(batches) == len(loader)
        runs[backend] = _real(batches)
    dali, tv = runs["dali"], runs["torch"]
    assert sorted(dali) == sorted(tv) and len(dali) in (22, 11)
    max_diff = 0.0
    for key in dali:
        img_d, *meta_d, mask_d = dali[key]
        img_t, *meta_t, mask_t = tv[key]
        assert meta_d == meta_t, key  # labels, boxes, original sizes: identical
        assert img_d.shape == img_t.shape == (3, 40, 40)
        max_diff = max(max_diff, float((img_d - img_t).abs().max()))
        assert float((img_d - img_t).abs().mean()) < 0.02, key
        if dataset == "synth":
            assert mask_d is not None and torch.equal(mask_d, mask_t) and mask_d.shape == (224, 224)
    # Two JPEG decoders and two antialiased bilinear resizes: a few grey levels at most.
    assert max_diff < 0.25


def test_eval_order_and_padding(natural):
    split_dir, keys = natural
    loader = build_loader(split_dir, split_kind="eval", batch_size=4, crop_size=32, backend="dali")
    batches = _collect(loader)
    assert len(batches) == 3 and [len(b) for b in batches] == [4, 4, 4]
    flat = [k for b in batches for k in b.keys]
    assert flat[:11] == keys  # evaluation reads in shard order
    assert [bool(p) for b in batches for p in b.is_padding] == [False] * 11 + [True]
    b = batches[0]
    assert b.images.dtype == torch.float32 and b.images.shape == (4, 3, 32, 32)
    assert b.labels.tolist() == [0, 1, 2, 0] and b.orig_sizes.tolist() == [[64, 48]] * 4
    assert b.boxes.shape == (4, 1, 4) and b.num_boxes.tolist() == [1, 1, 1, 1] and b.masks is None
    assert b.boxes[0, 0].tolist() == [2, 3, 59, 44]


@pytest.mark.parametrize("backend", BACKENDS)
def test_rank_sharding_equal_batches_disjoint_coverage(backend, synth):
    world, bsz = 3, 4
    train_keys, eval_keys, counts = [], Counter(), set()
    for rank in range(world):
        tl = build_loader(
            synth / "train",
            split_kind="train",
            batch_size=bsz,
            resize_size=64,
            crop_size=48,
            rank=rank,
            world_size=world,
            backend=backend,
            num_threads=1,
            seed=5,
        )
        tl.set_epoch(0)
        batches = _collect(tl)
        counts.add(("train", len(batches), len(tl)))
        assert all(len(b) == bsz and not b.is_padding.any() for b in batches)
        train_keys.append([k for b in batches for k in b.keys])
        el = build_loader(
            synth / "val",
            split_kind="eval",
            batch_size=bsz,
            crop_size=48,
            rank=rank,
            world_size=world,
            backend=backend,
            num_threads=1,
        )
        eb = _collect(el)
        counts.add(("eval", len(eb), len(el)))
        eval_keys.update(k for b in eb for k, p in zip(b.keys, b.is_padding.tolist()) if not p)
    # Every rank yields the same number of batches: (40 // 3) // 4 = 3 train, ceil(ceil(22 / 3) / 4) = 2 eval.
    assert counts == {("train", 3, 3), ("eval", 2, 2)}
    flat = [k for keys in train_keys for k in keys]
    assert len(flat) == len(set(flat)) == 36  # disjoint within an epoch, remainder dropped
    assert set(eval_keys) == {f"val_{i:07d}" for i in range(22)} and set(eval_keys.values()) == {1}


@pytest.mark.parametrize("backend", BACKENDS)
def test_epoch_order_is_a_function_of_seed_and_epoch(backend, synth):
    def run(epoch, seed=1, rank=0, world=2):
        loader = build_loader(
            synth / "train",
            split_kind="train",
            batch_size=5,
            resize_size=64,
            crop_size=48,
            rank=rank,
            world_size=world,
            backend=backend,
            num_threads=1,
            seed=seed,
        )
        loader.set_epoch(epoch)
        batches = _collect(loader)
        return [k for b in batches for k in b.keys], torch.cat([b.images for b in batches])

    k1, x1 = run(1)
    k1b, x1b = run(1)
    assert k1 == k1b and torch.equal(x1, x1b)  # a resumed run gets the same epoch, images included
    k2, _ = run(2)
    assert k2 != k1
    # Slices rotate: in epoch 1 rank 0 reads what rank 1 read in epoch 0.
    k_r1e0, _ = run(0, rank=1)
    assert set(k1) <= set(k_r1e0) | set(run(1, rank=1)[0]) and set(k1) & set(k_r1e0)
    assert run(1, seed=2)[0] != k1


@pytest.mark.parametrize("backend", BACKENDS)
def test_channels_last_random_resized_crop_and_masks(backend, synth):
    loader = build_loader(
        synth / "train",
        split_kind="train",
        batch_size=8,
        crop_size=32,
        random_resized_crop=True,
        channels_last=True,
        backend=backend,
        num_threads=1,
    )
    b = next(iter(loader))
    assert b.images.shape == (8, 3, 32, 32) and b.images.is_contiguous(memory_format=torch.channels_last)
    assert b.masks is None and b.labels.dtype == torch.int64 and b.boxes.dtype == torch.float32
    # Normalized with ImageNet statistics: values around 0, well outside [0, 1].
    assert -2.2 < float(b.images.min()) < 0 and 0 < float(b.images.max()) < 2.7
    ev = build_loader(
        synth / "val", split_kind="eval", batch_size=8, crop_size=32, backend=backend, num_threads=1, mask_size=56
    )
    eb = next(iter(ev))
    assert eb.masks is not None and eb.masks.shape == (8, 56, 56) and eb.masks.dtype == torch.uint8
    no_masks = build_loader(
        synth / "val", split_kind="eval", batch_size=8, crop_size=32, backend=backend, num_threads=1, load_masks=False
    )
    assert next(iter(no_masks)).masks is None


def test_torch_loader_in_process_matches_workers(synth):
    def keys(threads):
        loader = build_loader(
            synth / "val", split_kind="eval", batch_size=6, crop_size=32, backend="torch", num_threads=threads
        )
        return sorted(k for b in loader for k, p in zip(b.keys, b.is_padding.tolist()) if not p)

    assert keys(0) == keys(2) == [f"val_{i:07d}" for i in range(22)]


def test_options_and_plan_are_checked(synth):
    with pytest.raises(TypeError, match="unknown loader options.*bogus"):
        build_loader(synth / "val", split_kind="eval", bogus=1)
    with pytest.raises(ValueError, match="crop_size 300 is larger than resize_size 256"):
        build_loader(synth / "train", split_kind="train", crop_size=300)
    with pytest.raises(ValueError, match="40 samples give no full batch of 32 per rank on 2 ranks"):
        build_loader(synth / "train", split_kind="train", batch_size=32, world_size=2, crop_size=32)
    with pytest.raises(ValueError, match="split_kind"):
        build_loader(synth / "val", split_kind="test")
    loader = build_loader(synth / "val", split_kind="eval", options=LoaderOptions(batch_size=3, crop_size=32))
    assert loader.backend == "dali" and "DALI in CPU mode" in loader.backend_reason and len(loader) == 8
    plan = EpochPlan(num_samples=10, batch_size=3, rank=2, world_size=3, epoch=0, kind="eval")
    assert (plan.start, plan.stop, plan.num_batches) == (6, 10, 2)
    assert EpochPlan(10, 3, 2, 3, 1, "train").slice_id == 0


@settings(max_examples=200, deadline=None)
@given(n=st.integers(1, 5000), world=st.integers(1, 16), bsz=st.integers(1, 300), epoch=st.integers(0, 50))
def test_epoch_plan_covers_every_sample_with_equal_batch_counts(n, world, bsz, epoch):
    if n < world:
        return
    train = [EpochPlan(n, bsz, r, world, epoch, "train") for r in range(world)]
    evals = [EpochPlan(n, bsz, r, world, epoch, "eval") for r in range(world)]
    for plans in (train, evals):
        spans = sorted((p.start, p.stop) for p in plans)
        assert spans[0][0] == 0 and spans[-1][1] == n and all(a[1] == b[0] for a, b in zip(spans, spans[1:]))
        assert len({p.num_batches for p in plans}) == 1  # equal batch counts: no DDP deadlock
    assert len({p.slice_id for p in train}) == world  # a permutation of the slices in every epoch
    for p in train:
        assert p.num_batches * bsz <= p.slice_size  # training only drops, never repeats
    for p in evals:
        assert p.num_batches * bsz >= p.slice_size > 0  # evaluation pads, never drops
        assert (p.num_batches - 1) * bsz < max(q.slice_size for q in evals)
