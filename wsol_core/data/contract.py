"""The loader contract: what every input pipeline takes and gives.

:class:`LoaderOptions` (the options), :class:`EpochPlan` (equal batches per rank: the rule both
loaders follow), :class:`SkipReport` (counted skips of bad samples), the :class:`WsolLoader`
protocol and :func:`make_batch` (the one :class:`~wsol_core.data.batch.Batch` every loader
yields). The loaders (:mod:`~wsol_core.data.dali_loader`, :mod:`~wsol_core.data.torch_loader`)
import this module; :mod:`~wsol_core.data.loader` chooses and builds one of them, so nothing here
imports a loader.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Protocol

import numpy as np
import torch

from wsol_core.data.batch import Batch
from wsol_core.data.format import SampleMeta, ShardError
from wsol_core.data.manifest import VerifiedSplit
from wsol_core.data.pseudo_boxes import PseudoBox, read_boxes, verify_sidecar

log = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

SplitKind = Literal["train", "eval"]
Backend = Literal["auto", "dali", "torch"]


@dataclass
class LoaderOptions:
    """Input-pipeline options (the config's ``data`` section embeds these).

    Attributes:
        backend: ``auto`` picks DALI when it can run here, else the torch fallback.
        batch_size: per rank.
        resize_size: training images are resized to ``R x R`` before the random crop (protocol).
        crop_size: training crop ``C``; evaluation images are resized to ``C x C`` (no crop).
        random_resized_crop: training uses a random-resized crop to ``C`` instead of resize+crop.
        rrc_scale, rrc_ratio: the random-resized crop's area fraction and aspect-ratio ranges.
        hflip: random horizontal flips in training.
        channels_last: images come in channels_last memory format (still NCHW shape).
        seed: base seed of the order and augmentations.
        num_threads: DALI CPU threads, or torch DataLoader worker processes (0: in-process).
        skip_corrupt: skip bad samples (counted) instead of raising.
        verify: up-front checks: ``fast`` (index files, sizes, counts), ``full`` (+ SHA-256),
            ``none``.
        load_masks: read PxAP masks (``None``: in evaluation, when the split has masks).
        mask_size: masks are resized to ``mask_size x mask_size`` (the protocol's 224).
        shuffle_buffer: training shuffle buffer (samples per rank).
        prefetch: batches prepared ahead.
        worker_start: how torch workers start. ``fork`` (torch's default on Linux) starts in
            milliseconds; workers only read tars and run torchvision ops, never DALI or CUDA, so
            forking a process that holds DALI or CUDA threads is safe in practice. ``forkserver``
            / ``spawn`` avoid forking such a process at the cost of importing torch per worker.
        mean, std: normalization (ImageNet's by default), on the 0-1 scale.
        decode: where the torch fallback decodes JPEGs. ``workers``: PIL in the worker
            processes, the protocol's exact pixels. ``device``: the workers only read and draw
            the crops; the main process decodes each batch with batched nvJPEG on the GPU
            (``torchvision.io.decode_jpeg(..., device="cuda")``) and crops, resizes (antialiased
            bilinear, within 1-2 grey levels of PIL's) and flips there: GPU decoding without
            DALI. On a CPU device it runs the same code on the CPU. DALI ignores it (it decodes
            on the GPU already).
        jpeg_check: ``strict``: every JPEG's entropy data is decoded in libjpeg-turbo's strict
            mode, so a corrupt scan (which PIL, OpenCV and DALI decode into a smear with a
            warning at most) is a bad sample like any other; the torch workers take their pixels
            from that very decode, so it costs them nothing; DALI pays one extra CPU decode per
            image. ``structure``: markers only.
        pseudo_boxes: a pseudo-box sidecar (:mod:`wsol_core.data.pseudo_boxes`) of the split a
            training loader reads: each batch carries the sample's pseudo box
            (``Batch.pseudo_boxes``). Checked against the split when the loader is built;
            evaluation loaders ignore it.
    """

    backend: Backend = "auto"
    batch_size: int = 32
    resize_size: int = 256
    crop_size: int = 224
    random_resized_crop: bool = False
    rrc_scale: tuple[float, float] = (0.08, 1.0)
    rrc_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    hflip: bool = True
    channels_last: bool = False
    seed: int = 0
    num_threads: int = 2
    skip_corrupt: bool = False
    verify: Literal["none", "fast", "full"] = "fast"
    load_masks: bool | None = None
    mask_size: int = 224
    shuffle_buffer: int = 1024
    prefetch: int = 2
    worker_start: Literal["fork", "forkserver", "spawn"] = "fork"
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    decode: Literal["workers", "device"] = "workers"
    jpeg_check: Literal["strict", "structure"] = "strict"
    pseudo_boxes: str = ""

    def validate(self) -> None:
        if self.backend not in ("auto", "dali", "torch"):
            raise ValueError(f"backend must be auto, dali or torch, not {self.backend!r}")
        if self.batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        if self.crop_size < 1 or self.resize_size < 1:
            raise ValueError("crop_size and resize_size must be >= 1")
        if not self.random_resized_crop and self.crop_size > self.resize_size:
            raise ValueError(f"crop_size {self.crop_size} is larger than resize_size {self.resize_size}")
        if self.num_threads < 0 or self.prefetch < 1 or self.shuffle_buffer < 1 or self.mask_size < 1:
            raise ValueError("num_threads >= 0, prefetch >= 1, shuffle_buffer >= 1 and mask_size >= 1 are required")
        if self.verify not in ("none", "fast", "full"):
            raise ValueError(f"verify must be none, fast or full, not {self.verify!r}")
        if self.jpeg_check not in ("strict", "structure"):
            raise ValueError(f"jpeg_check must be strict or structure, not {self.jpeg_check!r}")
        if self.decode not in ("workers", "device"):
            raise ValueError(f"decode must be workers or device, not {self.decode!r}")
        lo, hi = self.rrc_scale
        if not 0 < lo <= hi <= 1:
            raise ValueError("rrc_scale must satisfy 0 < lo <= hi <= 1")


@dataclass(frozen=True)
class EpochPlan:
    """Which samples a rank reads in an epoch and how many batches it yields (module docstring)."""

    num_samples: int
    batch_size: int
    rank: int
    world_size: int
    epoch: int
    kind: SplitKind

    @property
    def slice_id(self) -> int:
        return (self.rank + self.epoch) % self.world_size if self.kind == "train" else self.rank

    @property
    def start(self) -> int:
        return self.num_samples * self.slice_id // self.world_size

    @property
    def stop(self) -> int:
        return self.num_samples * (self.slice_id + 1) // self.world_size

    @property
    def slice_size(self) -> int:
        return self.stop - self.start

    @property
    def num_batches(self) -> int:
        n, w, b = self.num_samples, self.world_size, self.batch_size
        if self.kind == "train":
            return (n // w) // b
        return math.ceil(math.ceil(n / w) / b)

    @property
    def num_real(self) -> int:
        """Real (non-padding) samples this rank yields, if nothing is skipped."""
        return self.num_batches * self.batch_size if self.kind == "train" else self.slice_size

    def seed(self, base: int, salt: int = 0) -> int:
        """A 31-bit seed for this (base seed, epoch, rank's slice, salt)."""
        seq = np.random.SeedSequence([base & 0xFFFFFFFF, self.epoch, self.slice_id, self.world_size, salt])
        return int(seq.generate_state(1)[0] & 0x7FFFFFFF)

    def check(self, where: str) -> None:
        if self.world_size < 1 or not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {self.rank} is not in [0, world_size={self.world_size})")
        if self.num_samples < self.world_size:
            raise ValueError(f"{where}: {self.num_samples} samples for {self.world_size} ranks; every rank needs one")
        if self.num_batches == 0:
            raise ValueError(
                f"{where}: {self.num_samples} samples give no full batch of {self.batch_size} per rank "
                f"on {self.world_size} ranks (training drops the remainder); lower batch_size"
            )


@dataclass
class SkipReport:
    """Counted skips of bad samples (``skip_corrupt``): by reason, with the first examples."""

    counts: dict[str, int] = field(default_factory=dict)
    examples: list[tuple[str, str | None, str]] = field(default_factory=list)
    max_examples: int = 100

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def add(self, err: ShardError) -> None:
        reason = err.reason.split(" (")[0].split(":")[0]
        self.counts[reason] = self.counts.get(reason, 0) + 1
        if len(self.examples) < self.max_examples:
            self.examples.append((err.shard, err.key, err.reason))

    def summary(self) -> str:
        if not self.total:
            return "no samples skipped"
        parts = ", ".join(f"{n} x {r}" for r, n in sorted(self.counts.items()))
        first = "; ".join(f"{Path(s).name}:{k}: {r}" for s, k, r in self.examples[:3])
        return f"skipped {self.total} bad samples ({parts}); first: {first}"


class WsolLoader(Protocol):
    """What both loaders provide."""

    backend: str
    options: LoaderOptions
    skipped: SkipReport
    split: VerifiedSplit

    def set_epoch(self, epoch: int) -> None: ...

    def __len__(self) -> int: ...

    def __iter__(self) -> Iterator[Batch]: ...

    def close(self) -> None: ...


# ---------------------------------------------------------------------------------------------
# Helpers shared by the two loaders
# ---------------------------------------------------------------------------------------------


def boxes_tensor(metas: Sequence[SampleMeta]) -> tuple[torch.Tensor, torch.Tensor]:
    """``[B, K, 4]`` boxes padded with -1 rows and ``[B]`` counts."""
    counts = [len(m.boxes) for m in metas]
    k = max(counts + [1])
    out = np.full((len(metas), k, 4), -1.0, dtype=np.float32)
    for i, m in enumerate(metas):
        if len(m.boxes):
            out[i, : len(m.boxes)] = m.boxes
    return torch.from_numpy(out), torch.tensor(counts, dtype=torch.int64)


def resolve_load_masks(split: VerifiedSplit, split_kind: SplitKind, options: LoaderOptions) -> bool:
    """Whether to read PxAP masks: as asked, else in evaluation when the split has them."""
    has_masks = split.manifest.has_masks
    load = options.load_masks if options.load_masks is not None else (split_kind == "eval" and has_masks)
    if load and not has_masks:
        raise ValueError(f"{split.root}: load_masks asked for but dataset.json says the split has no masks")
    return load


def load_pseudo_boxes(split: VerifiedSplit, split_kind: SplitKind, options: LoaderOptions) -> PseudoBoxTable | None:
    """The sidecar's boxes by key for a training loader that asks for them (checked against the
    split: its ``dataset.json`` SHA-256, count and keys), else None."""
    if not options.pseudo_boxes or split_kind != "train":
        return None
    boxes = read_boxes(options.pseudo_boxes)
    verify_sidecar(options.pseudo_boxes, split.root, boxes=boxes)
    return PseudoBoxTable(options.pseudo_boxes, boxes)


@dataclass(frozen=True)
class PseudoBoxTable:
    """A sidecar's boxes by sample key, and where they came from (for error messages)."""

    source: str
    boxes: dict[str, PseudoBox]

    def tensor(self, keys: Sequence[str]) -> torch.Tensor:
        missing = [k for k in keys if k not in self.boxes]
        if missing:
            raise ShardError(self.source, missing[0], "no pseudo box for this sample in the sidecar")
        return torch.tensor([self.boxes[k].box for k in keys], dtype=torch.float32)


def make_batch(
    images: torch.Tensor,
    metas: Sequence[SampleMeta],
    padding: Sequence[bool],
    masks: Sequence[np.ndarray] | None,
    *,
    views: Sequence[Sequence[float]] | None = None,
    pseudo_boxes: PseudoBoxTable | None = None,
) -> Batch:
    """A :class:`Batch` from already-normalized images and host metadata (small tensors on CPU,
    moved to the images' device); ``views`` and ``pseudo_boxes`` fill the optional fields."""
    device = images.device
    boxes, num_boxes = boxes_tensor(metas)
    non_blocking = device.type == "cuda"
    keys = [m.key for m in metas]
    return Batch(
        images=images,
        labels=torch.tensor([m.label for m in metas], dtype=torch.int64).to(device, non_blocking=non_blocking),
        keys=keys,
        orig_sizes=torch.tensor([[m.width, m.height] for m in metas], dtype=torch.int64).to(device),
        boxes=boxes.to(device, non_blocking=non_blocking),
        num_boxes=num_boxes.to(device),
        masks=None if masks is None else torch.from_numpy(np.stack(masks)).to(device, non_blocking=non_blocking),
        is_padding=torch.tensor(list(padding), dtype=torch.bool).to(device),
        views=None if views is None else torch.tensor(views, dtype=torch.float32).to(device),
        pseudo_boxes=None if pseudo_boxes is None else pseudo_boxes.tensor(keys).to(device),
    )
