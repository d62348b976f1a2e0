"""Choosing and building the input pipeline: :class:`LoaderOptions` and :func:`build_loader`.

Two loaders read the shard format and yield the same :class:`~wsol_core.data.batch.Batch`:
:class:`~wsol_core.data.dali_loader.DaliLoader` (NVIDIA DALI: ``fn.readers.webdataset`` with the
index files, GPU decode on ``mixed`` where there is a GPU, DALI's CPU mode where not) and
:class:`~wsol_core.data.torch_loader.TorchLoader` (the ``webdataset`` library's tar reading,
torchvision decoding, torch DataLoader workers) for machines without DALI.

**Equal batches per rank.** Uneven batch counts deadlock DDP, so both loaders follow one plan
(:class:`EpochPlan`). The split's ``N`` samples (in shard order) are cut into ``world_size``
contiguous slices, slice ``s`` being ``[N*s // W, N*(s+1) // W)`` (DALI's own sharding rule).

* Training: rank ``r`` reads slice ``(r + epoch) % W`` (slices rotate, so over ``W`` epochs every
  rank sees all data), shuffled (the writer pre-shuffles training shards; the loader adds a seeded
  shuffle buffer). Every rank yields exactly ``(N // W) // batch_size`` full batches: the
  remainder is **dropped**.
* Evaluation: rank ``r`` reads slice ``r`` in order, once. Every rank yields exactly
  ``ceil(ceil(N / W) / batch_size)`` batches; the missing places are **padded** by repeating
  samples, flagged ``is_padding=True`` so evaluation counts each real sample exactly once.

The order is a function of ``(seed, epoch, rank, world_size)`` only: call ``set_epoch(epoch)``
before iterating, and a resumed run gets the same epoch it would have had.

**Bad input** gets a :class:`~wsol_core.data.format.ShardError` naming the shard and key. With
``skip_corrupt=True`` a bad sample (corrupt image, missing member, bad box, ...) is replaced
in its batch by a repeat of a good one, flagged ``is_padding=True`` (batch shapes and counts stay
equal across ranks), and counted in ``loader.skipped``; the count is logged after each epoch.
Structural problems (missing index file, truncated tar, count or hash mismatch) always raise.
"""

from __future__ import annotations

import logging
from dataclasses import fields, replace
from pathlib import Path
from typing import Any

import torch

# The contract, re-exported: callers build options and read plans from here.
from wsol_core.data.contract import (  # noqa: F401
    IMAGENET_MEAN,
    IMAGENET_STD,
    Backend,
    EpochPlan,
    LoaderOptions,
    SkipReport,
    SplitKind,
    WsolLoader,
    boxes_tensor,
    make_batch,
    resolve_load_masks,
)
from wsol_core.data.manifest import verify_split

log = logging.getLogger(__name__)


def dali_available(device: torch.device) -> tuple[bool, str]:
    """Whether DALI can run here for this device, and why (for the log)."""
    try:
        import nvidia.dali  # noqa: F401
        from nvidia.dali import backend as dali_backend
    except Exception as exc:  # ImportError, or a broken install raising OSError
        return False, f"DALI is not importable ({type(exc).__name__}: {exc})"
    if device.type == "cuda":
        try:
            count = dali_backend.GetCUDADeviceCount()  # type: ignore[attr-defined]  # in the C extension, not in its stubs
        except Exception as exc:
            return False, f"DALI cannot query CUDA ({exc})"
        if count == 0:
            return False, "DALI sees no CUDA device"
        return True, "DALI with mixed (GPU) JPEG decoding"
    if device.type != "cpu":
        return False, f"DALI does not feed {device.type} devices"
    return True, "DALI in CPU mode (no GPU)"


def build_loader(
    split_dir: str | Path,
    *,
    split_kind: SplitKind,
    rank: int = 0,
    world_size: int = 1,
    device: torch.device | str = "cpu",
    options: LoaderOptions | None = None,
    **overrides: Any,
) -> WsolLoader:
    """The input pipeline of one split directory for one rank.

    ``options`` gives the :class:`LoaderOptions`; keyword ``overrides`` replace single fields
    (``build_loader(d, split_kind="train", batch_size=64, seed=1)``). Checks the manifest and
    index files first (``verify``) and picks the backend: DALI when ``backend`` is ``dali``, or
    ``auto`` and DALI runs here; the torch fallback otherwise. The choice and its reason are
    logged and kept in ``loader.backend_reason``.
    """
    known = {f.name for f in fields(LoaderOptions)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise TypeError(f"unknown loader options {unknown}; known: {sorted(known)}")
    opts = replace(options or LoaderOptions(), **overrides)
    opts.validate()
    if split_kind not in ("train", "eval"):
        raise ValueError(f"split_kind must be 'train' or 'eval', not {split_kind!r}")
    device = torch.device(device)
    split = verify_split(split_dir, mode=opts.verify, tolerate_sample_problems=opts.skip_corrupt)
    for problem in split.problems:
        log.warning("%s (will be skipped)", problem)
    EpochPlan(split.num_samples, opts.batch_size, rank, world_size, 0, split_kind).check(str(split_dir))

    ok, why = dali_available(device) if opts.backend != "torch" else (False, "")
    if opts.backend == "dali" and not ok:
        raise RuntimeError(f"backend='dali' was asked for but {why}")
    if opts.backend == "dali" or (opts.backend == "auto" and ok):
        from wsol_core.data.dali_loader import DaliLoader

        loader: WsolLoader = DaliLoader(
            split, split_kind=split_kind, rank=rank, world_size=world_size, device=device, options=opts
        )
        reason = why
    else:
        from wsol_core.data.torch_loader import TorchLoader

        loader = TorchLoader(
            split, split_kind=split_kind, rank=rank, world_size=world_size, device=device, options=opts
        )
        reason = "asked for" if opts.backend == "torch" else why + "; using the torch fallback"
    loader.backend_reason = reason  # type: ignore[attr-defined]
    log.info(
        "input pipeline for %s (%s, rank %d/%d): %s - %s",
        split_dir,
        split_kind,
        rank,
        world_size,
        loader.backend,
        reason,
    )
    return loader
