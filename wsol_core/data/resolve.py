"""From the config's ``data`` section to a shard root on disk.

``data.root`` names shards written by ``jobs/make_shards.py``. Empty, it means the embedded
default: the synthetic benchmark, generated on first use into a cache directory keyed by its
options, so every entry point (training, Tune trials, SLURM jobs) shares one copy. Generation
runs under a file lock: concurrent first runs wait for one writer instead of racing.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

from wsol_core.config import ConfigError, DataConfig, SyntheticDataConfig
from wsol_core.data.synthetic import LATER_OPTIONS, SyntheticConfig, write_synthetic

SPLITS = ("train", "val", "test")


def synthetic_cache_root(cfg: SyntheticDataConfig) -> Path:
    if cfg.cache_dir:
        return Path(cfg.cache_dir).expanduser().resolve()
    base = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    return (base / "wsol" / "synthetic").resolve()


def synthetic_dataset_dir(cfg: SyntheticDataConfig) -> Path:
    # Options added later join the key only when set, so existing caches keep their key.
    key = json.dumps(
        {k: v for k, v in asdict(cfg).items() if k != "cache_dir" and (v or k not in LATER_OPTIONS)}, sort_keys=True
    )
    digest = hashlib.sha256(key.encode()).hexdigest()[:12]
    return synthetic_cache_root(cfg) / f"synthetic-{cfg.size}px-{cfg.classes}c-{digest}"


def ensure_synthetic(cfg: SyntheticDataConfig) -> Path:
    """The synthetic shards for ``cfg``, written once (the writer verifies and keeps finished shards)."""
    return write_once(
        synthetic_dataset_dir(cfg),
        "the synthetic WSOL benchmark",
        lambda root: write_synthetic(
            root,
            num_train=cfg.num_train,
            num_val=cfg.num_val,
            num_test=cfg.num_test,
            config=SyntheticConfig(
                size=cfg.size, num_classes=cfg.classes, upright=cfg.upright, body_texture=cfg.body_texture
            ),
            seed=cfg.seed,
        ),
    )


def write_once(root: Path, what: str, write: Callable[[Path], object]) -> Path:
    """``root`` with its three splits, calling ``write(root)`` first unless they are all there.

    Under a file lock: concurrent first users wait for one writer instead of racing, and a writer
    that died part-way is resumed by the next (the shard writer keeps finished shards)."""
    if all((root / split / "dataset.json").is_file() for split in SPLITS):
        return root
    root.mkdir(parents=True, exist_ok=True)
    with open(root / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        if not all((root / split / "dataset.json").is_file() for split in SPLITS):
            print(f"[wsol] generating {what} into {root} (first use)", flush=True)
            write(root)
    return root


def resolve_data_root(cfg: DataConfig) -> Path:
    if not cfg.root:
        return ensure_synthetic(cfg.synthetic)
    root = Path(cfg.root).expanduser().resolve()
    if not root.is_dir():
        raise ConfigError(f"data.root = {cfg.root!r} is not a directory")
    return root
