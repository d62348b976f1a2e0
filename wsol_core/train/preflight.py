"""Checks a run makes before Ray starts: the data, the batch plan, the pretrained weights, and
where runs are stored. Shared by the training job and the experiments (search, sweeps), so that
what would fail inside a worker fails here, in seconds, with a message naming it."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from wsol_core.config import Config, ConfigError
from wsol_core.data.format import ShardError
from wsol_core.data.loader import EpochPlan
from wsol_core.data.manifest import check_shard_hashes, verify_split

SPLITS = ("train", "val", "test")


def default_storage_path() -> str:
    return str(Path(os.environ.get("WSOL_STORAGE_PATH", Path.home() / "wsol_runs")).resolve())


def check_data(root: Path, cfg: Config | None = None, hash_cache: Path | None = None) -> dict[str, Any]:
    """Everything about the data that would otherwise fail inside the workers, in seconds, before
    Ray starts: every split's manifest, index files, tar sizes and counts (``verify_split``), every
    tar's SHA-256 against the manifest (once per file version: cached by size and mtime), and,
    given ``cfg``, that every rank gets a full training batch and an evaluation sample. Returns
    what MLflow records of the data."""
    manifests = {}
    hashed = cached = 0
    for split in SPLITS:
        split_dir = root / split
        if not (split_dir / "dataset.json").is_file():
            raise ConfigError(
                f"data.root = {str(root)!r}: no {split}/dataset.json (write shards with jobs/make_shards.py)"
            )
        try:
            verified = verify_split(
                split_dir, mode="fast", tolerate_sample_problems=bool(cfg and cfg.data.skip_corrupt)
            )
            h, c = check_shard_hashes(verified, hash_cache)
        except (ShardError, ValueError, FileNotFoundError) as err:
            raise ConfigError(
                f"data: {err} (check the shards with `python jobs/make_shards.py verify {split_dir}`)"
            ) from None
        hashed, cached = hashed + h, cached + c
        manifests[split] = verified.manifest
    if hashed:
        print(
            f"[wsol] data: SHA-256 of {hashed} shards checked against their manifests ({cached} unchanged since their last check)",
            flush=True,
        )
    if cfg is not None:
        check_batches(cfg, {split: m.num_samples for split, m in manifests.items()})
        check_pseudo_boxes(cfg, root)
    train = manifests["train"]
    for split in ("val", "test"):
        if manifests[split].num_classes != train.num_classes:
            raise ConfigError(
                f"data.root = {str(root)!r}: {split} has {manifests[split].num_classes} classes, train has {train.num_classes}"
            )
    return {
        "dataset": train.dataset,
        "num_classes": train.num_classes,
        "tags": {
            f"data.{split}.sha256": ",".join(s.sha256[:16] for s in m.shards)[:4000] for split, m in manifests.items()
        },
        "counts": {split: m.num_samples for split, m in manifests.items()},
    }


def check_pseudo_boxes(cfg: Config, root: Path) -> None:
    """``data.pseudo_boxes`` describes the training split as it is now (SHA-256 of its manifest,
    count, keys), and a method that learns from pseudo boxes has them."""
    from wsol_core.data.pseudo_boxes import SidecarError, verify_sidecar
    from wsol_core.methods import method_class
    from wsol_core.train.loop import pseudo_box_dir

    needs = method_class(cfg.method.name).needs_pseudo_boxes
    sidecar = pseudo_box_dir(cfg, root)
    if not sidecar:
        if needs:
            raise ConfigError(
                f"method.name = {cfg.method.name!r} learns from pseudo boxes: set data.pseudo_boxes to a sidecar "
                "written by jobs/extract_boxes.py (e.g. train.pseudo_boxes under the data root)"
            )
        return
    try:
        verify_sidecar(sidecar, root / "train")
    except SidecarError as err:
        raise ConfigError(f"data.pseudo_boxes = {cfg.data.pseudo_boxes!r}: {err}") from None


def check_batches(cfg: Config, counts: dict[str, int]) -> None:
    """Every rank gets the same number of full training batches (at least one) and at least one
    evaluation sample: the loaders' plan, checked here instead of in every worker."""
    world = cfg.run.num_workers
    train = EpochPlan(counts["train"], cfg.data.batch_size, 0, world, 0, "train")
    if counts["train"] < world or train.num_batches == 0:
        raise ConfigError(
            f"data.batch_size = {cfg.data.batch_size} per worker on run.num_workers = {world}: the {counts['train']} training "
            f"images give no full batch per worker (each gets {counts['train'] // max(world, 1)}; the remainder is dropped); "
            f"lower data.batch_size or run.num_workers"
        )
    for split in ("val", "test"):
        if counts[split] < world:
            raise ConfigError(
                f"{split} has {counts[split]} images for run.num_workers = {world}: every worker needs one"
            )


def check_pretrained(cfg: Config) -> None:
    """``model.pretrained`` names a readable file before Ray starts: a damaged or foreign
    training checkpoint or weights file gets a one-line error naming it."""
    source = cfg.model.pretrained
    if not source or source == "torchvision":
        return
    from wsol_core.checkpoint import STATE_FILE, DamagedCheckpointError, verify_checkpoint

    path = Path(source).expanduser()
    try:
        if path.is_dir() or path.name == STATE_FILE:
            verify_checkpoint(path if path.is_dir() else path.parent)
        elif not path.is_file():
            raise ConfigError(f"model.pretrained = {source!r}: no such file or checkpoint directory")
        else:
            import torch

            try:
                torch.load(path, map_location="cpu", weights_only=True)
            except Exception as exc:
                reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                raise ConfigError(
                    f"model.pretrained = {source!r}: does not load with torch.load(weights_only=True): {reason}"
                ) from None
    except DamagedCheckpointError as err:
        raise ConfigError(f"model.pretrained: {err}") from None
