"""Writing a split: tar shards, their DALI index files and ``dataset.json``.

A converter turns its source layout into a list of records (one per image) and a *materializer*
that makes the encoded sample of a record: :class:`FileMaterializer` for images on disk, the
synthetic generator's own for generated ones. :func:`write_split` then

* orders the records (sorted by image id, shuffled with a fixed seed for training splits so that
  a reader's small shuffle buffer still mixes classes),
* cuts them into shards by sample count and/or bytes,
* writes the shards in parallel processes (a tqdm bar counts images), each to a temporary name
  that is renamed only when the tar and its index are complete,
* keeps shards that a previous run finished: a finished shard has a record under ``.progress/``
  with the fingerprint of its input and the SHA-256 of its bytes; it is kept when both match, and
  rewritten (and reported) when the tar no longer hashes to what was recorded,
* writes ``dataset.json`` last.

The same records and options give the same bytes: tar members have fixed mtimes, owners and
order, JSON is written with sorted keys, and nothing depends on the number of processes.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import multiprocessing
import os
import tarfile
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np

from wsol_core.data.format import (
    MEMBER_ORDER,
    WRITER_VERSION,
    assign_keys,
    build_index,
    encode_mask_png,
    encoded_image_problem,
    index_name_for,
    index_text,
    meta_json,
    sha256_file,
    shard_name,
    tar_member,
)
from wsol_core.data.manifest import Manifest, ShardInfo, save_manifest

log = logging.getLogger(__name__)

PROGRESS_DIR = ".progress"
#: Tar headers, json and cls members: what a sample costs beyond its image, for byte budgets.
_SAMPLE_OVERHEAD_BYTES = 3 * 512 + 512


class SourceError(ValueError):
    """A source image that cannot be written (corrupt, wrong size, bad box), naming the image."""

    def __init__(self, image_id: str, reason: str) -> None:
        self.image_id = image_id
        self.reason = reason
        super().__init__(f"image {image_id!r}: {reason}")

    def __reduce__(self):  # picklable across the process pool
        return (SourceError, (self.image_id, self.reason))


@dataclass(frozen=True)
class SourceRecord:
    """One image as a converter describes it. Picklable; its ``repr`` is part of the shard fingerprint.

    Attributes:
        image_id: the id in the source layout (a relative path); the sample key derives from it.
        label: class index, -1 when unlabeled.
        boxes: ``(x0, y0, x1, y1)`` in original pixels, inclusive corners.
        path: image file (absolute or relative to the working directory).
        mask_paths: PxAP instance masks (their union is stored as ``mask.png``).
        ignore_path: PxAP ignore-region mask (stored as ``ignore.png``).
        expected_size: ``(width, height)`` the metadata claims; a different real size is an error,
            since the boxes would not fit the image.
        size_hint: encoded size in bytes, for shard byte budgets.
    """

    image_id: str
    label: int
    boxes: tuple[tuple[float, float, float, float], ...] = ()
    path: str | None = None
    mask_paths: tuple[str, ...] = ()
    ignore_path: str | None = None
    expected_size: tuple[int, int] | None = None
    size_hint: int = 0


@dataclass
class EncodedSample:
    """The members of one sample, ready for the tar."""

    image: bytes
    image_ext: str  # "jpg" or "png"
    json: bytes
    cls: bytes
    mask_png: bytes | None = None
    ignore_png: bytes | None = None
    #: "kept" when the source bytes were stored as they are, else the conversion's reason.
    conversion: str = "kept"
    boxes_clipped: int = 0

    def members(self, key: str) -> list[tuple[str, bytes]]:
        by_ext = {"cls": self.cls, self.image_ext: self.image, "json": self.json}
        if self.mask_png is not None:
            by_ext["mask.png"] = self.mask_png
        if self.ignore_png is not None:
            by_ext["ignore.png"] = self.ignore_png
        return [(f"{key}.{ext}", by_ext[ext]) for ext in MEMBER_ORDER if ext in by_ext]


class Materializer(Protocol):
    """Makes the encoded sample of a record; raises :class:`SourceError` for a bad source."""

    def __call__(self, record, key: str) -> EncodedSample: ...

    def fingerprint(self) -> str: ...


@dataclass(frozen=True)
class WriterOptions:
    """How a split is cut into shards and written.

    ``shard_max_samples`` and ``shard_max_bytes`` both bound a shard (either may be None); about
    1 GB per shard suits ImageNet. ``shuffle=None`` shuffles splits named ``train`` only.
    """

    shard_max_samples: int | None = None
    shard_max_bytes: int | None = 1_000_000_000
    workers: int = 1
    shuffle: bool | None = None
    seed: int = 0
    #: JPEG quality for images that must be re-encoded (PNG-as-JPEG, CMYK, grayscale, ...).
    jpeg_quality: int = 95
    #: Fully decode every source image (catches truncated files; costs one decode per image).
    verify_decode: bool = True
    #: Skip bad source images (counted in the manifest) instead of stopping.
    skip_corrupt: bool = False
    progress: bool = True

    def byte_options(self) -> dict[str, object]:
        """The options that change the output bytes (part of each shard's fingerprint)."""
        return {"jpeg_quality": self.jpeg_quality, "writer_version": WRITER_VERSION}


@dataclass
class WriteResult:
    """What :func:`write_split` did."""

    manifest: Manifest
    split_dir: Path
    written: list[str] = field(default_factory=list)
    kept: list[str] = field(default_factory=list)
    #: Finished shards whose bytes no longer matched their recorded SHA-256, rewritten.
    corrupt_rewritten: list[str] = field(default_factory=list)
    removed_stale: list[str] = field(default_factory=list)


# ---------------------------------------------------------------------------------------------
# Materializing images from files
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FileMaterializer:
    """Reads a source image from disk; keeps proper RGB JPEG (and RGB PNG) bytes as they are.

    Everything else becomes an RGB JPEG at ``jpeg_quality``, with the reason counted:
    ``png_as_jpeg`` (PNG data behind a .jpg/.JPEG name, as in ImageNet), ``cmyk``, ``grayscale``,
    and ``other`` (palette or alpha PNGs, other formats). Boxes outside the image are clipped to it
    (counted); inverted boxes, or boxes entirely outside, are errors.
    """

    jpeg_quality: int = 95
    verify_decode: bool = True

    def fingerprint(self) -> str:
        return f"file:q{self.jpeg_quality}"

    def __call__(self, record: SourceRecord, key: str) -> EncodedSample:
        from PIL import Image

        if record.path is None:
            raise SourceError(record.image_id, "record has no image path")
        try:
            data = Path(record.path).read_bytes()
        except OSError as exc:
            raise SourceError(record.image_id, f"cannot read {record.path}: {exc.strerror or exc}") from None
        try:
            img = Image.open(io.BytesIO(data))
            fmt, mode = img.format, img.mode
            if self.verify_decode:
                img.load()
        except Exception as exc:  # PIL raises OSError, SyntaxError, ValueError... for bad data
            raise SourceError(record.image_id, f"corrupt or truncated image {record.path}: {exc}") from None
        declared = Path(record.path).suffix.lower()
        conversion = "kept"
        # With decoding checked, a JPEG's entropy data is decoded strictly as well: a corrupt scan
        # decodes "fine" in PIL, and a converted (CMYK, grey) image would carry its smear along.
        problem = encoded_image_problem(data, "jpg", entropy=self.verify_decode) if fmt == "JPEG" else None
        if problem:
            raise SourceError(record.image_id, f"{problem} ({record.path})")
        if fmt == "JPEG" and mode == "RGB":
            image, ext = data, "jpg"
        elif fmt == "PNG" and mode == "RGB" and declared == ".png":
            image, ext = data, "png"
        else:
            if fmt == "PNG" and declared in (".jpg", ".jpeg"):
                conversion = "png_as_jpeg"
            elif fmt == "JPEG" and mode in ("CMYK", "YCbCr"):
                conversion = "cmyk"
            elif fmt == "JPEG" and mode in ("L", "LA", "1", "I;16"):
                conversion = "grayscale"
            else:
                conversion = "other"
            try:
                rgb = img.convert("RGB")
            except Exception as exc:
                raise SourceError(record.image_id, f"cannot convert {fmt} {mode} to RGB: {exc}") from None
            buf = io.BytesIO()
            rgb.save(buf, format="JPEG", quality=self.jpeg_quality)
            image, ext = buf.getvalue(), "jpg"
        width, height = img.size
        if record.expected_size is not None and tuple(record.expected_size) != (width, height):
            ew, eh = record.expected_size
            raise SourceError(
                record.image_id, f"image is {width}x{height} but the metadata says {ew}x{eh}; its boxes would not fit"
            )
        boxes, clipped = clip_boxes(record.image_id, record.boxes, width, height)
        mask_png = ignore_png = None
        if record.mask_paths:
            mask_png = encode_mask_png(_union_masks(record.image_id, record.mask_paths))
            if record.ignore_path:
                ignore_png = encode_mask_png(_union_masks(record.image_id, (record.ignore_path,)))
        return EncodedSample(
            image=image,
            image_ext=ext,
            json=meta_json(record.image_id, record.label, width, height, boxes),
            cls=str(int(record.label)).encode(),
            mask_png=mask_png,
            ignore_png=ignore_png,
            conversion=conversion,
            boxes_clipped=clipped,
        )


def clip_boxes(
    image_id: str, boxes: Sequence[Sequence[float]], width: int, height: int
) -> tuple[list[list[float]], int]:
    """Boxes clipped to ``[0, width] x [0, height]`` and how many needed it.

    Inverted boxes and boxes entirely outside the image are errors: clipping would invent data.
    """
    out, clipped = [], 0
    for box in boxes:
        x0, y0, x1, y1 = (float(v) for v in box)
        if not all(np.isfinite([x0, y0, x1, y1])):
            raise SourceError(image_id, f"non-finite box {list(box)}")
        if x0 > x1 or y0 > y1:
            raise SourceError(image_id, f"inverted box {list(box)}")
        if x0 >= width or y0 >= height or x1 < 0 or y1 < 0:
            raise SourceError(image_id, f"box {list(box)} lies outside the {width}x{height} image")
        c = [max(0.0, x0), max(0.0, y0), min(float(width), x1), min(float(height), y1)]
        if c != [x0, y0, x1, y1]:
            clipped += 1
        out.append(c)
    return out, clipped


def _union_masks(image_id: str, paths: Sequence[str]) -> np.ndarray:
    """The union of instance masks (non-zero = foreground). All must have one size: the protocol
    resizes each with nearest sampling, which commutes with the union only at equal sizes."""
    from PIL import Image

    union = None
    for p in paths:
        try:
            with Image.open(p) as m:
                arr = np.asarray(m.convert("L")) > 0
        except Exception as exc:
            raise SourceError(image_id, f"cannot read mask {p}: {exc}") from None
        if union is None:
            union = arr
        elif union.shape != arr.shape:
            raise SourceError(image_id, f"mask {p} is {arr.shape[::-1]}, the others {union.shape[::-1]}")
        else:
            union = union | arr
    assert union is not None
    return union


# ---------------------------------------------------------------------------------------------
# Planning and writing shards
# ---------------------------------------------------------------------------------------------


@dataclass
class _ShardTask:
    split_dir: str
    name: str
    items: list[tuple[object, str]]  # (record, key)
    materialize: Callable
    skip_corrupt: bool
    fingerprint: str


@dataclass
class _ShardRecord:
    """What ``.progress/{name}.json`` holds for a finished shard."""

    info: ShardInfo
    conversions: dict[str, int]
    boxes_clipped: int
    skipped: list[dict[str, str]]
    index_sha256: str


def plan_shards(
    records: Sequence,
    *,
    max_samples: int | None,
    max_bytes: int | None,
) -> list[list[int]]:
    """Cut records (already in write order) into shards: lists of record positions."""
    if max_samples is not None and max_samples < 1:
        raise ValueError("shard_max_samples must be >= 1")
    shards: list[list[int]] = []
    current: list[int] = []
    current_bytes = 0
    for i, rec in enumerate(records):
        cost = int(getattr(rec, "size_hint", 0) or 0) + _SAMPLE_OVERHEAD_BYTES
        full = (max_samples is not None and len(current) >= max_samples) or (
            max_bytes is not None and current and current_bytes + cost > max_bytes
        )
        if full:
            shards.append(current)
            current, current_bytes = [], 0
        current.append(i)
        current_bytes += cost
    if current:
        shards.append(current)
    return shards


def _fingerprint(items: Sequence[tuple[object, str]], materializer_fp: str, byte_options: dict) -> str:
    h = hashlib.sha256()
    h.update(json.dumps({"m": materializer_fp, "o": byte_options}, sort_keys=True).encode())
    for rec, key in items:
        h.update(key.encode())
        h.update(repr(rec).encode())
    return h.hexdigest()


def _write_shard(task: _ShardTask) -> _ShardRecord:
    """Write one shard (tar, then index) under temporary names, then rename both."""
    split_dir = Path(task.split_dir)
    tar_path = split_dir / task.name
    idx_path = split_dir / index_name_for(task.name)
    tmp_tar = tar_path.with_name(tar_path.name + ".tmp")
    tmp_idx = idx_path.with_name(idx_path.name + ".tmp")
    conversions: dict[str, int] = {}
    skipped: list[dict[str, str]] = []
    clipped = 0
    count = 0
    with open(tmp_tar, "wb") as f:
        with tarfile.open(fileobj=f, mode="w", format=tarfile.USTAR_FORMAT) as tf:
            for record, key in task.items:
                try:
                    sample = task.materialize(record, key)
                except SourceError as exc:
                    if not task.skip_corrupt:
                        raise
                    skipped.append({"id": exc.image_id, "reason": exc.reason})
                    continue
                for name, data in sample.members(key):
                    tf.addfile(*tar_member(name, data))
                conversions[sample.conversion] = conversions.get(sample.conversion, 0) + 1
                clipped += sample.boxes_clipped
                count += 1
        f.flush()
        os.fsync(f.fileno())
    if count == 0:
        tmp_tar.unlink()
        info = ShardInfo(task.name, index_name_for(task.name), 0, "", 0, task.fingerprint)
        return _ShardRecord(info, conversions, clipped, skipped, "")
    text = index_text(build_index(tmp_tar))
    tmp_idx.write_text(text)
    digest = sha256_file(tmp_tar)
    size = tmp_tar.stat().st_size
    # Index first, tar last: a tar that exists under its final name always has its index.
    os.replace(tmp_idx, idx_path)
    os.replace(tmp_tar, tar_path)
    info = ShardInfo(task.name, idx_path.name, count, digest, size, task.fingerprint)
    record = _ShardRecord(info, conversions, clipped, skipped, hashlib.sha256(text.encode()).hexdigest())
    progress = split_dir / PROGRESS_DIR / (task.name + ".json")
    progress.write_text(json.dumps(asdict(record), sort_keys=True, indent=1))
    return record


def _load_finished(split_dir: Path, name: str, fingerprint: str) -> tuple[_ShardRecord | None, bool]:
    """A finished shard's record when it can be kept; ``(None, True)`` when it is corrupt."""
    progress = split_dir / PROGRESS_DIR / (name + ".json")
    tar_path = split_dir / name
    idx_path = split_dir / index_name_for(name)
    if not progress.is_file():
        return None, False
    try:
        doc = json.loads(progress.read_text())
        record = _ShardRecord(ShardInfo(**doc.pop("info")), **doc)
    except (ValueError, TypeError):
        return None, False
    if record.info.fingerprint != fingerprint:
        return None, False  # a different input or options: rewrite, nothing is wrong
    if record.info.num_samples == 0:
        return record, False
    if not tar_path.is_file() or not idx_path.is_file():
        return None, True
    if tar_path.stat().st_size != record.info.bytes or sha256_file(tar_path) != record.info.sha256:
        return None, True
    if hashlib.sha256(idx_path.read_bytes()).hexdigest() != record.index_sha256:
        return None, True
    return record, False


def write_split(
    out_dir: str | Path,
    split: str,
    records: Sequence,
    materialize: Materializer,
    *,
    dataset: str,
    num_classes: int,
    class_names: Sequence[str] = (),
    labeled: bool = True,
    has_masks: bool = False,
    options: WriterOptions = WriterOptions(),
) -> WriteResult:
    """Write ``records`` as the shards of ``out_dir/split`` (see the module docstring)."""
    from tqdm import tqdm

    split_dir = Path(out_dir) / split
    (split_dir / PROGRESS_DIR).mkdir(parents=True, exist_ok=True)
    if not records:
        raise ValueError(f"{dataset}/{split}: no images to write")
    order = sorted(range(len(records)), key=lambda i: records[i].image_id)
    shuffle = options.shuffle if options.shuffle is not None else split == "train"
    if shuffle:
        rng = np.random.default_rng([options.seed, 0x5EED])
        order = [order[i] for i in rng.permutation(len(order))]
    ordered = [records[i] for i in order]
    keys = assign_keys([r.image_id for r in ordered])
    plan = plan_shards(ordered, max_samples=options.shard_max_samples, max_bytes=options.shard_max_bytes)
    byte_options = options.byte_options()
    mat_fp = materialize.fingerprint()
    tasks: list[_ShardTask] = []
    done: dict[str, _ShardRecord] = {}
    result = WriteResult(manifest=None, split_dir=split_dir)  # type: ignore[arg-type]
    for n, positions in enumerate(plan):
        items = [(ordered[p], keys[p]) for p in positions]
        name = shard_name(split, n)
        fp = _fingerprint(items, mat_fp, byte_options)
        finished, corrupt = _load_finished(split_dir, name, fp)
        if finished is not None:
            done[name] = finished
            result.kept.append(name)
            continue
        if corrupt:
            log.warning("%s: finished shard no longer matches its recorded SHA-256; rewriting it", split_dir / name)
            result.corrupt_rewritten.append(name)
        tasks.append(_ShardTask(str(split_dir), name, items, materialize, options.skip_corrupt, fp))

    planned = {shard_name(split, n) for n in range(len(plan))}
    for path in sorted(split_dir.glob(f"{split}-*.tar")) + sorted(split_dir.glob(f"{split}-*.idx")):
        tar_name = path.name if path.suffix == ".tar" else path.name[: -len(".idx")] + ".tar"
        if tar_name not in planned:
            path.unlink()
            (split_dir / PROGRESS_DIR / (tar_name + ".json")).unlink(missing_ok=True)
            result.removed_stale.append(path.name)
    for tmp in split_dir.glob("*.tmp"):
        tmp.unlink()

    total = sum(len(t.items) for t in tasks)
    with tqdm(total=total, unit="img", desc=f"{dataset}/{split}", disable=not options.progress) as bar:
        workers = max(1, min(options.workers, len(tasks)))
        if workers == 1:
            finished_iter = map(_write_shard, tasks)
            for rec in finished_iter:
                done[rec.info.name] = rec
                result.written.append(rec.info.name)
                bar.update(rec.info.num_samples + len(rec.skipped))
        else:
            # spawn: the parent may hold threads (DALI, torch) that fork would copy in a bad state.
            ctx = multiprocessing.get_context("spawn")
            with ctx.Pool(workers) as pool:
                for rec in pool.imap_unordered(_write_shard, tasks):
                    done[rec.info.name] = rec
                    result.written.append(rec.info.name)
                    bar.update(rec.info.num_samples + len(rec.skipped))
    result.written.sort()

    ordered_records = [done[shard_name(split, n)] for n in range(len(plan))]
    conversions: dict[str, int] = {}
    skipped: list[dict[str, str]] = []
    clipped = 0
    for rec in ordered_records:
        for k, v in rec.conversions.items():
            conversions[k] = conversions.get(k, 0) + v
        skipped.extend(rec.skipped)
        clipped += rec.boxes_clipped
    manifest = Manifest(
        dataset=dataset,
        split=split,
        num_classes=int(num_classes),
        class_names=list(class_names),
        shards=[rec.info for rec in ordered_records if rec.info.num_samples > 0],
        labeled=labeled,
        has_masks=has_masks,
        conversions=dict(sorted(conversions.items())),
        boxes_clipped=clipped,
        skipped=skipped,
        options={
            "shard_max_samples": options.shard_max_samples,
            "shard_max_bytes": options.shard_max_bytes,
            "shuffled": bool(shuffle),
            "seed": options.seed,
            "jpeg_quality": options.jpeg_quality,
            "materializer": mat_fp,
        },
    )
    if not manifest.shards:
        raise ValueError(f"{dataset}/{split}: every image was skipped; nothing written")
    save_manifest(split_dir, manifest)
    result.manifest = manifest
    if skipped:
        log.warning("%s/%s: skipped %d bad source images (listed in dataset.json)", dataset, split, len(skipped))
    return result


def rebuild_indexes(split_dir: str | Path) -> list[Path]:
    """Re-create the DALI index file of every tar in a split directory (the ``index`` subcommand)."""
    written = []
    for tar in sorted(Path(split_dir).glob("*.tar")):
        idx = tar.with_suffix(".idx")
        idx.write_text(index_text(build_index(tar)))
        written.append(idx)
    return written


__all__ = [
    "EncodedSample",
    "FileMaterializer",
    "SourceError",
    "SourceRecord",
    "WriteResult",
    "WriterOptions",
    "clip_boxes",
    "plan_shards",
    "rebuild_indexes",
    "write_split",
]
